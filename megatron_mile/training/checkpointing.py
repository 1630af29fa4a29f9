"""Atomic, reshardable checkpoints with megatron-core ``dist_checkpointing``, on CPU and GPU.

Layout of ``save_dir``::

    latest_checkpointed_iteration.txt     # "<N>\\n": the only thing that makes a checkpoint valid
    iter_0000200/                          # complete checkpoint (renamed from .tmp after all ranks wrote)
        metadata.json  common.pt  .metadata  __<rank>_<i>.distcp ...
    iter_0000400.tmp/                      # a save in progress, or one that crashed: never loaded

What one checkpoint holds (keys of the megatron sharded state dict):
    ``model`` (one chunk) or ``model0``, ``model1``, ... (virtual pipeline chunks): each chunk's
        ``sharded_state_dict()``. Stored by global tensor key, so it loads into another TP/PP
        layout.
    ``optimizer``: ``optimizer.sharded_state_dict(model_sd)`` (also the distributed optimizer,
        in megatron's default ``fully_sharded_model_space`` format, reshardable).
    ``opt_param_scheduler``, ``extra_state``, ``mile_checkpoint`` (format version and layout):
        common state, written once by rank 0 into ``common.pt``.
    ``rng_state``: a per-rank ShardedObject with python, numpy, torch CPU, CUDA (if present)
        and megatron's RNG tracker states. Restored only into the same layout (rank r's state
        means nothing to another layout's rank r); otherwise skipped with a warning.

Why a custom save strategy: megatron's default ``torch_dist`` save (``TorchDistSaveShardedStrategy``)
writes through ``FileSystemWriterAsync`` even when called synchronously: it creates a
``multiprocessing`` spawn-context ``Manager()`` (``filesystem_async._get_write_results_queue``) and
forks one writer process per bucket (``write_preloaded_data_multiproc``). Starting those fails
in daemonic processes ("daemonic processes are not allowed to have children"), and a spawned
Manager re-imports the launching script's ``__main__``: a training script without a
``__main__`` guard re-runs its own rendezvous there and ``Manager()`` never returns (the hang
PROBES.md saw). ``SyncTorchDistSaveStrategy`` writes the same ``torch_dist`` format with
torch.distributed.checkpoint's synchronous ``FileSystemWriter`` in this process (optional
writer threads, no subprocesses), so loading uses megatron's stock ``torch_dist`` load strategy.

Failure model: every rank validates what it will read and the ranks agree (one
``all_gather_object``) before any megatron collective starts, so a missing, incomplete or
corrupt checkpoint raises ``CheckpointError`` on every rank instead of a hang. A rank that
dies *inside* megatron's save/load collectives is bounded by the process group timeout.
All ranks must see the same filesystem (a shared filesystem across nodes).

Collectives (all on the default/WORLD group, all ranks must call): see each public function.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import shutil
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.core import CONFIG_FNAME
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import unwrap_model

from megatron_mile.utils import atomic_write_text, fsync_path

__all__ = [
    "CheckpointError",
    "SyncTorchDistSaveStrategy",
    "TRACKER_FILENAME",
    "checkpoint_path",
    "find_latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
FORMAT_NAME = "megatron-mile"
FORMAT_VERSION = 1
_META_KEY = "mile_checkpoint"
_DCP_METADATA = ".metadata"


# torch.distributed.checkpoint raises CheckpointException, a BaseException (not Exception),
# after it has gathered every rank's failure: catch it alongside ordinary errors.
_FAILURES = (Exception, CheckpointException)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit what is being loaded."""


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
        writer = dcp.FileSystemWriter(
            str(checkpoint_dir), single_file_per_rank=True, sync_files=True,
            thread_count=self.thread_count,
        )
        planner = MCoreSavePlanner(
            dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False,
            can_run_decentralized_global_plan=False,
        )
        dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)


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


