"""The package's error types: one base, :class:`MileError`, carrying the exit status a
command-line tool returns for it, and :func:`cli_error`, the one place that turns an error
into the tool's one-line message and that status.

A leaf module (imports nothing of the package), so that ``megatron_mile.config`` and every
other module can raise these without import cycles. The old homes of the subclasses
(``megatron_mile.config.ConfigError``, ``megatron_mile.data.integrity.DataError``,
``megatron_mile.training.checkpoint.CheckpointError``, ...) re-export them.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

__all__ = ["EXIT_FAILED", "EXIT_INPUT", "CheckpointError", "ConfigError", "DataError",
           "INPUT_ERRORS", "MileError", "cli_error", "exit_code"]

EXIT_FAILED = 1
"""Exit status of a run that failed while running (a failed save, a diverged loss): the last
published checkpoint is intact and a restart resumes from it."""
EXIT_INPUT = 2
"""Exit status of bad input found before anything ran (configuration, data, checkpoint)."""


class MileError(Exception):
    """Base of the package's errors; ``exit_code`` is what a command-line tool returns."""

    exit_code: int = EXIT_INPUT


class ConfigError(MileError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class DataError(MileError, ValueError):
    """A dataset or tokenizer file is malformed or does not fit the model (the message names
    the file)."""


class CheckpointError(MileError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit what is being loaded."""


INPUT_ERRORS: tuple[type[BaseException], ...] = (MileError, FileNotFoundError, FileExistsError)
"""What a tool reports as bad input in one line (exit 2) instead of a traceback."""


def exit_code(err: BaseException) -> int:
    """The exit status for ``err``: its ``exit_code`` for a :class:`MileError`, else
    :data:`EXIT_INPUT` (a missing or existing file named on the command line)."""
    return err.exit_code if isinstance(err, MileError) else EXIT_INPUT


def cli_error(prog: str, err: BaseException, what: Optional[str] = None,
              stream: Optional[TextIO] = None) -> int:
    """Print ``"<prog>: <what>: <err>"`` on one line (``what``: the error's class name unless
    given, e.g. "configuration error") to stderr; return :func:`exit_code` of ``err``."""
    print(f"{prog}: {what or type(err).__name__}: {err}", file=stream or sys.stderr)
    return exit_code(err)
