"""Atomic, reshardable, verified checkpoints with megatron-core ``dist_checkpointing``.

Layout of ``save_dir``::

    latest_checkpointed_iteration.txt     # "<N>\\n": names the one *published* checkpoint
    iter_0000200/                          # a complete checkpoint
        metadata.json  common.pt  .metadata  __<rank>_<i>.distcp  mile_checksums.json
    iter_0000400.tmp/                      # a save in progress, or one that crashed: never loaded

What one checkpoint holds (keys of the megatron sharded state dict):
    ``model`` (one chunk) or ``model0``, ``model1``, ... (virtual pipeline chunks): each chunk's
        ``sharded_state_dict()``. Stored by global tensor key, so it loads into another TP/PP
        layout.
    ``optimizer``: ``optimizer.sharded_state_dict(model_sd)`` (also the distributed optimizer).
    ``opt_param_scheduler``, ``extra_state``, ``mile_checkpoint`` (format version and layout):
        common state, written once by rank 0 into ``common.pt``.
    ``rng_state``: per-rank tensors (python, numpy, torch CPU, CUDA and megatron's RNG tracker
        states), each a ShardedTensor of global shape ``[world_size, ...]``. Restored only into
        the same layout (rank r's state means nothing to another layout's rank r).
    ``mile_checksums.json``: size and SHA-256 of every other file, written before publishing.

One run per ``save_dir``: the run that saves holds ``save_dir/mile.lock`` for its life
(``lock_save_dir``, ``checkpoint_lock.py``); a second run is refused naming the holder.

Publish protocol (``save_checkpoint``), the only order in which a save changes ``save_dir``:
    1. rank 0 removes an *unpublished* ``iter_N`` (one whose N is above the tracker's: a save
       that failed between steps 4 and 5) and any stale ``iter_N.tmp``, then creates
       ``iter_N.tmp``. A published ``iter_N`` (N <= the tracker's) is never overwritten.
    2. every rank writes its shards into ``iter_N.tmp`` (megatron ``dist_checkpointing.save``).
    3. every rank hashes a share of the files the checkpoint's own index names
       (``checkpoint_files``: a file missing there fails the save); rank 0 writes
       ``mile_checksums.json``.
    4. rank 0 checks it still holds the lock, fsyncs, renames ``iter_N.tmp`` -> ``iter_N``
       and fsyncs ``save_dir``.
    5. rank 0 atomically replaces the tracker (temp file, fsync, ``os.replace``): the commit.
    6. rank 0 removes leftovers of crashed saves (``iter_*.tmp``, tracker temp files).
A failure at any step leaves the tracker naming the previous checkpoint, which stays loadable;
an error in steps 2-5 also removes what this save wrote (best effort: what a crash leaves is
removed by the next save, step 1 or 6). So a requeued job always resumes from the newest
published checkpoint and its later saves, including the one of the same iteration, succeed.

Loading never runs code from the checkpoint directory: ``common.pt`` and every tensor and
byte item go through ``torch.load(weights_only=True)`` (forced for megatron's and torch's own
calls during the load), and torch DCP's pickled ``.metadata`` index is first read with an
allow-listing unpickler that admits only the classes torch DCP writes. With
``verify_checksums`` every file's SHA-256 is checked first (each rank hashes a share), so
flipped bytes inside a tensor are refused rather than loaded.

Why a custom save strategy: megatron's default ``torch_dist`` save (``TorchDistSaveShardedStrategy``)
writes through ``FileSystemWriterAsync`` even when called synchronously: it creates a
``multiprocessing`` spawn-context ``Manager()`` (``filesystem_async._get_write_results_queue``) and
forks one writer process per bucket (``write_preloaded_data_multiproc``). Starting those fails
in daemonic processes ("daemonic processes are not allowed to have children"), and a spawned
Manager re-imports the launching script's ``__main__``: a training script without a
``__main__`` guard re-runs its own rendezvous there and ``Manager()`` never returns.
``SyncTorchDistSaveStrategy`` writes the same ``torch_dist`` format with
torch.distributed.checkpoint's synchronous ``FileSystemWriter`` in this process (optional
writer threads, no subprocesses), so loading uses megatron's stock ``torch_dist`` load strategy.

Failure model: every rank validates what it will read and the ranks agree (one
``all_gather_object``) before any megatron collective starts, so a missing, incomplete, corrupt
or unsafe checkpoint raises ``CheckpointError`` on every rank, with one line, instead of a hang.
A rank that dies *inside* megatron's save/load collectives is bounded by the process group
timeout and the trainer's watchdog. All ranks must see the same filesystem.

Collectives (all on the default/WORLD group, all ranks must call): see each public function.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.core import CONFIG_FNAME
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    MCoreSavePlanner,
    TorchDistLoadShardedStrategy,
    TorchDistSaveShardedStrategy,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import unwrap_model

from megatron_mile.errors import CheckpointError
from megatron_mile.training.checkpoint_lock import CheckpointLock, LockError
from megatron_mile.training.watchdog import report_progress, wait_for_peers
from megatron_mile.utils import (
    CHECKSUM_ALGORITHM,
    atomic_write_text,
    file_checksum,
    fsync_path,
    temp_file_prefix,
)

__all__ = [
    "CheckpointError",
    "SyncTorchDistSaveStrategy",
    "TRACKER_FILENAME",
    "checkpoint_files",
    "checkpoint_path",
    "find_latest_checkpoint",
    "load_checkpoint",
    "lock_save_dir",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKSUM_FILENAME = "mile_checksums.json"
"""Per-file size and digest. Not in megatron's ``metadata.json``: megatron-core's
``maybe_load_config`` builds ``CheckpointingConfig(**json)`` and rejects unknown keys."""
FORMAT_NAME = "megatron-mile"
FORMAT_VERSION = 2
"""2: RNG state as tensors, checksums. 1 (RNG as a pickled ShardedObject, no checksums) still
loads, without its RNG state, which only an unrestricted unpickler could read."""
_READABLE_VERSIONS = (1, 2)
_META_KEY = "mile_checkpoint"
_DCP_METADATA = ".metadata"
_TMP_DIR = re.compile(r"^iter_\d{7}\.tmp$")


# torch.distributed.checkpoint raises CheckpointException, a BaseException (not Exception),
# after it has gathered every rank's failure: catch it alongside ordinary errors.
_FAILURES = (Exception, CheckpointException)




def checkpoint_path(ckpt_dir: str, iteration: int) -> str:
    """Directory of the (complete) checkpoint of ``iteration`` under ``ckpt_dir``."""
    return os.path.join(ckpt_dir, f"iter_{iteration:07d}")


# --------------------------------------------------------------------------- save strategy


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's ``torch_dist`` format, written synchronously in-process (see module doc).

    Uses megatron's own key translation and ``MCoreSavePlanner`` (so the files are what the
    stock ``torch_dist`` load strategy expects) with torch's synchronous ``FileSystemWriter``.
    Collectives: those of ``torch.distributed.checkpoint.save`` on the default group (plan
    gather/scatter, results gather, a final barrier-like broadcast).
    """

    def __init__(self, thread_count: int = 1) -> None:
        super().__init__("torch_dist", 1, thread_count=thread_count)

    def async_save(self, sharded_state_dict, checkpoint_dir):  # noqa: D102
        raise NotImplementedError("SyncTorchDistSaveStrategy only saves synchronously")

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        """Write this rank's shards and (coordinator) the ``.metadata`` file."""
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = _ProgressWriter(
            str(checkpoint_dir), single_file_per_rank=True, sync_files=True,
            thread_count=self.thread_count,
        )
        planner = MCoreSavePlanner(
            dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False,
            can_run_decentralized_global_plan=False,
        )
        dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)