def _agree(local_error: str | None, what: str, value: Any = None) -> Any:
    """Raise ``CheckpointError`` on every rank if any rank has an error or values differ.

    Collectives: one ``all_gather_object`` of ``(local_error, value)`` on the default group.
    Returns the (common) ``value``.
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local_error, value))
    errors = [f"rank {r}: {err}" for r, (err, _) in enumerate(gathered) if err is not None]
    if errors:
        shown = errors[:8] + ([f"... and {len(errors) - 8} more ranks"] if len(errors) > 8 else [])
        raise CheckpointError(f"{what} failed:\n  " + "\n  ".join(shown))
    values = {repr(v) for _, v in gathered}
    if len(values) > 1:
        raise CheckpointError(
            f"{what}: ranks disagree ({[v for _, v in gathered]}); all ranks must see the "
            "same checkpoint directory (a shared filesystem) and pass the same arguments"
        )
    return value


def _describe(exc: BaseException) -> str:
    """One line for the collective error; the full traceback goes to this rank's log."""
    logger.error("rank %d: checkpoint operation failed", dist.get_rank(), exc_info=exc)
    text = f"{type(exc).__name__}: {exc}"
    # torch's CheckpointException carries every rank's traceback: keep the ends.
    return text if len(text) <= 800 else f"{text[:400]} [...] {text[-400:]}"


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


def _collect_rng_state() -> dict[str, Any]:
    from megatron_mile.platform import cuda_available

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _restore_rng_state(state: dict[str, Any]) -> None:
    from megatron_mile.platform import cuda_available

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if state["cuda"] is not None and cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data: Any) -> ShardedObject:
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("mile_rng_state", data, (world,), (rank,), replica_id=0)


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
                        with_rng: bool, distopt_sharding: str) -> dict[str, Any]:
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
        # On load the current state is only a placeholder of the right type.
        state["rng_state"] = _rng_sharded_object(_collect_rng_state())
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
) -> str:
    """Save everything needed to resume at ``iteration``; return the checkpoint directory.

    Writes into ``iter_{N:07d}.tmp``; after every rank finished writing, rank 0 renames it to
    ``iter_{N:07d}`` and then atomically rewrites ``latest_checkpointed_iteration.txt``.
    A crash at any point leaves the tracker naming the previous checkpoint.

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

    Collectives (default group, every rank): 3 ``all_gather_object`` agreements, plus
    megatron ``dist_checkpointing.save`` (sharding validation, plan exchange, barriers).

    Raises:
        CheckpointError: on every rank, if ``iter_N`` already exists, the directory cannot be
            prepared, or any rank failed to write.
    """
    if iteration < 0:
        raise CheckpointError(f"iteration must be >= 0, got {iteration}")
    _check_extra_state(extra_state)
    final = checkpoint_path(save_dir, iteration)
    tmp = final + ".tmp"
    rank = dist.get_rank()

    error = None
    if rank == 0:
        try:
            if os.path.exists(final):
                error = (f"{final} already exists; remove it or save under another iteration "
                         "(checkpoints are never overwritten)")
            else:
                shutil.rmtree(tmp, ignore_errors=True)  # left over from a crashed save
                os.makedirs(tmp)
        except OSError as exc:
            error = f"cannot create {tmp}: {_describe(exc)}"
    _agree(error, f"save_checkpoint({save_dir!r}, {iteration}): preparing {tmp}", iteration)

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
        }
        dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy(thread_count),
                                validate_access_integrity=True)
    except _FAILURES as exc:  # reported on every rank below
        error = f"writing {tmp}: {_describe(exc)}"
    _agree(error, f"save_checkpoint({save_dir!r}, {iteration})")

    error = None
    if rank == 0:
        try:
            fsync_path(tmp)
            os.rename(tmp, final)
            fsync_path(save_dir)
            _write_tracker(save_dir, iteration)
        except OSError as exc:
            error = f"publishing {final}: {_describe(exc)}"
    _agree(error, f"save_checkpoint({save_dir!r}, {iteration}): publishing")
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
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as exc:
        raise CheckpointError(f"cannot read tracker {path}: {_describe(exc)}") from exc
    if not text.isdigit():
        raise CheckpointError(
            f"tracker {path} is corrupt (content {text[:40]!r}, expected an iteration number); "
            f"write the iteration of a complete iter_NNNNNNN directory into it, or delete it to "
            "start fresh"
        )
    return int(text)


