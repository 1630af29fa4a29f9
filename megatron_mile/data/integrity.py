"""Check a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) before training on it.

megatron-core reads these files with asserts and ``numpy.frombuffer``: a truncated ``.bin``
fails deep inside with "offset must be non-negative", a sequence count that does not fit the
file with "buffer is smaller than requested size", an empty file with "cannot mmap an empty
file", and token ids beyond the model's vocabulary only when the loss sees them.
:func:`summarize_indexed_dataset` checks the same facts first and raises :class:`DataError`
with one line naming the file, the value and the fix.

    summary = summarize_indexed_dataset("data/train_text_document")
    summary.max_token_id, summary.num_tokens, summary.num_sequences

The maximum token id needs a pass over the ``.bin``: it is kept in ``PREFIX.summary.json``,
keyed by the sizes and modification times of both files, so a large corpus is scanned once
(a read-only data directory is scanned on every start, with a warning).

Index layout (megatron-core ``indexed_dataset._IndexWriter``, version 1): 9-byte magic, uint64
version, uint8 dtype code, uint64 sequence count n, uint64 document count d, int32 lengths [n],
int64 byte pointers [n], int64 document indices [d] (+ int8 modes [n] when multimodal).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import asdict, dataclass

import numpy as np
from megatron.core.datasets.indexed_dataset import DType

from megatron_mile.errors import DataError
from megatron_mile.utils import atomic_write_text

logger = logging.getLogger(__name__)

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents
_SCAN_CHUNK = 1 << 24
"""Tokens per block of the maximum-id scan (bounded memory on any corpus)."""
_SUMMARY_VERSION = 1




@dataclass(frozen=True)
class IndexSummary:
    """What training needs to know about one indexed dataset."""

    num_sequences: int
    """Sequences (documents, or their pieces) in the ``.idx``."""
    num_tokens: int
    """Tokens in the ``.bin``."""
    max_token_id: int
    """Largest token id in the ``.bin`` (-1 if it holds no token)."""
    dtype: str
    """numpy dtype of the tokens."""


def _redo(prefix: str) -> str:
    return (f"re-create it with: megatron-mile-preprocess --input CORPUS.jsonl "
            f"--output-prefix {prefix} --tokenizer-model TOKENIZER")


def index_dtype(prefix: str) -> np.dtype:
    """Token dtype of ``PREFIX.idx`` (header checked). Raises DataError on a bad header."""
    return _read_header(prefix)[0]


def _read_header(prefix: str) -> tuple[np.dtype, int, int]:
    """(dtype, sequences, documents) of ``PREFIX.idx``; its size is checked against them."""
    idx = prefix + ".idx"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:9] != _MAGIC:
        raise DataError(f"{idx} is not a Megatron index file (bad header, {size} bytes); "
                        + _redo(prefix))
    _, version, code, n, docs = _HEADER.unpack(head)
    if version != 1:
        raise DataError(f"{idx} has index version {version}; megatron-core reads version 1; "
                        + _redo(prefix))
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except ValueError:
        raise DataError(f"{idx} has token dtype code {code}, not one of megatron-core's "
                        f"{[d.value for d in DType]}; " + _redo(prefix)) from None
    needed = _HEADER.size + 4 * n + 8 * n + 8 * docs
    if size < needed:
        raise DataError(f"{idx} declares {n} sequences and {docs} documents ({needed} bytes) "
                        f"but has {size} bytes: it is truncated; " + _redo(prefix))
    return dtype, n, docs


def _read_index(prefix: str) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, lengths [n], byte pointers [n]) of a non-empty ``PREFIX.idx``."""
    dtype, n, _ = _read_header(prefix)
    idx = prefix + ".idx"
    if n == 0:
        raise DataError(f"{idx} holds no sequence: the dataset is empty; " + _redo(prefix))
    lengths = np.fromfile(idx, dtype=np.int32, count=n, offset=_HEADER.size)
    pointers = np.fromfile(idx, dtype=np.int64, count=n, offset=_HEADER.size + 4 * n)
    return dtype, lengths, pointers


def _scan(prefix: str) -> IndexSummary:
    dtype, lengths, pointers = _read_index(prefix)
    bin_path = prefix + ".bin"
    bin_size = os.path.getsize(bin_path)
    if (lengths < 0).any() or (pointers < 0).any():
        raise DataError(f"{prefix}.idx holds negative sequence lengths or offsets: it is "
                        "corrupt; " + _redo(prefix))
    end = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
    if bin_size != end:
        raise DataError(
            f"{bin_path} has {bin_size} bytes but {prefix}.idx describes {len(lengths)} "
            f"sequences ending at byte {end}: the .bin is "
            f"{'truncated' if bin_size < end else 'longer than its index'} (or the two files "
            "come from different runs); " + _redo(prefix))
    num_tokens = bin_size // dtype.itemsize
    top = -1
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if num_tokens else np.empty(0, dtype)
    for start in range(0, num_tokens, _SCAN_CHUNK):
        top = max(top, int(tokens[start:start + _SCAN_CHUNK].max()))
    return IndexSummary(num_sequences=len(lengths), num_tokens=num_tokens, max_token_id=top,
                        dtype=dtype.name)


def _fingerprint(prefix: str) -> list[int]:
    return [v for ext in (".bin", ".idx") for st in [os.stat(prefix + ext)]
            for v in (st.st_size, st.st_mtime_ns)]


def summarize_indexed_dataset(prefix: str) -> IndexSummary:
    """Check ``PREFIX.idx`` / ``PREFIX.bin`` and return their :class:`IndexSummary`.

    Reads the cached ``PREFIX.summary.json`` when it matches the files' sizes and mtimes;
    otherwise checks and scans the files and writes it (atomically; skipped with a warning
    where the directory is read-only). Local, no collectives.

    Raises:
        FileNotFoundError: a file is missing.
        DataError: bad header, version or dtype code, an index that does not fit its size,
            an empty dataset, or a ``.bin`` whose size does not match its index.
    """
    cache = prefix + ".summary.json"
    fingerprint = _fingerprint(prefix)
    try:
        with open(cache, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("version") == _SUMMARY_VERSION and cached.get("files") == fingerprint:
            return IndexSummary(**cached["summary"])
    except (OSError, ValueError, TypeError, KeyError):
        pass  # absent or stale: rebuild
    summary = _scan(prefix)
    try:
        atomic_write_text(cache, json.dumps({"version": _SUMMARY_VERSION, "files": fingerprint,
                                             "summary": asdict(summary)}) + "\n")
    except OSError as exc:
        logger.warning("cannot cache the dataset summary in %s (%s): the .bin will be scanned "
                       "again on the next start", cache, exc)
    return summary