# --------------------------------------------------------------------------- progress


_IO_BLOCK = 1 << 20
"""Bytes a checkpoint stream reads or writes between two watchdog heartbeats."""


class _ProgressStream:
    """A file object whose reads and writes go in :data:`_IO_BLOCK` pieces, each reported to
    the watchdog (``report_progress``): a GB written to a loaded filesystem is many heartbeats,
    not one silent call. Everything else (seek, tell, fileno, close) is the file's own."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _IO_BLOCK):
            self._raw.write(view[start:start + _IO_BLOCK])
            report_progress()
        return len(view)

    def readinto(self, buffer: Any) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view):
            n = self._raw.readinto(view[done:done + _IO_BLOCK])
            if not n:
                break
            done += n
            report_progress()
        return done

    def read(self, size: Optional[int] = -1) -> bytes:
        parts = []
        left = math.inf if size is None or size < 0 else size
        while left > 0:
            chunk = self._raw.read(int(min(left, _IO_BLOCK)))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
            report_progress()
        return b"".join(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _ProgressFileSystem(FileSystem):
    """torch DCP's local filesystem whose streams report progress (:class:`_ProgressStream`)."""

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            yield _ProgressStream(stream)


class _ProgressStorage:
    """Mixin for torch DCP's filesystem writer and reader: streams with progress
    (:class:`_ProgressFileSystem`), then a wait for the slower ranks' I/O (``wait_for_peers``)
    before torch DCP's results gather, whose process-group timeout would otherwise end a rank
    whose peer is still writing to or reading from a slow filesystem."""

    _phase = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fs = _ProgressFileSystem()

    def _after_io(self, future: Any) -> Any:
        future.wait()
        wait_for_peers(self._phase)
        return future


class _ProgressWriter(_ProgressStorage, dcp.FileSystemWriter):
    _phase = "writing the checkpoint files"

    def write_data(self, plan: Any, planner: Any) -> Any:
        return self._after_io(super().write_data(plan, planner))


class _ProgressReader(_ProgressStorage, dcp.FileSystemReader):
    _phase = "reading the checkpoint files"

    def read_data(self, plan: Any, planner: Any) -> Any:
        return self._after_io(super().read_data(plan, planner))


class ProgressTorchDistLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron's stock ``torch_dist`` load, read through :class:`_ProgressReader`: the same
    key translation and ``MCoreLoadPlanner`` as ``TorchDistLoadShardedStrategy.load``, whose
    reader cannot be chosen. Collectives: those of ``torch.distributed.checkpoint.load``
    (plan gather/scatter, a read-results gather), after a store wait for every rank's reads."""

    def load(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Any) -> dict:
        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        original = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = (
            _replace_state_dict_keys_with_sharded_keys(sharded_state_dict))
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, True)
        dcp.load(
            pyt_state_dict, storage_reader=_ProgressReader(checkpoint_dir),
            planner=MCoreLoadPlanner(
                shapes_validation_sharded_tensors=[
                    t for t in tensors if not t.allow_shape_mismatch],
                allow_shape_mismatch_sharded_tensors={
                    t.key: t for t in tensors if t.allow_shape_mismatch}))
        state = {k: _unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        state = _replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
        _restore_dict_types(state, original)
        return state


def _save_strategy(thread_count: int) -> Any:
    """Sync torch_dist strategy, save work spread over data-parallel replicas when DP > 1."""
    strategy = SyncTorchDistSaveStrategy(thread_count=thread_count)
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
        # Each DP replica writes a share of the replicated tensors instead of DP rank 0 all.
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    return strategy


# --------------------------------------------------------------------------- agreement


def _gather(local_error: str | None, value: Any = None) -> list[tuple[str | None, Any]]:
    """Every rank's ``(error, value)``. Collectives: one ``all_gather_object``, default group,
    after a store wait for every rank (``wait_for_peers``: a slow peer's file operations before
    this point do not time the gather out)."""
    wait_for_peers("its checkpoint files")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local_error, value))
    return gathered


def _raise_errors(gathered: list[tuple[str | None, Any]], what: str) -> None:
    """Raise one ``CheckpointError`` line if any rank reported an error: ranks with the same
    message are named together ("ranks 0,1: ..."), different messages joined by "; "."""
    by_message: dict[str, list[int]] = {}
    for rank, (err, _) in enumerate(gathered):
        if err is not None:
            by_message.setdefault(err, []).append(rank)
    if not by_message:
        return
    parts = [f"{'rank' if len(ranks) == 1 else 'ranks'} {','.join(map(str, ranks))}: {msg}"
             for msg, ranks in list(by_message.items())[:4]]
    if len(by_message) > 4:
        parts.append(f"... and {len(by_message) - 4} other errors (see each rank's log)")
    raise CheckpointError(f"{what} failed: " + "; ".join(parts))


def _agree(local_error: str | None, what: str, value: Any = None) -> Any:
    """Raise ``CheckpointError`` on every rank if any rank has an error or values differ.

    Collectives: one ``all_gather_object`` of ``(local_error, value)`` on the default group.
    Returns the (common) ``value``.
    """
    gathered = _gather(local_error, value)
    _raise_errors(gathered, what)
    values = {repr(v) for _, v in gathered}
    if len(values) > 1:
        raise CheckpointError(
            f"{what}: ranks disagree ({[v for _, v in gathered]}); all ranks must see the "
            "same checkpoint directory (a shared filesystem) and pass the same arguments"
        )
    return value


def _root_cause(exc: BaseException) -> BaseException:
    """The error worth reporting: the first OSError behind ``exc`` (a full disk, a missing
    file), else the innermost failure, looking through torch DCP's per-rank
    ``CheckpointException`` and exception chains."""
    seen: set[int] = set()
    todo, innermost = [exc], exc
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError):
            return cur
        if isinstance(cur, CheckpointException):
            todo.extend(failure[0] for failure in cur.failures.values())
        else:
            innermost = cur
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    return innermost


def _full_disk(path: str) -> Optional[str]:
    """A note if the filesystem holding ``path`` has (almost) no space left: torch's zip
    writer reports a full disk as "unexpected pos" instead of the OSError behind it."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    if free >= 1 << 20:
        return None
    return (f"No space left on device ({free} bytes free on the filesystem of {path}); free "
            "space there or set checkpoint.save to another filesystem")


def _describe(exc: BaseException) -> str:
    """One line for the collective error; the full traceback goes to this rank's debug log."""
    logger.debug("rank %d: checkpoint operation failed", dist.get_rank(), exc_info=exc)
    if isinstance(exc, CheckpointError):
        return str(exc)
    root = _root_cause(exc)
    text = " ".join(f"{type(root).__name__}: {root}".split())
    if "Weights only load failed" in text:  # torch.load(weights_only=True) refused something
        found = re.search(r"(?:Trying to load u|U)nsupported (?:global: )?(?:GLOBAL )?\S+", text)
        detail = found.group(0) if found else "not a weights-only file"
        return (f"a file holds pickled objects beyond tensors and plain values ({detail}); "
                "refusing to load it (a crafted file could run code): restore the checkpoint "
                "from a trusted copy")
    return text if len(text) <= 400 else f"{text[:200]} [...] {text[-200:]}"


