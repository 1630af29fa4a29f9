"""The safetensors of a local Hugging Face model folder: the tensor -> file map (single file
or sharded with its index), the shapes from the files' JSON headers (no tensor data read),
and :class:`HFCheckpoint`, which opens the files memory-mapped (``safe_open`` +
``get_slice``) and copies out only the slice a rank asks for, one tensor at a time: beyond the
model itself a rank holds one slice (and its dtype conversion) at a time. Local files only;
every file an index names must lie inside the folder.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Any, Optional

import torch

from megatron_mile.errors import CheckpointError
from megatron_mile.models import LLAMA, ModelFamily

__all__ = ["HF_INDEX", "HF_SINGLE", "HFCheckpoint", "hf_weight_map", "read_safetensors_shapes"]

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
_MAX_HEADER_BYTES = 100 << 20
"""safetensors' own bound on the JSON header of a file."""


def _allowed_roots(folder: str) -> list[str]:
    """Where the files of a HF folder may live: the folder itself, and for a folder of the
    Hugging Face hub cache (``.../snapshots/<revision>``, whose files are links into
    ``.../blobs``) that cache's ``blobs``."""
    real = os.path.realpath(folder)
    roots = [real]
    if os.path.basename(os.path.dirname(real)) == "snapshots":
        roots.append(os.path.realpath(os.path.join(os.path.dirname(real), "..", "blobs")))
    return roots


def _check_inside(folder: str, where: str, tensor: str, filename: Any) -> None:
    """CheckpointError unless ``filename`` (from ``where``) names a file inside ``folder``:
    a relative path without ``..`` that no symbolic link takes elsewhere."""
    if not isinstance(filename, str) or not filename:
        raise CheckpointError(f"{where}: tensor {tensor} is stored in {filename!r}, not a "
                                "file name")
    parts = filename.replace("\\", "/").split("/")
    reason = ("an absolute path" if os.path.isabs(filename) else
              "a path through '..'" if ".." in parts else None)
    if reason is None:
        real = os.path.realpath(os.path.join(folder, filename))
        if not any(os.path.commonpath([real, root]) == root for root in _allowed_roots(folder)):
            reason = f"a symbolic link to {real}"
    if reason is not None:
        raise CheckpointError(
            f"{where}: tensor {tensor} is stored in {filename!r}, {reason} outside the model "
            f"folder {folder}: refused (an index names files inside its folder); fix the index "
            "or copy the model into one folder")


def hf_weight_map(folder: str) -> dict[str, str]:
    """Tensor name -> safetensors file (relative to ``folder``) of a HF model folder: from
    ``model.safetensors.index.json``, else every tensor of ``model.safetensors``. Every file
    is checked to lie inside the folder. Reads JSON only (the index, or a header).

    Raises:
        CheckpointError: no safetensors, an unreadable index, or a file outside the folder.
    """
    index = os.path.join(folder, HF_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a JSON index with a weight_map: "
                                    f"{' '.join(str(e).split())}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map (tensor name -> file)")
        for tensor, filename in weight_map.items():
            _check_inside(folder, index, tensor, filename)
        return dict(weight_map)
    single = os.path.join(folder, HF_SINGLE)
    if not os.path.isfile(single):
        raise CheckpointError(f"{folder} has neither {HF_SINGLE} nor {HF_INDEX} (only "
                                "safetensors are read)")
    _check_inside(folder, single, "*", HF_SINGLE)
    return {name: HF_SINGLE for name in read_safetensors_shapes(single)}


def read_safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the JSON header of a safetensors file (8-byte little-endian
    length, then the JSON): no tensor data is read.

    Raises:
        CheckpointError: the file is missing or its header is not a safetensors header.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"a header of {length} bytes in a file of {size} bytes")
            header = json.loads(f.read(length))
        shapes = {name: tuple(int(d) for d in info["shape"]) for name, info in header.items()
                  if name != "__metadata__"}
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e})") from None
    return shapes




class HFCheckpoint:
    """The safetensors of a HF model folder (single file or sharded with its index), opened
    memory-mapped; :meth:`read` copies out only the requested slice of a tensor."""

    def __init__(self, folder: str, family: ModelFamily = LLAMA):
        """Opens nothing yet; reads the index (or the single file's header).

        Raises:
            CheckpointError: the folder's safetensors are unusable (:func:`hf_weight_map`), or
                hold a bias that ``family``'s tensor table does not name.
        """
        self._error = CheckpointError
        self.folder = folder
        self.weight_map = hf_weight_map(folder)
        self._stack = ExitStack()
        self._files: dict[str, Any] = {}
        known = {name for entry in family.tensor_names() for name in entry.hf}
        biases = [k for k in self.weight_map
                  if k.endswith(".bias") and _table_name(k, family) not in known]
        if biases:
            raise CheckpointError(f"{folder}: tensor {biases[0]} is a bias, which the model "
                                  "cannot represent")

    def _open(self, filename: str):
        try:
            from safetensors import safe_open
        except ImportError:
            raise self._error("reading a Hugging Face checkpoint needs `safetensors` "
                              "(pip install 'megatron-mile[hf]')") from None
        if filename not in self._files:
            path = os.path.join(self.folder, filename)
            try:
                self._files[filename] = self._stack.enter_context(
                    safe_open(path, framework="pt"))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise self._error(f"cannot open {path}: {e}") from None
        return self._files[filename]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise self._error(f"{self.folder}: tensor {name} is missing from the safetensors")
        return self._open(self.weight_map[name]).get_slice(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.read(name, None, 0, 0, 0).dtype

    def read(self, name: str, full_shape: Optional[tuple], axis: int = 0,
             start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """``name[start:stop]`` along ``axis`` (all of it when start is None), after checking
        its shape is ``full_shape`` (None: any)."""
        sl = self._slice(name)
        shape = tuple(sl.get_shape())
        if full_shape is not None and shape != tuple(full_shape):
            raise self._error(f"{self.folder}: tensor {name} has shape {list(shape)}, the model "
                              f"expects {list(full_shape)} (config.json disagrees with the "
                              "weights?)")
        if start is None:
            return sl[:]
        return sl[start:stop] if axis == 0 else sl[:, start:stop]

    def close(self) -> None:
        self._stack.close()


def _table_name(name: str, family: ModelFamily) -> str:
    """A HF tensor name as the family's table spells it: without ``<layer prefix>{i}.``."""
    if name.startswith(family.hf_layer_prefix):
        rest = name[len(family.hf_layer_prefix):]
        layer, _, tail = rest.partition(".")
        if layer.isdigit():
            return tail
    return name
