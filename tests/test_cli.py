"""The console scripts setup.py installs, and the tools/*.py names kept for Megatron-LM habits:
each names a ``main(argv) -> int`` of the package that parses its own command line."""

from __future__ import annotations

import importlib
import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = dict(re.findall(r'"(megatron-mile-[\w-]+)=([\w.]+:\w+)"', (REPO / "setup.py").read_text()))
TOOLS = {  # tools/NAME.py -> the console script it runs
    "prepare_corpus": "megatron-mile-prepare-corpus",
    "train_tokenizer": "megatron-mile-train-tokenizer",
    "preprocess_data": "megatron-mile-preprocess",
    "eval_token_frequency": "megatron-mile-eval-frequency",
    "export_hf": "megatron-mile-export-hf",
    "import_hf": "megatron-mile-import-hf",
    "estimate_memory": "megatron-mile-estimate-memory",
}


def _entry_point(script: str):
    module, func = SCRIPTS[script].split(":")
    return getattr(importlib.import_module(module), func)


def test_every_tool_is_a_console_script():
    assert set(SCRIPTS) == {"megatron-mile-train", *TOOLS.values()}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_prints_its_usage(script, capsys):
    with pytest.raises(SystemExit) as done:
        _entry_point(script)(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {script} ")


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tools_script_runs_the_console_script(tool):
    # Run as a module, not as __main__: what the script binds is what `python tools/...` calls.
    names = runpy.run_path(str(REPO / "tools" / f"{tool}.py"), run_name="tools_" + tool)
    assert names["main"] is _entry_point(TOOLS[tool])