# --------------------------------------------------------------------------- safe reading

# Everything torch DCP (torch 2.13) pickles into ``.metadata`` for megatron's torch_dist format
# (recorded from the checkpoints of every layout the tests save): its metadata dataclasses and
# enum, the storage path, torch.Size and dtypes. Anything else is refused.
_DCP_METADATA_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    # torch.layout pickles as _get_layout("torch.strided"), a name lookup (torch's own
    # weights_only unpickler admits it too).
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}) | frozenset(
        name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)),
    "pathlib": frozenset({"PosixPath", "PurePosixPath"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch DCP's ``.metadata`` index, admitting only the classes DCP writes."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.path} refers to {module}.{name}, which torch.distributed.checkpoint never "
            "writes: refusing to unpickle it (a crafted file could run code). Restore the "
            "checkpoint from a trusted copy")


def read_dcp_metadata(path: str) -> Any:
    """Read the torch DCP index ``path/.metadata`` with the allow-listing unpickler.

    Raises:
        CheckpointError: the file is missing, corrupt, or names a class DCP does not write.
    """
    file = os.path.join(path, _DCP_METADATA)
    try:
        with open(file, "rb") as f:
            return _MetadataUnpickler(f, file).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"tensor index {file} is missing or corrupt ({_describe(exc)})"
                              ) from exc


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make every ``torch.load`` in this process ``weights_only=True`` for the duration.

    torch reads these variables on each call (``torch/serialization.py``), and the forcing one
    wins over an explicit ``weights_only=False``: torch DCP's ``DefaultLoadPlanner.load_bytes``
    passes False for byte items, and megatron's common strategy leaves it unset.
    """
    saved = {k: os.environ.get(k) for k in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(_FORCE_NO_WEIGHTS_ONLY, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- checksums


def _hash_share(path: str, names: Sequence[str]) -> dict[str, list]:
    """``{name: [size, digest]}`` for this rank's share ``names[rank::world]``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return {name: [os.path.getsize(os.path.join(path, name)),
                   file_checksum(os.path.join(path, name), progress=report_progress)]
            for name in names[rank::world]}


def checkpoint_files(path: str) -> list[str]:
    """The files checkpoint ``path`` consists of, from its own index, never from a directory
    listing (which would take whatever happens to be there): megatron's ``metadata.json`` and
    ``common.pt``, torch DCP's ``.metadata`` and every data file it references.

    Raises:
        CheckpointError: the index is unreadable, or a file it names is missing.
    """
    names = {CONFIG_FNAME, COMMON_STATE_FNAME, _DCP_METADATA}
    names.update(info.relative_path for info in read_dcp_metadata(path).storage_data.values())
    missing = sorted(n for n in names if not os.path.isfile(os.path.join(path, n)))
    if missing:
        raise CheckpointError(
            f"{path} is missing {', '.join(missing)}, named by its index (removed by another "
            "process during the save?); it is not published")
    return sorted(names)


def _record_checksums(path: str, what: str) -> None:
    """Hash every file of ``path`` (``checkpoint_files``: a share per rank) and write
    ``CHECKSUM_FILENAME`` (rank 0).

    Collectives: two ``all_gather_object`` (the file list and digests, then rank 0's write
    result), default group. Every rank reads the index: a missing file fails every rank.
    """
    error, digests = None, None
    try:
        digests = _hash_share(path, checkpoint_files(path))
    except (OSError, CheckpointError) as exc:
        error = f"hashing {path}: {_describe(exc)}"
    gathered = _gather(error, digests)
    _raise_errors(gathered, what)
    error = None
    if dist.get_rank() == 0:
        files: dict[str, list] = {}
        for _, share in gathered:
            files.update(share)
        try:
            with open(os.path.join(path, CHECKSUM_FILENAME), "w", encoding="utf-8") as f:
                json.dump({"algorithm": CHECKSUM_ALGORITHM, "files": files}, f, indent=1,
                          sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            error = f"writing {os.path.join(path, CHECKSUM_FILENAME)}: {_describe(exc)}"
    _agree(error, what)


def _verify_checksums(path: str, fix: str) -> None:
    """Check sizes of all files and the digests of this rank's share against
    ``CHECKSUM_FILENAME``. Local: no collectives (the caller agrees on the outcome)."""
    file = os.path.join(path, CHECKSUM_FILENAME)
    try:
        with open(file, encoding="utf-8") as f:
            recorded = json.load(f)
        algorithm, files = recorded["algorithm"], dict(recorded["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {CHECKSUM_FILENAME} is missing or corrupt "
                              f"({_describe(exc)}); {fix}") from exc
    if algorithm != CHECKSUM_ALGORITHM:
        raise CheckpointError(f"{file}: checksum algorithm {algorithm!r} is not "
                              f"{CHECKSUM_ALGORITHM!r}; {fix}")
    names = sorted(files)
    for name in names:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path} is missing file {name}; {fix}")
        if os.path.getsize(full) != files[name][0]:
            raise CheckpointError(
                f"checkpoint {path}: file {name} has {os.path.getsize(full)} bytes, "
                f"{files[name][0]} were written (truncated or replaced); {fix}")
    for name, (_, digest) in _hash_share(path, names).items():
        if digest != files[name][1]:
            raise CheckpointError(
                f"checkpoint {path}: file {name} does not match its {CHECKSUM_ALGORITHM} "
                f"checksum (the bytes changed after the save: disk or copy corruption); {fix}")


# --------------------------------------------------------------------------- state pieces


def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        "vp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 0,
    }


