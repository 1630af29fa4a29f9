"""Bound how long a rank waits on a hung or dead peer, and make a second signal final.

A rank blocked in a collective whose peer is stopped (SIGSTOP, a frozen node) or gone can wait
far longer than the process-group timeout (gloo's ``work.wait()`` and NCCL without async error
handling do), and Python signal handlers never run while the main thread sits in C++: SIGTERM
from Slurm or torchrun cannot end it. :class:`Watchdog` runs a daemon thread that

* ends the process with one line and exit code :data:`EXIT_STALLED` when the main thread has
  reported no progress (:meth:`Watchdog.beat`) for ``timeout_s`` seconds, naming the iteration
  and the phase that stalled. The other ranks of the job then see a dead peer and end too
  (torchrun and srun tear the job down when one rank exits non-zero);
* exits at once with ``128 + signum`` on the *second* SIGTERM/SIGINT: the first one is left to
  the trainer's handler (finish the iteration, save, exit 0), but a second means "now", even
  when the main thread is stuck in a collective. It sees signals through
  ``signal.set_wakeup_fd``, which the C-level handler writes to immediately.

    watchdog = Watchdog(timeout_s=600, rank=dist.get_rank())
    watchdog.start()
    watchdog.beat(iteration=5, phase="train step")
    ...
    watchdog.stop()

No collectives; one thread per process.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Optional

EXIT_STALLED = 3
"""Exit code of a rank that saw no progress for the timeout (a hung or dead peer)."""

_FINAL_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals whose second arrival exits at once (SIGUSR1, Slurm's early warning, does not count)."""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank died or timed out
    (gloo: "Connection closed by peer", "Timed out waiting"; NCCL: watchdog errors), as
    opposed to a bug: torch raises these as ``DistError`` or a plain ``RuntimeError``."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(marker in text for marker in (
        "Connection closed by peer", "Connection reset by peer", "Timed out waiting",
        "ProcessGroupNCCL", "NCCL communicator was aborted", "gloo/transport"))


class Watchdog:
    """Exit a rank that stalls for ``timeout_s`` seconds, or that gets a second SIGTERM/SIGINT.

    Args:
        timeout_s: longest time without :meth:`beat` (parallel.distributed_timeout_minutes).
        rank: global rank, for the message.
        prog: program name that starts the message line.
    """

    def __init__(self, timeout_s: float, rank: int, prog: str = "megatron-mile-train") -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.prog = prog
        self._iteration = 0
        self._phase = "setup"
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._old_wakeup_fd = -1
        self._final_signals_seen = 0

    def start(self) -> "Watchdog":
        """Start the thread; from the main thread also listen for signals."""
        if threading.current_thread() is threading.main_thread():
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(),
                                                       warn_on_full_buffer=False)
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mile-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, iteration: int, phase: str) -> None:
        """Record progress: the main thread is now in ``phase`` of ``iteration``."""
        self._iteration, self._phase = iteration, phase
        self._last_beat = time.monotonic()

    def where(self) -> str:
        """The last reported progress, e.g. "iteration 12 (train step)"."""
        return f"iteration {self._iteration} ({self._phase})"

    def stop(self) -> None:
        """Stop the thread and give back the signal wakeup fd."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._wake_w is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None

    def _exit(self, code: int, message: str) -> None:
        sys.stderr.write(f"{self.prog}: rank {self.rank}: {message}\n")
        sys.stderr.flush()
        os._exit(code)

    def _run(self) -> None:
        poll_s = min(1.0, self.timeout_s / 4)
        while not self._stop.is_set():
            if self._wake_r is not None:
                readable, _, _ = select.select([self._wake_r], [], [], poll_s)
                if readable:
                    self._on_signals(self._wake_r.recv(64))
            else:
                self._stop.wait(poll_s)
            stalled = time.monotonic() - self._last_beat
            if stalled > self.timeout_s and not self._stop.is_set():
                self._exit(EXIT_STALLED, (
                    f"no progress for {stalled:.0f} s in iteration {self._iteration} "
                    f"({self._phase}): a peer rank is hung or dead, or this phase is slower "
                    f"than parallel.distributed_timeout_minutes={self.timeout_s / 60:g}. "
                    "Exiting; the last published checkpoint is intact"))

    def _on_signals(self, signums: bytes) -> None:
        for signum in signums:
            if signum in _FINAL_SIGNALS:
                self._final_signals_seen += 1
                if self._final_signals_seen >= 2:
                    self._exit(128 + signum, (
                        f"second {signal.Signals(signum).name} during iteration "
                        f"{self._iteration} ({self._phase}): exiting now, without saving; "
                        "the last published checkpoint is intact"))