def _validate_checkpoint(path: str) -> dict[str, Any]:
    """Check locally that ``path`` is a complete, readable checkpoint; return its metadata.

    Checks: directory, ``metadata.json``, ``common.pt`` (loaded), the ``.metadata`` index
    (unpickled) and that every data file it references exists and is long enough.
    """
    fix = ("restore it from a backup, or point the tracker at an earlier complete "
           "checkpoint")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist; {fix}")
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise CheckpointError(
            f"checkpoint {path} is incomplete: no valid {CONFIG_FNAME} (a save was interrupted "
            f"or files were lost); {fix}")
    try:
        common = torch.load(os.path.join(path, COMMON_STATE_FNAME), map_location="cpu",
                            weights_only=True)
        meta = common[_META_KEY]
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {path}: {COMMON_STATE_FNAME} is missing or corrupt "
            f"({_describe(exc)}); {fix}") from exc
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {meta.get('format')} v{meta.get('version')}, "
            f"this code reads {FORMAT_NAME} v{FORMAT_VERSION}")
    try:
        with open(os.path.join(path, _DCP_METADATA), "rb") as f:
            index = pickle.load(f)
        storage = index.storage_data
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {path}: tensor index {_DCP_METADATA} is missing or corrupt "
            f"({_describe(exc)}); {fix}") from exc
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
) -> dict:
    """Restore model, optimizer, scheduler and RNG state; return the saved ``extra_state``.

    Args:
        load_dir: checkpoint root (as passed to ``save_checkpoint``).
        model: this rank's freshly built chunks, same wrapping as at save time or not (keys
            are the same with or without DDP/Float16Module); any TP/PP layout.
        optimizer: the megatron optimizer to restore, or None (evaluation / export).
        opt_param_scheduler: scheduler to restore, or None.
        iteration: load this iteration instead of the tracker's.

    RNG states are restored only when the layout (world size, TP, PP, DP, VP) is unchanged.

    Collectives (default group, every rank): 2 ``all_gather_object`` agreements around
    megatron ``dist_checkpointing.load`` (metadata exchange, torch.distributed.checkpoint
    read plan). Every rank validates the files first, so a missing or damaged checkpoint
    raises on all ranks before megatron's collectives start.

    Raises:
        CheckpointError: on every rank: no such directory, no tracker, the tracker names a
            missing/incomplete checkpoint, a file is missing/truncated/corrupt, or the
            checkpoint lacks optimizer/scheduler state that was asked for.
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
        meta = _validate_checkpoint(path)
        if optimizer is not None and not meta["has_optimizer"]:
            raise CheckpointError(f"{path} was saved without optimizer state; pass optimizer=None")
        if opt_param_scheduler is not None and not meta["has_scheduler"]:
            raise CheckpointError(
                f"{path} was saved without scheduler state; pass opt_param_scheduler=None")
    except CheckpointError as exc:
        error = str(exc)
    _agree(error, where, iteration)
    path = checkpoint_path(load_dir, iteration)

    same_layout = meta["layout"] == _layout()
    if not same_layout and dist.get_rank() == 0:
        logger.warning("%s: layout %s differs from saved %s; RNG states not restored",
                       path, _layout(), meta["layout"])
    error, extra_state = None, None
    try:
        request = _sharded_state_dict(model, optimizer, None, is_loading=True,
                                      with_rng=same_layout,
                                      distopt_sharding=meta["distopt_sharding"])
        state = dist_checkpointing.load(request, path)
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
        if same_layout:
            _restore_rng_state(state["rng_state"])
        extra_state = state["extra_state"]
    except _FAILURES as exc:  # reported on every rank below
        error = f"reading {path}: {_describe(exc)}"
    _agree(error, where)
    return extra_state