def _model_keys(model: Sequence[MegatronModule]) -> list[str]:
    # Megatron-LM's naming: "model" for one chunk, "model<i>" for virtual pipeline chunks.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states as tensors (``torch.load(weights_only=True)`` reads them).

    python: Mersenne Twister words [625] and [version, has_gauss, gauss]; numpy likewise
    ([624] and [pos, has_gauss, cached_gaussian]); torch CPU and CUDA generator bytes; one
    entry per megatron RNG tracker state (dropout in TP regions, expert parallel ...).
    """
    from megatron_mile.cpu_compat import cuda_available

    version, words, gauss = random.getstate()
    _, np_words, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python_words": torch.tensor(words, dtype=torch.int64),
        "python_meta": torch.tensor([version, gauss is not None,
                                     gauss if gauss is not None else 0.0], dtype=torch.float64),
        "numpy_words": torch.from_numpy(np_words.astype(np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    if cuda_available():  # no empty placeholder: megatron cannot shard a zero-size tensor
        state["cuda"] = torch.cuda.get_rng_state()
    for name, tracker_state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = tracker_state
    return state


def _restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron_mile.cpu_compat import cuda_available

    version, has_gauss, gauss = state["python_meta"].tolist()
    random.setstate((int(version), tuple(state["python_words"].tolist()),
                     gauss if has_gauss else None))
    pos, np_has_gauss, cached = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_words"].numpy().astype(np.uint32), int(pos),
                         int(np_has_gauss), cached))
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "cuda" in state and cuda_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))
    tensor_parallel.get_cuda_rng_tracker().set_states({
        key[len("tracker."):]: value for key, value in state.items()
        if key.startswith("tracker.")})


def _rng_sharded(state: dict[str, torch.Tensor],
                 saved_keys: Optional[Sequence[str]] = None) -> dict[str, ShardedTensor]:
    """Each tensor as slice ``rank`` of a ``[world_size, ...]`` ShardedTensor; when loading,
    only the ``saved_keys`` the checkpoint holds (a CPU run's has no CUDA state)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return {name: ShardedTensor.from_rank_offsets(f"mile_rng_state.{name}", tensor,
                                                  (0, rank, world), replica_id=0,
                                                  prepend_axis_num=1)
            for name, tensor in state.items() if saved_keys is None or name in saved_keys}


def _is_distributed(optimizer: Any) -> bool:
    """Whether ``optimizer`` (megatron's, chained or not) shards its state over DP."""
    return any(isinstance(opt, DistributedOptimizer)
               for opt in getattr(optimizer, "chained_optimizers", [optimizer]))


def _check_optimizer_layout(path: str, meta: dict, optimizer: Any) -> None:
    """Refuse, before any read, optimizer state this layout cannot take: the distributed
    optimizer's ``dp_reshardable`` state reshards over DP only (megatron-core 0.16.1), and the
    two optimizers' states have different keys. Local; older checkpoints (no record) pass."""
    saved = meta.get("distributed_optimizer")
    if saved is None:
        return
    fix = ("or set checkpoint.load_optimizer=false (weights, step and data position load into "
           "any layout; Adam moments start fresh)")
    current = _is_distributed(optimizer)
    if saved != current:
        raise CheckpointError(
            f"{path} holds the state of parallel.use_distributed_optimizer={str(saved).lower()}"
            f" and this run has {str(current).lower()}: set it back, {fix}")
    if not current or meta.get("distopt_sharding") != "dp_reshardable":
        return
    old, new = meta["layout"], _layout()
    moved = [f"{k.upper()} {old[k]} -> {new[k]}" for k in ("tp", "pp", "vp") if old[k] != new[k]]
    if moved:
        raise CheckpointError(
            f"{path}: the distributed optimizer state (dp_reshardable) reshards across data-"
            f"parallel sizes only, and this run changes {', '.join(moved)}: resume at TP "
            f"{old['tp']}, PP {old['pp']}, VP {old['vp']}, {fix}")


