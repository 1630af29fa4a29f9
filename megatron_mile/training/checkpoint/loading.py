"""Loading a checkpoint: validate it locally on every rank, agree, then read.

Loading never runs code from the checkpoint directory (safe_loading.py). With
``verify_checksums`` every file's SHA-256 is checked first (each rank hashes a share), so
flipped bytes inside a tensor are refused rather than loaded. Every rank validates what it
will read and the ranks agree (one ``all_gather_object``) before any megatron collective
starts, so a missing, incomplete, corrupt or unsafe checkpoint raises ``CheckpointError`` on
every rank, with one line, instead of a hang.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CONFIG_FNAME
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import unwrap_model

from megatron_mile.errors import CheckpointError
from megatron_mile.training.checkpoint.agreement import FAILURES, agree, describe
from megatron_mile.training.checkpoint.integrity import verify_files
from megatron_mile.training.checkpoint.protocol import (
    FORMAT_NAME,
    META_KEY,
    READABLE_VERSIONS,
    TRACKER_FILENAME,
    checkpoint_path,
    find,
)
from megatron_mile.training.checkpoint.safe_loading import (
    read_common_file,
    read_dcp_metadata,
    weights_only_loads,
)
from megatron_mile.training.checkpoint.state import (
    build_state,
    check_optimizer_layout,
    current_layout,
    model_keys,
    restore_adam_steps,
    restore_rng_state,
)
from megatron_mile.training.checkpoint.storage import ProgressTorchDistLoadStrategy

logger = logging.getLogger(__name__)


def read_common(load_dir: str, iteration: Optional[int] = None) -> dict:
    """The common (non-tensor) state of a checkpoint in ``load_dir`` (``iteration``, or the
    tracker's): ``extra_state``, the scheduler and the format record, from ``common.pt`` read
    with ``torch.load(weights_only=True)``. Local: no collectives, no process group needed.

    Raises:
        CheckpointError: no tracker (and no ``iteration``), or ``common.pt`` is missing or
            corrupt.
    """
    if iteration is None:
        iteration = find(load_dir)
        if iteration is None:
            raise CheckpointError(f"{load_dir} holds no complete checkpoint (no "
                                  f"{TRACKER_FILENAME}); pass the checkpoint.save directory "
                                  "of a finished run")
    return read_common_file(checkpoint_path(load_dir, iteration))


def validate_checkpoint(path: str, verify_checksums: bool) -> dict[str, Any]:
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
        common = read_common_file(path)
        meta = common[META_KEY]
        version = meta.get("version")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {fix}") from exc
    except Exception as exc:  # noqa: BLE001 - a common.pt without the record
        raise CheckpointError(
            f"checkpoint {path}: {COMMON_STATE_FNAME} is missing or corrupt "
            f"({describe(exc)}); {fix}") from exc
    if meta.get("format") != FORMAT_NAME or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format {meta.get('format')} v{version}; this code reads "
            f"{FORMAT_NAME} v{', v'.join(map(str, READABLE_VERSIONS))}")
    if version >= 2 and verify_checksums:
        if meta.get("has_checksums", True):
            verify_files(path, fix + " (or load with checkpoint.verify_checksums=false)")
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


def load(
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
        load_dir: checkpoint root (as passed to ``save``).
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
            iteration = find(load_dir)
            if iteration is None:
                raise CheckpointError(
                    f"{load_dir} has no {TRACKER_FILENAME}: no complete checkpoint was ever "
                    "published there; pass iteration= explicitly or start without loading")
        path = checkpoint_path(load_dir, iteration)
        meta = validate_checkpoint(path, verify_checksums)
        if optimizer is not None and not meta["has_optimizer"]:
            raise CheckpointError(f"{path} was saved without optimizer state; pass optimizer=None")
        if opt_param_scheduler is not None and not meta["has_scheduler"]:
            raise CheckpointError(
                f"{path} was saved without scheduler state; pass opt_param_scheduler=None")
        if optimizer is not None:
            check_optimizer_layout(path, meta, optimizer)
        if check_common is not None:
            check_common(meta["common"])
    except CheckpointError as exc:
        error = str(exc)
    agree(error, where, iteration)
    path = checkpoint_path(load_dir, iteration)

    same_layout = meta["layout"] == current_layout()
    with_rng = same_layout and meta["version"] >= 2
    if not with_rng and dist.get_rank() == 0:
        logger.warning("%s: RNG states not restored (%s)", path,
                       f"layout {current_layout()} differs from saved {meta['layout']}"
                       if not same_layout else f"format v{meta['version']} stores them pickled")
    error, extra_state = None, None
    try:
        request = build_state(model, optimizer, None, is_loading=True,
                                      with_rng=with_rng,
                                      distopt_sharding=meta["distopt_sharding"],
                                      rng_keys=meta.get("rng_keys"))
        with weights_only_loads():
            state = dist_checkpointing.load(request, path,
                                            sharded_strategy=ProgressTorchDistLoadStrategy())
        for key, chunk in zip(model_keys(model), unwrap_model(list(model))):
            chunk.load_state_dict(state[key], strict=True)
        if optimizer is not None:
            # no_grad: with fp32 params the distributed optimizer's main params are views of
            # the (requires_grad) model params, and megatron-core 0.16.1's dp_reshardable load
            # copies into them in place without disabling autograd.
            with torch.no_grad():
                optimizer.load_state_dict(state["optimizer"])
            restore_adam_steps(optimizer)
        if opt_param_scheduler is not None:
            opt_param_scheduler.load_state_dict(state["opt_param_scheduler"])
        if with_rng:
            restore_rng_state(state["rng_state"])
        extra_state = state["extra_state"]
    except FAILURES as exc:  # reported on every rank below
        error = f"reading {path}: {describe(exc)}"
    agree(error, where)
    return extra_state
