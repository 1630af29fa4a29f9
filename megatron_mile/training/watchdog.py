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

    watchdog = Watchdog(timeout_s=600, rank=dist.get_rank(), world_size=dist.get_world_size())
    watchdog.start()
    watchdog.beat(iteration=5, phase="train step")
    ...
    watchdog.stop()

Progress is not only a phase boundary: a phase that works for long (a checkpoint written to a
loaded parallel filesystem, its checksums, an evaluation) calls :func:`report_progress` as it
goes (per evaluation iteration, per block written, read or hashed), so only a phase with *no*
progress for ``timeout_s`` counts as a hang. A rank that is done with such a phase and must wait
for slower peers calls :func:`wait_for_peers` before the collective that follows: it waits on
the c10d store (no collective, so no process-group timeout) for as long as some peer keeps
reporting progress, and the watchdog still ends it ``timeout_s`` after the last progress of
any rank. A world of one process has no peer to hang on: there the stall timer is off.

Collectives: none. Store traffic (the default process group's c10d store, worlds > 1 only):
:func:`report_progress` adds to one counter at most once per ``publish_s``;
:func:`wait_for_peers` adds to one arrival counter and polls it and the progress counter.
One thread per process.
"""

from __future__ import annotations

import itertools
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

EXIT_STALLED = 3
"""Exit code of a rank that saw no progress for the timeout (a hung or dead peer)."""

NODE_AGENT_ENV = "MILE_NODE_AGENT"
"""Set to 1 by megatron_mile/node_agent.py for the trainers it starts (see
:func:`speaks_for_node`)."""


def speaks_for_node() -> bool:
    """Whether this rank prints the one line about a dead or hung peer: under the node agent
    only local rank 0 does (the node's other trainers saw the same event, and one line per
    node is the log's rule); otherwise every rank, each being its own report."""
    return os.environ.get(NODE_AGENT_ENV) != "1" or os.environ.get("LOCAL_RANK", "0") == "0"

_FINAL_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals whose second arrival exits at once (SIGUSR1, Slurm's early warning, does not count)."""

_PROGRESS_KEY = "mile/watchdog/progress"
"""c10d store counter every rank adds to while it makes progress inside a long phase."""
_ARRIVED_KEY = "mile/watchdog/{}/arrived/{}"
"""c10d store counter of the ranks that reached the n-th :func:`wait_for_peers` of the g-th
watchdog this process started (every rank starts the same watchdogs in the same order, so
``g`` agrees; it keeps a later trainer in the same process group off earlier counters)."""
_generations = itertools.count(1)

_active: Optional["Watchdog"] = None
"""The started watchdog of this process (one per process: it owns the signal wakeup fd)."""


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
        timeout_s: longest time without progress (parallel.distributed_timeout_minutes).
        rank: global rank, for the message.
        world_size: number of ranks; with 1 there is no peer to wait for, so no stall timer.
        prog: program name that starts the message line.
        store: the c10d store shared by the ranks, for :func:`report_progress` and
            :func:`wait_for_peers` (default: the default process group's, when there is one
            and ``world_size > 1``).
    """

    def __init__(self, timeout_s: float, rank: int, world_size: int = 1,
                 prog: str = "megatron-mile-train", store: Any = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.world_size = world_size
        self.prog = prog
        self._store = store
        self._publish_s = min(1.0, self.timeout_s / 10)
        self._last_published = -math.inf
        self._waits = 0
        self._generation = 0
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
        """Start the thread; from the main thread also listen for signals. Becomes the
        process's watchdog for :func:`report_progress` and :func:`wait_for_peers`."""
        global _active
        if self._store is None and self.world_size > 1:
            self._store = _default_store()
        self._generation = next(_generations)
        if threading.current_thread() is threading.main_thread():
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(),
                                                       warn_on_full_buffer=False)
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mile-watchdog", daemon=True)
        self._thread.start()
        _active = self
        return self

    def beat(self, iteration: int, phase: str) -> None:
        """Record progress: the main thread is now in ``phase`` of ``iteration``."""
        self._iteration, self._phase = iteration, phase
        self.progress()

    def progress(self) -> None:
        """Record progress inside the current phase, and tell the peers (rate-limited)."""
        now = time.monotonic()
        self._last_beat = now
        if self._store is not None and now - self._last_published >= self._publish_s:
            self._last_published = now
            self._store.add(_PROGRESS_KEY, 1)

    def wait_for_peers(self, what: str) -> None:
        """Block until every rank has called this (the same number of times), for as long as
        some rank reports progress; see :func:`wait_for_peers`."""
        if self._store is None:
            return
        self._waits += 1
        key = _ARRIVED_KEY.format(self._generation, self._waits)
        self._last_published = -math.inf
        self.progress()  # this rank's last progress, seen by the others
        arrived = self._store.add(key, 1)
        seen = self._store.add(_PROGRESS_KEY, 0)
        phase, pause = self._phase, 0.001
        try:
            while arrived < self.world_size:
                self._phase = (f"{phase}: waiting for {self.world_size - arrived} of "
                               f"{self.world_size} ranks to finish {what}")
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
                arrived = self._store.add(key, 0)
                latest = self._store.add(_PROGRESS_KEY, 0)
                if latest != seen:  # a peer is working: not a hang
                    seen, self._last_beat = latest, time.monotonic()
        finally:
            self._phase = phase

    def where(self) -> str:
        """The last reported progress, e.g. "iteration 12 (train step)"."""
        return f"iteration {self._iteration} ({self._phase})"

    def stop(self) -> None:
        """Stop the thread and give back the signal wakeup fd."""
        global _active
        if _active is self:
            _active = None
        self._stop.set()
        if self._wake_w is not None:  # wake the thread from its poll now, not up to 1 s later
            try:
                self._wake_w.send(b"\0")  # no signal has number 0
            except OSError:  # the buffer is full of signal numbers: it wakes anyway
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._wake_w is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._wake_r.close()
            self._wake_w.close()
            self._wake_r = self._wake_w = None

    def _exit(self, code: int, message: str, quiet: bool = False) -> None:
        if not quiet:
            sys.stderr.write(f"{self.prog}: rank {self.rank}: {message}\n")
            sys.stderr.flush()
        os._exit(code)

    def _run(self) -> None:
        poll_s = min(1.0, self.timeout_s / 4)
        # poll, not select: select refuses descriptors >= 1024 (FD_SETSIZE), which a process
        # that has set up many trainers (each with its process groups' sockets) reaches.
        poller = None
        if self._wake_r is not None:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            if poller is not None:
                if poller.poll(poll_s * 1000) and not self._stop.is_set():
                    self._on_signals(self._wake_r.recv(64))
            else:
                self._stop.wait(poll_s)
            stalled = time.monotonic() - self._last_beat
            if self.world_size > 1 and stalled > self.timeout_s and not self._stop.is_set():
                self._exit(EXIT_STALLED, (
                    f"no progress for {stalled:.0f} s in iteration {self._iteration} "
                    f"({self._phase}): a peer rank is hung or dead, or this phase made no "
                    "progress for longer than parallel.distributed_timeout_minutes="
                    f"{self.timeout_s / 60:g}. "
                    "Exiting; the last published checkpoint is intact"),
                    quiet=not speaks_for_node())

    def _on_signals(self, signums: bytes) -> None:
        for signum in signums:
            if signum in _FINAL_SIGNALS:
                self._final_signals_seen += 1
                if self._final_signals_seen >= 2:
                    self._exit(128 + signum, (
                        f"second {signal.Signals(signum).name} during iteration "
                        f"{self._iteration} ({self._phase}): exiting now, without saving; "
                        "the last published checkpoint is intact"))


def report_progress() -> None:
    """Tell this process's watchdog (if one runs) that a long phase is making progress: call it
    per unit of work (an evaluation iteration, a block written, read or hashed). Cheap: a clock
    read, and at most once per ``publish_s`` a c10d store add."""
    if _active is not None:
        _active.progress()


def wait_for_peers(what: str) -> None:
    """Wait until every rank has reached this call, before a collective that follows a phase
    whose length differs between ranks (a checkpoint's files written, read or hashed).

    Unlike the collective itself, whose process-group timeout would end a rank whose peer is
    slow but working, this waits as long as some rank reports progress, and the watchdog ends
    it ``timeout_s`` after the last progress of any rank (a hung or dead peer). Every rank must
    call it the same number of times. A no-op without a running watchdog or in a world of one.
    ``what`` names the phase in the watchdog's message ("the checkpoint files").

    Collectives: none; c10d store adds (see the module docstring).
    """
    if _active is not None:
        _active.wait_for_peers(what)


def _default_store() -> Any:
    """The default process group's c10d store, or None without one."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()