def _materialize_distopt_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer its (dummy) Adam state before building a load request.

    Without Apex/TE (torch Adam: CPU, or a GPU install without TE), megatron-core 0.16.1's
    ``DistributedOptimizer.state_dict()`` asserts that all params share one Adam ``step``; a
    fresh optimizer has none, and ``sharded_state_dict(is_loading=True)`` calls
    ``state_dict()`` *before* its own dummy-state initialisation. Run that initialisation
    (``_init_optimizer_states_with_dummy_values``: one local zero-grad step) first; every value
    it touches is overwritten by the load. Local, no collectives.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer: Any) -> None:
    """Give every param its own, correct Adam ``step`` after a distributed-optimizer load.

    megatron-core 0.16.1 ``DistributedOptimizer.load_state_dict`` with torch Adam (no Apex/TE)
    keeps the saved step count only in ``param_groups[i]["step"]``; the per-param ``step``
    tensors it leaves behind are ONE shared tensor holding the pre-load count (here: the dummy
    step of ``_materialize_distopt_state``). torch Adam increments a shared tensor once per
    param per step, so bias correction would be wrong and the resumed run would diverge.
    Set a fresh tensor per param from its group's saved count. Local, no collectives.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                param_state = opt.optimizer.state.get(param, {})
                if isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = torch.tensor(float(group["step"]),
                                                       dtype=param_state["step"].dtype)


def _sharded_state_dict(model, optimizer, opt_param_scheduler, *, is_loading: bool,
                        with_rng: bool, distopt_sharding: str,
                        rng_keys: Optional[Sequence[str]] = None) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, chunk in zip(_model_keys(model), unwrap_model(list(model))):
        # Unwrapped (no DDP/Float16Module): tensor keys do not depend on the wrapping.
        state[key] = chunk.sharded_state_dict()
    if optimizer is not None:
        if is_loading:
            _materialize_distopt_state(optimizer)
        # Built from the model entries only; megatron maps params to their ShardedTensors.
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": distopt_sharding},
        )
    if opt_param_scheduler is not None and not is_loading:
        state["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    if with_rng:
        # On load the current state is only a placeholder of the right shapes.
        state["rng_state"] = _rng_sharded(_rng_state(), rng_keys)
    return state


def _check_extra_state(extra_state: dict) -> None:
    """``common.pt`` is read with ``torch.load(weights_only=True)``: refuse what it can't load."""
    if not isinstance(extra_state, dict):
        raise CheckpointError(f"extra_state must be a dict, got {type(extra_state).__name__}")
    buf = io.BytesIO()
    torch.save(extra_state, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report what torch refused
        raise CheckpointError(
            "extra_state must hold plain Python values (dict/list/tuple/str/int/float/bool/"
            f"None) or tensors, loadable with torch.load(weights_only=True): {exc}"
        ) from exc


def _write_tracker(ckpt_dir: str, iteration: int) -> None:
    """Atomically replace the tracker file (write a temp file, fsync, ``os.replace``)."""
    atomic_write_text(os.path.join(ckpt_dir, TRACKER_FILENAME), f"{iteration}\n")


# --------------------------------------------------------------------------- save


def _prepare(save_dir: str, iteration: int, final: str, tmp: str) -> None:
    """Step 1 of the publish protocol (rank 0): make room for ``iter_N.tmp``."""
    os.makedirs(save_dir, exist_ok=True)
    published = find_latest_checkpoint(save_dir)
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
            error = f"creating its lock file: {_full_disk(save_dir) or _describe(exc)}"
    _agree(error, f"locking checkpoint.save={save_dir}")
    return lock


def save_checkpoint(
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
) -> str:
    """Save everything needed to resume at ``iteration``; return the checkpoint directory.

    Follows the publish protocol of the module docstring: after any failure the tracker still
    names the previous checkpoint, and a later save of the same iteration succeeds.

    Args:
        save_dir: checkpoint root, shared by all ranks; created if missing.
        iteration: training iteration this state belongs to (>= 0).
        model: this rank's model chunks (megatron DDP / Float16Module / GPTModel), in order.
        optimizer: a megatron optimizer (also the distributed one), or None.
        opt_param_scheduler: an ``OptimizerParamScheduler``, or None.
        extra_state: identical on all ranks; plain Python values (step, consumed samples,
            config dict). Returned by ``load_checkpoint``.
        thread_count: writer threads per rank (more files, faster on parallel filesystems).
        distopt_sharding: distributed optimizer state format (megatron's
            ``distrib_optim_sharding_type``, Megatron-LM's default): ``"dp_reshardable"``
            (every rank writes its shard; optimizer state reloads at the same TP/PP, any DP)
            or ``"fully_reshardable"`` (any layout; in megatron-core 0.16.1 its load fails
            with torch Adam (KeyError 'step'), i.e. it needs TE/Apex FusedAdam). The older
            ``fully_sharded_model_space`` default is rejected by 0.16.1 (flattened
            ShardedTensors are unsupported). Ignored without the distributed optimizer.
        checksums: record every file's size and SHA-256 (each rank hashes a share) for
            ``load_checkpoint(verify_checksums=True)``; cost in docs/benchmarks.md.
        lock: the directory's lock (``lock_save_dir``; rank 0's), verified right before the
            publish: a run that lost its lock to another never publishes.

    Collectives (default group, every rank): 5 ``all_gather_object`` agreements and one
    ``broadcast_object_list``, plus megatron ``dist_checkpointing.save`` (sharding
    validation, plan exchange, barriers).

    Raises:
        CheckpointError: on every rank, with one line: a published ``iter_N`` exists, the
            directory cannot be prepared, or any rank failed to write (e.g. a full disk:
            the message names the file and the OS error).
    """
    if iteration < 0:
        raise CheckpointError(f"iteration must be >= 0, got {iteration}")
    _check_extra_state(extra_state)
    final = checkpoint_path(save_dir, iteration)
    tmp = final + ".tmp"
    rank = dist.get_rank()
    what = f"save_checkpoint({save_dir!r}, {iteration})"

    error = None
    if rank == 0:
        try:
            _prepare(save_dir, iteration, final, tmp)
        except (OSError, CheckpointError) as exc:
            error = f"preparing {tmp}: {_describe(exc)}"
    _agree(error, what, iteration)

    try:
        error = None
        try:
            state = _sharded_state_dict(model, optimizer, opt_param_scheduler, is_loading=False,
                                        with_rng=True, distopt_sharding=distopt_sharding)
            state["extra_state"] = extra_state
            state[_META_KEY] = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "iteration": iteration,
                "layout": _layout(), "num_chunks": len(model),
                "has_optimizer": optimizer is not None,
                "has_scheduler": opt_param_scheduler is not None,
                "distopt_sharding": distopt_sharding,
                "distributed_optimizer": _is_distributed(optimizer),
                "rng_keys": sorted(state["rng_state"]),
                "has_checksums": checksums,
            }
            dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy(thread_count),
                                    validate_access_integrity=True)
        except _FAILURES as exc:  # reported on every rank below
            full = _full_disk(save_dir)
            error = f"writing {tmp}: {full or _describe(exc)}"
        _agree(error, what)
        if checksums:
            _record_checksums(tmp, what)

        error = None
        if rank == 0:
            try:
                if lock is not None:
                    lock.verify()
                _publish(save_dir, iteration, final, tmp)
            except LockError as exc:
                error = f"publishing {final}: {exc}"
            except OSError as exc:
                error = f"publishing {final}: {_describe(exc)}"
        _agree(error, what)
    except CheckpointError as exc:
        published = find_latest_checkpoint(save_dir)
        if rank == 0:  # every rank is past its writes: remove this save's partial output
            shutil.rmtree(tmp, ignore_errors=True)
            if published != iteration:
                shutil.rmtree(final, ignore_errors=True)
        last = "none" if published is None else f"iteration {published}"
        raise CheckpointError(f"{exc}; the last published checkpoint ({last}) is untouched"
                              ) from None
    if rank == 0:
        _remove_leftovers(save_dir)
    return final


