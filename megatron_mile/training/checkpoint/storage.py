"""How the tensors reach the files: megatron's ``torch_dist`` format through torch DCP's
filesystem writer and reader, whose streams report progress to the watchdog.

Why a custom save strategy: megatron's default ``torch_dist`` save (``TorchDistSaveShardedStrategy``)
writes through ``FileSystemWriterAsync`` even when called synchronously: it creates a
``multiprocessing`` spawn-context ``Manager()`` (``filesystem_async._get_write_results_queue``) and
forks one writer process per bucket (``write_preloaded_data_multiproc``). Starting those fails
in daemonic processes ("daemonic processes are not allowed to have children"), and a spawned
Manager re-imports the launching script's ``__main__``: a training script without a
``__main__`` guard re-runs its own rendezvous there and ``Manager()`` never returns.
:class:`SyncTorchDistSaveStrategy` writes the same ``torch_dist`` format with torch DCP's
``FileSystemWriter`` in this process (optional writer threads, no subprocesses), so loading
uses megatron's stock ``torch_dist`` load (:class:`ProgressTorchDistLoadStrategy` only chooses
the reader). With ``stage=True`` it copies this rank's shards to host memory instead of writing
them, for :class:`StagedWrite` to write from a background thread (``checkpoint.async_save``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator, Optional



import torch.distributed.checkpoint as dcp
from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
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
from torch.distributed.checkpoint.filesystem import FileSystem

from megatron_mile.training.watchdog import report_progress, wait_for_peers


class StagedWrite:
    """One rank's shards, copied to host memory, and how to write them (torch DCP's plan,
    writer and planner): what a background thread needs to finish a save while training
    changes the originals."""

    def __init__(self, state_dict: dict, checkpoint_dir: str, thread_count: int,
                 dedup_replicated_tensors: bool) -> None:
        self.state_dict = state_dict
        self.checkpoint_dir = checkpoint_dir
        self.thread_count = thread_count
        self.dedup_replicated_tensors = dedup_replicated_tensors

    def write(self, process_group: Any, progress: Callable[[], None],
              written: Callable[[], None]) -> None:
        """Write the files, calling ``progress`` per block and ``written`` once this rank's
        files are written (before the results gather). Collectives: torch DCP's save (plan
        gather/scatter, results gather, a broadcast) on ``process_group``, which must not be
        a group the training uses meanwhile."""
        _write(self.state_dict, self.checkpoint_dir, self.thread_count,
               self.dedup_replicated_tensors, process_group=process_group, progress=progress,
               wait=lambda phase: written())


def _write(pyt_state_dict: dict, checkpoint_dir: str, thread_count: int, dedup: bool, *,
           process_group: Any = None, progress: Callable[[], None] = report_progress,
           wait: Optional[Callable[[str], None]] = wait_for_peers) -> None:
    writer = _ProgressWriter(str(checkpoint_dir), single_file_per_rank=True, sync_files=True,
                             thread_count=thread_count, progress=progress, wait=wait)
    planner = MCoreSavePlanner(dedup_replicated_tensors=dedup, flatten_state_dict=False,
                               can_run_decentralized_global_plan=False)
    dcp.save(pyt_state_dict, storage_writer=writer, planner=planner, process_group=process_group)


def _stage(sharded_state_dict: Any) -> None:
    """Replace, in place, every ShardedTensor's data by a host copy and every ShardedObject's
    by a deep copy: training may change the originals once this returns."""


    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedTensor):
            value.data = value.data.detach().to("cpu", copy=True)
        elif isinstance(value, ShardedObject):
            value.data = copy.deepcopy(value.data)


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's ``torch_dist`` format, written synchronously in-process (see module doc).

    Uses megatron's own key translation and ``MCoreSavePlanner`` (so the files are what the
    stock ``torch_dist`` load strategy expects) with torch's synchronous ``FileSystemWriter``.
    Collectives: those of ``torch.distributed.checkpoint.save`` on the default group (plan
    gather/scatter, results gather, a final barrier-like broadcast); none with ``stage=True``,
    which leaves :attr:`staged` for the caller to write.
    """

    def __init__(self, thread_count: int = 1, stage: bool = False) -> None:
        super().__init__("torch_dist", 1, thread_count=thread_count)
        self.stage = stage
        self.staged: Optional[StagedWrite] = None

    def async_save(self, sharded_state_dict, checkpoint_dir):  # noqa: D102
        raise NotImplementedError("SyncTorchDistSaveStrategy saves in-process (see stage)")

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        """Write this rank's shards and (coordinator) the ``.metadata`` file, or with
        ``stage`` copy them to host memory (:attr:`staged`)."""
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        if self.stage:
            _stage(sharded_state_dict)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        dedup = not self.keep_only_main_replica
        if self.stage:
            self.staged = StagedWrite(pyt_state_dict, str(checkpoint_dir), self.thread_count,
                                      dedup)
        else:
            _write(pyt_state_dict, str(checkpoint_dir), self.thread_count, dedup)


