"""Asynchronous saves (``checkpoint.async_save``): stage on the main thread, write in the
background, publish on the main thread at a later step boundary.

The design follows megatron-core's ``async_utils`` (``maybe_finalize_async_save``: the ranks
agree at a step boundary that every background write is done, then finalize on the main
thread) and torchtitan's async mode (torch DCP's save on a dedicated gloo group, from host
copies):

1. :meth:`AsyncSaver.save`, main thread: step 1 of the publish protocol (protocol.py), then
   megatron's save with the shards *staged*: ``common.pt`` and ``metadata.json`` are written,
   every tensor this rank writes is copied to host memory (one copy of the rank's state,
   held until the write ends). Training resumes.
2. A background thread writes the staged shards with torch DCP on its own gloo group (its
   collectives never share a group with training's) and hashes this rank's share of the
   files. It reports progress to a counter, not to the watchdog (whose store waits only the
   main thread may make) and runs no agreement.
3. :meth:`AsyncSaver.finalize`, main thread: without ``blocking``, one ``all_reduce`` of a
   "done" flag (default group) at each step boundary while a save is in flight; once every
   rank is done, the checksums, rename and tracker exactly as a synchronous save. With
   ``blocking`` (the next save, the end of the run), it waits for the local write with
   progress, then for the peers (``wait_for_peers``), then finalizes.

A failure anywhere raises the synchronous save's ``CheckpointError`` (one line naming the
iteration and the cause) on every rank at the finalize, after removing the partial output;
the tracker still names the previous checkpoint.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.module import MegatronModule

from megatron_mile.errors import CheckpointError
from megatron_mile.training.checkpoint.agreement import agree
from megatron_mile.training.checkpoint.integrity import local_digests
from megatron_mile.training.checkpoint.protocol import SaveRequest
from megatron_mile.training.checkpoint.state import check_extra_state
from megatron_mile.training.checkpoint.storage import StagedWrite
from megatron_mile.training.checkpoint_lock import CheckpointLock
from megatron_mile.training.watchdog import report_progress, wait_for_peers


class _BackgroundWrite:
    """The thread writing one staged save, and what it found: ``error`` (one line) or this
    rank's share of the digests (``hashed``)."""

    def __init__(self, request: SaveRequest, staged: StagedWrite, group: Any) -> None:
        self.request, self.staged, self.group = request, staged, group
        self.blocks = 0  # I/O blocks written or hashed: the progress the main thread reports
        self.written = threading.Event()  # this rank's files are written (or failed)
        self.hashed: Optional[tuple] = None
        self.error: Optional[str] = None
        self.thread = threading.Thread(target=self._run, name="mile-async-save", daemon=True)
        self.thread.start()

    def _tick(self) -> None:
        self.blocks += 1

    def _run(self) -> None:
        try:
            self.staged.write(self.group, self._tick, written=self.written.set)
        except BaseException as exc:  # noqa: BLE001 - reported at the finalize
            self.error = self.request.write_error(exc)
        finally:
            self.written.set()
            self.staged = None  # the host copies go as soon as the files are written
        if self.error is None and self.request.checksums:
            self.hashed = local_digests(self.request.tmp, self._tick)

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, until: Callable[[], bool]) -> None:
        """Wait for ``until()``, telling the watchdog about every block written or hashed."""
        seen = self.blocks
        while not until():
            self.thread.join(timeout=0.05)
            if self.blocks != seen:
                seen = self.blocks
                report_progress()


