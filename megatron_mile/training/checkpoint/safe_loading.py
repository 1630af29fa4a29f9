"""Loading that never runs code from the checkpoint directory.

``common.pt`` and every tensor and byte item go through ``torch.load(weights_only=True)``
(forced for megatron's and torch's own calls by :func:`weights_only_loads`), and torch DCP's
pickled ``.metadata`` index is read with an allow-listing unpickler that admits only the classes
torch DCP writes. Local: no collectives.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import Any, Iterator

import torch

from megatron_mile.errors import CheckpointError
from megatron_mile.training.checkpoint.agreement import describe

DCP_METADATA = ".metadata"


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
    file = os.path.join(path, DCP_METADATA)
    try:
        with open(file, "rb") as f:
            return _MetadataUnpickler(f, file).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"tensor index {file} is missing or corrupt ({describe(exc)})"
                              ) from exc


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
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



def read_common_file(path: str) -> dict:
    """Checkpoint ``path``'s common state (``common.pt``: ``extra_state``, the scheduler, the
    format record), read with ``torch.load(weights_only=True)``. Local: no collectives.

    Raises:
        CheckpointError: the file is missing, corrupt or holds more than plain values/tensors.
    """
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    file = os.path.join(path, COMMON_STATE_FNAME)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means a damaged or unsafe file
        raise CheckpointError(f"checkpoint {path}: {COMMON_STATE_FNAME} is missing or corrupt "
                              f"({describe(exc)})") from exc