# --------------------------------------------------------------------------- find / validate


def find_latest_checkpoint(ckpt_dir: str) -> int | None:
    """Iteration named by ``ckpt_dir``'s tracker file; None if there is no tracker (fresh run).

    Local: no collectives, reads one file. Does not check the checkpoint itself
    (``load_checkpoint`` does).

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
        raise CheckpointError(f"cannot read tracker {path}: {_describe(exc)}") from exc
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(
            f"tracker {path} is corrupt (content {text[:40]!r}, expected an iteration number); "
            f"{fix}")
    return int(text)


def _validate_checkpoint(path: str, verify_checksums: bool) -> dict[str, Any]:
    """Check locally that ``path`` is a complete, intact, safe checkpoint; return its metadata.

    In order: directory, ``metadata.json``, ``common.pt`` (``weights_only``), format version,
    checksums (this rank's share of the digests, every file's size), the ``.metadata`` index
    (allow-listing unpickler) and that every data file it references is long enough.
    """
    fix = "restore it from a backup, or point the tracker at an earlier complete checkpoint"
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist; {fix}")
    try:
        is_checkpoint = dist_checkpointing.check_is_distributed_checkpoint(path)
    except Exception:  # noqa: BLE001 - megatron raises whatever json/CheckpointingConfig do
        is_checkpoint = False
    if not is_checkpoint:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: no valid {CONFIG_FNAME} (a save was interrupted "
            f"or files were lost); {fix}")
    try:
        common = torch.load(os.path.join(path, COMMON_STATE_FNAME), map_location="cpu",
                            weights_only=True)
        meta = common[_META_KEY]
        version = meta.get("version")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {path}: {COMMON_STATE_FNAME} is missing or corrupt "
            f"({_describe(exc)}); {fix}") from exc
    if meta.get("format") != FORMAT_NAME or version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format {meta.get('format')} v{version}; this code reads "
            f"{FORMAT_NAME} v{', v'.join(map(str, _READABLE_VERSIONS))}")
    if version >= 2 and verify_checksums:
        if meta.get("has_checksums", True):
            _verify_checksums(path, fix + " (or load with checkpoint.verify_checksums=false)")
        else:
            logger.warning("%s was saved without checksums: its files are not verified", path)
    storage = read_dcp_metadata(path).storage_data
    needed: dict[str, int] = {}
    for info in storage.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, size in sorted(needed.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path} is missing data file {rel}; {fix}")
        if os.path.getsize(file) < size:
            raise CheckpointError(
                f"checkpoint {path}: data file {rel} is truncated ({os.path.getsize(file)} "
                f"bytes, index needs {size}); {fix}")
    return {**meta, "common": common}


# --------------------------------------------------------------------------- load


def load_checkpoint(
    load_dir: str,
    model: list[MegatronModule],
    optimizer: Any,
    opt_param_scheduler: Any,
    *,
    iteration: int | None = None,
    verify_checksums: bool = True,
    check_common: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Restore model, optimizer, scheduler and RNG state; return the saved ``extra_state``.

    Args:
        load_dir: checkpoint root (as passed to ``save_checkpoint``).
        model: this rank's freshly built chunks, same wrapping as at save time or not (keys
            are the same with or without DDP/Float16Module); any TP/PP layout.
        optimizer: the megatron optimizer to restore, or None (evaluation / export).
        opt_param_scheduler: scheduler to restore, or None.
        iteration: load this iteration instead of the tracker's.
        verify_checksums: check every file against ``mile_checksums.json`` first (each rank
            hashes ``1/world_size`` of the bytes; cost in docs/benchmarks.md).
        check_common: called on every rank with the checkpoint's common state (``common.pt``:
            ``extra_state``, ``opt_param_scheduler`` ...) before anything is loaded; raise
            ``CheckpointError`` to refuse the checkpoint (e.g. a schedule that differs from the
            configuration).

    RNG states are restored only when the layout (world size, TP, PP, DP, VP) is unchanged.

    Collectives (default group, every rank): 2 ``all_gather_object`` agreements around
    megatron ``dist_checkpointing.load`` (metadata exchange, torch.distributed.checkpoint
    read plan). Every rank validates the files first, so a missing, damaged or unsafe
    checkpoint raises on all ranks before megatron's collectives start.

    Raises:
        CheckpointError: on every rank, with one line: no such directory, no tracker, the
            tracker names a missing/incomplete checkpoint, a file is missing, truncated,
            corrupt, fails its checksum or refers to a class torch DCP never writes, the
            checkpoint lacks optimizer/scheduler state that was asked for, or ``check_common``
            refused it.
    """
    error, meta = None, None
    where = f"load_checkpoint({load_dir!r})"
    try:
        if not os.path.isdir(load_dir):
            raise CheckpointError(
                f"checkpoint directory {load_dir} does not exist; check the path (or start "
                "without loading)")
        if iteration is None:
            iteration = find_latest_checkpoint(load_dir)
            if iteration is None:
                raise CheckpointError(
                    f"{load_dir} has no {TRACKER_FILENAME}: no complete checkpoint was ever "
                    "published there; pass iteration= explicitly or start without loading")
        path = checkpoint_path(load_dir, iteration)
        meta = _validate_checkpoint(path, verify_checksums)
        if optimizer is not None and not meta["has_optimizer"]:
            raise CheckpointError(f"{path} was saved without optimizer state; pass optimizer=None")
        if opt_param_scheduler is not None and not meta["has_scheduler"]:
            raise CheckpointError(
                f"{path} was saved without scheduler state; pass opt_param_scheduler=None")
        if optimizer is not None:
            _check_optimizer_layout(path, meta, optimizer)
        if check_common is not None:
            check_common(meta["common"])
    except CheckpointError as exc:
        error = str(exc)
    _agree(error, where, iteration)
    path = checkpoint_path(load_dir, iteration)

    same_layout = meta["layout"] == _layout()
    with_rng = same_layout and meta["version"] >= 2
    if not with_rng and dist.get_rank() == 0:
        logger.warning("%s: RNG states not restored (%s)", path,
                       f"layout {_layout()} differs from saved {meta['layout']}"
                       if not same_layout else f"format v{meta['version']} stores them pickled")
    error, extra_state = None, None
    try:
        request = _sharded_state_dict(model, optimizer, None, is_loading=True,
                                      with_rng=with_rng,
                                      distopt_sharding=meta["distopt_sharding"],
                                      rng_keys=meta.get("rng_keys"))
        with _weights_only_loads():
            state = dist_checkpointing.load(request, path,
                                            sharded_strategy=ProgressTorchDistLoadStrategy())
        for key, chunk in zip(_model_keys(model), unwrap_model(list(model))):
            chunk.load_state_dict(state[key], strict=True)
        if optimizer is not None:
            # no_grad: with fp32 params the distributed optimizer's main params are views of
            # the (requires_grad) model params, and megatron-core 0.16.1's dp_reshardable load
            # copies into them in place without disabling autograd.
            with torch.no_grad():
                optimizer.load_state_dict(state["optimizer"])
            _restore_adam_steps(optimizer)
        if opt_param_scheduler is not None:
            opt_param_scheduler.load_state_dict(state["opt_param_scheduler"])
        if with_rng:
            _restore_rng_state(state["rng_state"])
        extra_state = state["extra_state"]
    except _FAILURES as exc:  # reported on every rank below
        error = f"reading {path}: {_describe(exc)}"
    _agree(error, where)
    return extra_state