_IO_BLOCK = 1 << 20
"""Bytes a checkpoint stream reads or writes between two watchdog heartbeats."""


class _ProgressStream:
    """A file object whose reads and writes go in :data:`_IO_BLOCK` pieces, each reported to
    the watchdog (``report_progress``): a GB written to a loaded filesystem is many heartbeats,
    not one silent call. Everything else (seek, tell, fileno, close) is the file's own."""

    def __init__(self, raw: Any, progress: Callable[[], None]) -> None:
        self._raw, self._progress = raw, progress

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _IO_BLOCK):
            self._raw.write(view[start:start + _IO_BLOCK])
            self._progress()
        return len(view)

    def readinto(self, buffer: Any) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view):
            n = self._raw.readinto(view[done:done + _IO_BLOCK])
            if not n:
                break
            done += n
            self._progress()
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
            self._progress()
        return b"".join(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _ProgressFileSystem(FileSystem):
    """torch DCP's local filesystem whose streams report progress (:class:`_ProgressStream`)."""

    def __init__(self, progress: Callable[[], None]) -> None:
        super().__init__()
        self._progress = progress

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            yield _ProgressStream(stream, self._progress)


class _ProgressStorage:
    """Mixin for torch DCP's filesystem writer and reader: streams with progress
    (:class:`_ProgressFileSystem`), then a wait for the slower ranks' I/O (``wait_for_peers``)
    before torch DCP's results gather, whose process-group timeout would otherwise end a rank
    whose peer is still writing to or reading from a slow filesystem.

    ``progress`` and ``wait`` default to the watchdog's; a background write passes its own
    (the watchdog's wait counts calls, and only the main thread may make them)."""

    _phase = ""

    def __init__(self, *args: Any, progress: Callable[[], None] = report_progress,
                 wait: Optional[Callable[[str], None]] = wait_for_peers, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fs = _ProgressFileSystem(progress)
        self._wait = wait

    def _after_io(self, future: Any) -> Any:
        future.wait()
        if self._wait is not None:
            self._wait(self._phase)
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


def save_strategy(thread_count: int, stage: bool = False
                  ) -> tuple[Any, SyncTorchDistSaveStrategy]:
    """The strategy to pass to megatron's save, and the torch_dist strategy inside it (whose
    ``staged`` holds the copies with ``stage``). With DP > 1 it is wrapped in
    ``FullyParallelSaveStrategyWrapper``: each DP replica writes a share of the replicated
    tensors instead of DP rank 0 all (collectives: one all_gather on the DP group, in the
    caller's thread)."""
    inner = SyncTorchDistSaveStrategy(thread_count=thread_count, stage=stage)
    strategy: Any = inner
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
        strategy = FullyParallelSaveStrategyWrapper(
            inner, parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    return strategy, inner