class AsyncSaver:
    """At most one checkpoint save in flight, written in the background (module docstring).

    Every rank makes the same calls at the same iterations (``save``, ``finalize``), on the
    main thread.
    """

    def __init__(self, timeout_s: float = 24 * 3600.0,
                 log: Callable[[str], None] = print) -> None:
        """``timeout_s``: timeout of the background writer's gloo group (torch DCP's plan
        exchange and results gather there). Long on purpose: a peer still writing to a slow
        filesystem must not fail the save; a dead or hung peer is caught on the main thread
        instead (the step-boundary all-reduce, or a blocking finalize that sees no progress,
        ends in the watchdog). ``log``: where the "staged", "waiting" and "saved" lines go."""
        self.timeout_s = timeout_s
        self.log = log
        self._group: Any = None
        self._pending: Optional[_BackgroundWrite] = None
        self._started = 0.0

    @property
    def in_flight(self) -> Optional[int]:
        """The iteration being written in the background, or None."""
        return None if self._pending is None else self._pending.request.iteration

    def save(self, save_dir: str, iteration: int, model: list[MegatronModule], optimizer: Any,
             opt_param_scheduler: Any, extra_state: dict, *, thread_count: int = 1,
             distopt_sharding: str = "dp_reshardable", checksums: bool = True,
             lock: Optional[CheckpointLock] = None, keep_last: Optional[int] = None) -> None:
        """Stage the state for ``iteration`` and start writing it; arguments as
        ``checkpoint.save``. A save still in flight is finished first (one log line).

        Collectives (default group, every rank): those of a blocking :meth:`finalize` if a
        save is in flight; one agreement (step 1); megatron's save without the shard writes
        (sharding validation, the DP save distribution, a barrier) and one agreement; the
        first time, ``new_group`` for the writer's gloo group.

        Raises:
            CheckpointError: on every rank, with one line, as ``checkpoint.save``: a failed
                earlier save (at its finalize), or this one failing before the background
                write (the directory cannot be prepared, a rank cannot stage).
        """
        if self._pending is not None:
            self.log(f"waiting for the checkpoint save of iteration {self.in_flight} to "
                     f"finish before saving iteration {iteration} (checkpoint.async_save: at "
                     "most one save in flight)")
            self.finalize(blocking=True)
        check_extra_state(extra_state)
        request = SaveRequest(save_dir, iteration, checksums=checksums, lock=lock,
                              keep_last=keep_last)
        start = time.time()
        request.begin()
        try:
            inner = request.write(model, optimizer, opt_param_scheduler, extra_state,
                                  thread_count=thread_count, distopt_sharding=distopt_sharding,
                                  stage=True)
        except CheckpointError as exc:
            raise request.abort(exc) from None
        if self._group is None:
            self._group = dist.new_group(backend="gloo",
                                         timeout=datetime.timedelta(seconds=self.timeout_s))
        self._started = time.time()
        self._pending = _BackgroundWrite(request, inner.staged, self._group)
        self.log(f"staged checkpoint of iteration {iteration} in host memory in "
                 f"{self._started - start:.1f} s; writing it in the background")

    def finalize(self, blocking: bool = False) -> Optional[str]:
        """Publish the save in flight once every rank has written it; return its directory,
        or None (nothing in flight, or, without ``blocking``, some rank still writing).

        Collectives (default group, every rank, main thread): without ``blocking``, one
        ``all_reduce`` (MIN) of this rank's "done" flag while a save is in flight; then, once
        done, the synchronous save's steps 3-6 (an agreement on the writes, two
        ``all_gather_object`` for the checksums, one agreement on the publish). With
        ``blocking``, a store wait for the peers' writes (``wait_for_peers``) first.

        Raises:
            CheckpointError: on every rank, with one line naming the iteration and the cause;
                the previous checkpoint stays the latest.
        """
        pending = self._pending
        if pending is None:
            return None
        if blocking:
            pending.wait(pending.written.is_set)
            wait_for_peers("writing the checkpoint files")
            pending.wait(lambda: pending.done)
        else:
            flag = torch.tensor([1 if pending.done else 0], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if not flag.item():
                return None
        self._pending = None
        request = pending.request
        try:
            agree(pending.error, request.what)
            path = request.finish(pending.hashed)
        except CheckpointError as exc:
            raise request.abort(exc) from None
        self.log(f"saved checkpoint at iteration {request.iteration} to {path} "
                 f"({time.time() - self._started:.1f} s in the background)")
        return path
