"""The publish protocol: the only order in which a save changes ``save_dir``.

    1. rank 0 removes an *unpublished* ``iter_N`` (one whose N is above the tracker's: a save
       that failed between steps 4 and 5) and any stale ``iter_N.tmp``, then creates
       ``iter_N.tmp``. A published ``iter_N`` (N <= the tracker's) is never overwritten.
    2. every rank writes its shards into ``iter_N.tmp`` (megatron ``dist_checkpointing.save``;
       with ``checkpoint.async_save`` from host copies, in a background thread: async_save.py).
    3. every rank hashes a share of the files the checkpoint's own index names
       (``checkpoint_files``: a file missing there fails the save); rank 0 writes
       ``mile_checksums.json``.
    4. rank 0 checks it still holds the lock, fsyncs, renames ``iter_N.tmp`` -> ``iter_N``
       and fsyncs ``save_dir``.
    5. rank 0 atomically replaces the tracker (temp file, fsync, ``os.replace``): the commit.
    6. rank 0 removes leftovers of crashed saves (``iter_*.tmp``, tracker temp files), then
       (``keep_last``) complete checkpoints older than the newest ``keep_last``.
A failure at any step leaves the tracker naming the previous checkpoint, which stays loadable;
an error in steps 2-5 also removes what this save wrote (best effort: what a crash leaves is
removed by the next save, step 1 or 6). So a requeued job always resumes from the newest
published checkpoint and its later saves, including the one of the same iteration, succeed.

Collectives (default group, every rank): see each public function.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CONFIG_FNAME
from megatron.core.transformer.module import MegatronModule

from megatron_mile.errors import CheckpointError
from megatron_mile.training.checkpoint.agreement import FAILURES, agree, describe, full_disk
from megatron_mile.training.checkpoint.integrity import record_checksums
from megatron_mile.training.checkpoint.state import (
    build_state,
    check_extra_state,
    current_layout,
    is_distributed,
)
from megatron_mile.training.checkpoint.storage import SyncTorchDistSaveStrategy, save_strategy
from megatron_mile.training.checkpoint_lock import CheckpointLock, LockError
from megatron_mile.utils import atomic_write_text, fsync_path, temp_file_prefix

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
FORMAT_NAME = "megatron-mile"
FORMAT_VERSION = 2
"""2: RNG state as tensors, checksums. 1 (RNG as a pickled ShardedObject, no checksums) still
loads, without its RNG state, which only an unrestricted unpickler could read."""
READABLE_VERSIONS = (1, 2)
META_KEY = "mile_checkpoint"
_TMP_DIR = re.compile(r"^iter_\d{7}\.tmp$")
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def checkpoint_path(ckpt_dir: str, iteration: int) -> str:
    """Directory of the (complete) checkpoint of ``iteration`` under ``ckpt_dir``."""
    return os.path.join(ckpt_dir, f"iter_{iteration:07d}")


def _write_tracker(ckpt_dir: str, iteration: int) -> None:
    """Atomically replace the tracker file (write a temp file, fsync, ``os.replace``)."""
    atomic_write_text(os.path.join(ckpt_dir, TRACKER_FILENAME), f"{iteration}\n")


def _prepare(save_dir: str, iteration: int, final: str, tmp: str) -> None:
    """Step 1 of the publish protocol (rank 0): make room for ``iter_N.tmp``."""
    os.makedirs(save_dir, exist_ok=True)
    published = find(save_dir)
    if os.path.exists(final):
        if published is not None and iteration <= published:
            raise CheckpointError(
                f"{final} already exists and the tracker names iteration {published}: "
                "published checkpoints are never overwritten; set another checkpoint.save "
                "directory, or move that checkpoint away by hand")
        logger.warning("replacing %s: it was never published (a save that failed before "
                       "updating %s)", final, TRACKER_FILENAME)
        shutil.rmtree(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)


def _publish(save_dir: str, iteration: int, final: str, tmp: str) -> None:
    """Steps 4-5 of the publish protocol (rank 0): rename, then commit the tracker."""
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_path(save_dir)
    _write_tracker(save_dir, iteration)


def _remove_leftovers(save_dir: str) -> None:
    """Step 6 (rank 0, best effort): stale ``iter_*.tmp`` dirs and tracker temp files."""
    prefix = temp_file_prefix(TRACKER_FILENAME)
    for name in os.listdir(save_dir):
        full = os.path.join(save_dir, name)
        try:
            if _TMP_DIR.match(name) and os.path.isdir(full):
                shutil.rmtree(full)
            elif name.startswith(prefix) and os.path.isfile(full):
                os.remove(full)
            else:
                continue
            logger.info("removed %s, left over from a crashed save", full)
        except OSError as exc:
            logger.warning("could not remove %s (left over from a crashed save): %s", full, exc)


def _remove_old(save_dir: str, keep_last: Optional[int]) -> None:
    """Step 6, retention (rank 0, best effort): remove complete checkpoints older than the
    newest ``keep_last`` (never the published one, nor anything newer than it), one log line
    each. Local, no collectives."""
    published = find(save_dir)
    if not keep_last or published is None:
        return
    complete = sorted(int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(save_dir))
                      if m and int(m.group(1)) <= published and os.path.isfile(
                          os.path.join(checkpoint_path(save_dir, int(m.group(1))),
                                       CONFIG_FNAME)))
    for iteration in complete[:-keep_last]:
        if iteration == published:
            continue
        path = checkpoint_path(save_dir, iteration)
        try:
            shutil.rmtree(path)
            logger.info("removed %s (checkpoint.keep_last=%d)", path, keep_last)
        except OSError as exc:
            logger.warning("could not remove %s (checkpoint.keep_last=%d): %s", path,
                           keep_last, exc)


class SaveRequest:
    """One save of ``iteration`` into ``save_dir``, through the publish protocol's steps:
    :meth:`begin` (step 1), :meth:`write` (step 2, or its staging), :meth:`finish` (steps
    3-6) and, on failure, :meth:`abort`. ``save`` runs them in a row; async_save.py runs the
    write of step 2 in a background thread between :meth:`write` and :meth:`finish`."""

    def __init__(self, save_dir: str, iteration: int, *, checksums: bool = True,
                 lock: Optional[CheckpointLock] = None, keep_last: Optional[int] = None
                 ) -> None:
        if iteration < 0:
            raise CheckpointError(f"iteration must be >= 0, got {iteration}")
        self.save_dir, self.iteration = save_dir, iteration
        self.checksums, self.lock, self.keep_last = checksums, lock, keep_last
        self.final = checkpoint_path(save_dir, iteration)
        self.tmp = self.final + ".tmp"
        self.what = f"save_checkpoint({save_dir!r}, {iteration})"

    def begin(self) -> None:
        """Step 1 on rank 0. Collectives: one ``all_gather_object`` agreement."""
        error = None
        if dist.get_rank() == 0:
            try:
                _prepare(self.save_dir, self.iteration, self.final, self.tmp)
            except (OSError, CheckpointError) as exc:
                error = f"preparing {self.tmp}: {describe(exc)}"
        agree(error, self.what, self.iteration)

    def write(self, model: list[MegatronModule], optimizer: Any, opt_param_scheduler: Any,
              extra_state: dict, *, thread_count: int, distopt_sharding: str,
              stage: bool = False) -> SyncTorchDistSaveStrategy:
        """Step 2: megatron ``dist_checkpointing.save`` into ``iter_N.tmp`` (``common.pt`` by
        rank 0, ``metadata.json``, the shards), or with ``stage`` everything but the shards,
        which are copied to host memory (the returned strategy's ``staged``).

        Collectives: megatron's (sharding validation, the DP save distribution, a barrier),
        torch DCP's unless ``stage``, then one ``all_gather_object`` agreement.
        """
        error, inner = None, None
        try:
            state = build_state(model, optimizer, opt_param_scheduler, is_loading=False,
                                with_rng=True, distopt_sharding=distopt_sharding)
            state["extra_state"] = extra_state
            state[META_KEY] = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "iteration": self.iteration,
                "layout": current_layout(), "num_chunks": len(model),
                "has_optimizer": optimizer is not None,
                "has_scheduler": opt_param_scheduler is not None,
                "distopt_sharding": distopt_sharding,
                "distributed_optimizer": is_distributed(optimizer),
                "rng_keys": sorted(state["rng_state"]),
                "has_checksums": self.checksums,
            }
            strategy, inner = save_strategy(thread_count, stage=stage)
            dist_checkpointing.save(state, self.tmp, sharded_strategy=strategy,
                                    validate_access_integrity=True)
        except FAILURES as exc:  # reported on every rank below
            error = self.write_error(exc)
        agree(error, self.what)
        return inner

    def write_error(self, exc: BaseException) -> str:
        """The one line for a failed write of ``iter_N.tmp`` (a full disk named as such)."""
        return f"writing {self.tmp}: {full_disk(self.save_dir) or describe(exc)}"

    def finish(self, hashed: Optional[tuple] = None) -> str:
        """Steps 3-6: checksums (``hashed``: this rank's share, already computed), the lock
        check, rename and tracker on rank 0, then the leftovers and retention. Returns the
        published directory.

        Collectives: two ``all_gather_object`` for the checksums (none without them), one
        agreement on the publish.
        """
        if self.checksums:
            record_checksums(self.tmp, self.what, hashed)
        error = None
        if dist.get_rank() == 0:
            try:
                if self.lock is not None:
                    self.lock.verify()
                _publish(self.save_dir, self.iteration, self.final, self.tmp)
            except LockError as exc:
                error = f"publishing {self.final}: {exc}"
            except OSError as exc:
                error = f"publishing {self.final}: {describe(exc)}"
        agree(error, self.what)
        if dist.get_rank() == 0:
            _remove_leftovers(self.save_dir)
            _remove_old(self.save_dir, self.keep_last)
        return self.final

    def abort(self, exc: CheckpointError) -> CheckpointError:
        """After a failure every rank saw (every rank is past its writes): rank 0 removes this
        save's partial output; the error to raise names the checkpoint that stays latest."""
        published = find(self.save_dir)
        if dist.get_rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if published != self.iteration:
                shutil.rmtree(self.final, ignore_errors=True)
        last = "none" if published is None else f"iteration {published}"
        return CheckpointError(f"{exc}; the last published checkpoint ({last}) is untouched")


def save(
    save_dir: str,
    iteration: int,
    model: list[MegatronModule],
    optimizer: Any,
    opt_param_scheduler: Any,
    extra_state: dict,
    *,
    thread_count: int = 1,
    distopt_sharding: str = "dp_reshardable",
    checksums: bool = True,
    lock: Optional[CheckpointLock] = None,
    keep_last: Optional[int] = None,
) -> str:
    """Save everything needed to resume at ``iteration``, synchronously; return the
    checkpoint directory (``AsyncSaver.save`` is the background version).

    Follows the publish protocol of the module docstring: after any failure the tracker still
    names the previous checkpoint, and a later save of the same iteration succeeds.

    Args:
        save_dir: checkpoint root, shared by all ranks; created if missing.
        iteration: training iteration this state belongs to (>= 0).
        model: this rank's model chunks (megatron DDP / Float16Module / GPTModel), in order.
        optimizer: a megatron optimizer (also the distributed one), or None.
        opt_param_scheduler: an ``OptimizerParamScheduler``, or None.
        extra_state: identical on all ranks; plain Python values (step, consumed samples,
            config dict). Returned by ``load``.
        thread_count: writer threads per rank (more files, faster on parallel filesystems).
        distopt_sharding: distributed optimizer state format (megatron's
            ``distrib_optim_sharding_type``, Megatron-LM's default): ``"dp_reshardable"``
            (every rank writes its shard; optimizer state reloads at the same TP/PP, any DP)
            or ``"fully_reshardable"`` (any layout; in megatron-core 0.16.1 its load fails
            with torch Adam (KeyError 'step'), i.e. it needs TE/Apex FusedAdam). The older
            ``fully_sharded_model_space`` default is rejected by 0.16.1 (flattened
            ShardedTensors are unsupported). Ignored without the distributed optimizer.
        checksums: record every file's size and SHA-256 (each rank hashes a share) for
            ``load(verify_checksums=True)``; cost in docs/benchmarks.md.
        lock: the directory's lock (``lock_save_dir``; rank 0's), verified right before the
            publish: a run that lost its lock to another never publishes.
        keep_last: after the publish, keep only the newest this many complete checkpoints
            (rank 0; None or 0: all).

    Collectives (default group, every rank): 5 ``all_gather_object`` agreements and one
    ``broadcast_object_list``, plus megatron ``dist_checkpointing.save`` (sharding
    validation, plan exchange, barriers).

    Raises:
        CheckpointError: on every rank, with one line: a published ``iter_N`` exists, the
            directory cannot be prepared, or any rank failed to write (e.g. a full disk:
            the message names the file and the OS error).
    """
    check_extra_state(extra_state)
    request = SaveRequest(save_dir, iteration, checksums=checksums, lock=lock,
                          keep_last=keep_last)
    request.begin()
    try:
        request.write(model, optimizer, opt_param_scheduler, extra_state,
                      thread_count=thread_count, distopt_sharding=distopt_sharding)
        return request.finish()
    except CheckpointError as exc:
        raise request.abort(exc) from None


def lock_save_dir(save_dir: str, stale_minutes: float) -> Optional[CheckpointLock]:
    """Take ``save_dir``'s lock for this run (``checkpoint_lock``): global rank 0 holds it and
    gets it back, the other ranks get None. Call at setup, before loading or saving.

    Collectives: one ``all_gather_object`` agreement (default group).

    Raises:
        CheckpointError: on every rank, with one line naming the holder, if another live run
            holds the directory (or it cannot be created).
    """
    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = CheckpointLock(save_dir, stale_s=stale_minutes * 60).acquire()
        except LockError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"creating its lock file: {full_disk(save_dir) or describe(exc)}"
    agree(error, f"locking checkpoint.save={save_dir}")
    return lock



def find(ckpt_dir: str) -> int | None:
    """Iteration named by ``ckpt_dir``'s tracker file; None if there is no tracker (fresh run).

    Local: no collectives, reads one file. Does not check the checkpoint itself
    (``load`` does).

    Raises:
        CheckpointError: the tracker exists but is unreadable or not a non-negative integer.
    """
    path = os.path.join(ckpt_dir, TRACKER_FILENAME)
    if not os.path.exists(path):
        return None
    fix = ("write the iteration of a complete iter_NNNNNNN directory into it, or delete it "
           "to start fresh")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"tracker {path} is corrupt (not UTF-8 text); {fix}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read tracker {path}: {describe(exc)}") from exc
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(
            f"tracker {path} is corrupt (content {text[:40]!r}, expected an iteration number); "
            f"{fix}")
    return int(text)

