"""Small file-system helpers shared by the data tools and checkpointing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

CHECKSUM_ALGORITHM = "sha256"
"""Digest of :func:`file_checksum` (hashlib's OpenSSL build: about 1-2 GB/s a core)."""


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's data and metadata to disk (a directory: its entries,
    e.g. after a rename into it). Filesystems that cannot fsync a directory are tolerated."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old or the new content, never a
    partial file, also across a crash: write a temporary file, fsync, ``os.replace``, fsync
    the directory. If any step fails (e.g. a full disk) the temporary file is removed and the
    error re-raised; ``path`` keeps its old content. A crash (no chance to clean up) can leave
    ``<name>.tmp-<pid>`` behind: see :func:`temp_file_prefix`."""
    path = Path(path)
    tmp = path.with_name(f"{temp_file_prefix(path.name)}{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def temp_file_prefix(name: str) -> str:
    """Prefix of the temporary files :func:`atomic_write_text` writes next to ``name``."""
    return f"{name}.tmp-"


CHECKSUM_BLOCK = 1 << 20
"""Bytes hashed between two ``progress`` calls of :func:`file_checksum`."""


def file_checksum(path: str | os.PathLike,
                  progress: Optional[Callable[[], None]] = None) -> str:
    """Hex digest (:data:`CHECKSUM_ALGORITHM`) of a file's bytes, streamed (constant memory);
    ``progress`` is called after each :data:`CHECKSUM_BLOCK` bytes (a watchdog's heartbeat)."""
    digest = hashlib.new(CHECKSUM_ALGORITHM)
    block = bytearray(CHECKSUM_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            digest.update(view[:n])
            if progress is not None:
                progress()
    return digest.hexdigest()
