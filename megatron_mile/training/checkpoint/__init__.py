"""Atomic, reshardable, verified checkpoints with megatron-core ``dist_checkpointing``.

Public face::

    from megatron_mile.training import checkpoint
    checkpoint.save(save_dir, iteration, model, optimizer, scheduler, extra_state)  # publish
    checkpoint.AsyncSaver().save(...); ... .finalize()    # the same, written in the background
    checkpoint.find(save_dir)             # the published iteration (tracker), or None
    checkpoint.load(load_dir, model, optimizer, scheduler)   # -> extra_state
    checkpoint.read_common(load_dir)      # common.pt (extra_state, config), no process group

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

Modules, one concern each:
    protocol.py      the publish protocol (prepare, write, checksums, rename, tracker,
                     leftovers, retention), ``save``, ``find``, ``lock_save_dir``
    async_save.py    ``AsyncSaver``: the same save, staged to host memory and written in the
                     background, published at a later step boundary
    loading.py       validation, rank agreement, ``load``, ``read_common``
    integrity.py     the manifest (``checkpoint_files``) and checksums
    safe_loading.py  the allow-listing unpickler and weights-only loads
    state.py         what the state dict holds; RNG and optimizer fixes for megatron-core 0.16.1
    storage.py       the torch_dist save strategy and progress-reporting DCP streams
    agreement.py     one-line errors agreed on by every rank

Failure model: every rank validates what it will read or wrote and the ranks agree (one
``all_gather_object``) before any megatron collective starts, so a failure raises
``CheckpointError`` on every rank, with one line, instead of a hang. A rank that dies
*inside* megatron's save/load collectives is bounded by the process group timeout and the
trainer's watchdog. All ranks must see the same filesystem.
"""

from megatron_mile.errors import CheckpointError
from megatron_mile.training.checkpoint.async_save import AsyncSaver
from megatron_mile.training.checkpoint.integrity import (
    CHECKSUM_FILENAME,
    checkpoint_files,
    read_checksums,
    write_checksums,
)
from megatron_mile.training.checkpoint.loading import load, read_common
from megatron_mile.training.checkpoint.protocol import (
    TRACKER_FILENAME,
    checkpoint_path,
    find,
    lock_save_dir,
    save,
)
from megatron_mile.training.checkpoint.safe_loading import read_dcp_metadata

__all__ = [
    "AsyncSaver",
    "CHECKSUM_FILENAME",
    "CheckpointError",
    "TRACKER_FILENAME",
    "checkpoint_files",
    "checkpoint_path",
    "find",
    "load",
    "lock_save_dir",
    "read_checksums",
    "read_common",
    "read_dcp_metadata",
    "save",
    "write_checksums",
]
