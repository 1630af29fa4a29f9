"""What a checkpoint consists of (its manifest) and the checksums of those files.

``mile_checksums.json`` records ``{"algorithm": ..., "files": {name: [size, digest]}}`` for every
file :func:`checkpoint_files` names; it is not in megatron's ``metadata.json`` because
megatron-core's ``maybe_load_config`` builds ``CheckpointingConfig(**json)`` and rejects unknown
keys. Hashing is shared: rank r hashes ``names[r::world_size]``.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import torch.distributed as dist
from megatron.core.dist_checkpointing.core import CONFIG_FNAME
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

from megatron_mile.errors import CheckpointError
from megatron_mile.training.checkpoint.agreement import agree, describe, gather, raise_errors
from megatron_mile.training.checkpoint.safe_loading import DCP_METADATA, read_dcp_metadata
from megatron_mile.training.watchdog import report_progress
from megatron_mile.utils import CHECKSUM_ALGORITHM, file_checksum

CHECKSUM_FILENAME = "mile_checksums.json"
"""Per-file size and digest, written before publishing."""


def hash_share(path: str, names: Sequence[str],
               progress: Callable[[], None] = report_progress) -> dict[str, list]:
    """``{name: [size, digest]}`` for this rank's share ``names[rank::world]``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return {name: [os.path.getsize(os.path.join(path, name)),
                   file_checksum(os.path.join(path, name), progress=progress)]
            for name in names[rank::world]}


def write_checksums(path: str, files: dict[str, list]) -> None:
    """Write ``path/CHECKSUM_FILENAME`` for ``files`` (``{name: [size, digest]}``), fsynced."""
    with open(os.path.join(path, CHECKSUM_FILENAME), "w", encoding="utf-8") as f:
        json.dump({"algorithm": CHECKSUM_ALGORITHM, "files": files}, f, indent=1,
                  sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_checksums(path: str) -> tuple[str, dict[str, list]]:
    """``(algorithm, {name: [size, digest]})`` recorded in ``path/CHECKSUM_FILENAME``.

    Raises:
        OSError, ValueError, KeyError, TypeError: the file is missing or not the schema.
    """
    with open(os.path.join(path, CHECKSUM_FILENAME), encoding="utf-8") as f:
        recorded = json.load(f)
    return recorded["algorithm"], dict(recorded["files"])


def local_digests(path: str, progress: Callable[[], None] = report_progress
                  ) -> tuple[Optional[str], Optional[dict[str, list]]]:
    """``(error, digests)``: this rank's share of the digests of ``checkpoint_files(path)``,
    or the one-line reason it could not hash them. Local: no collectives (a background
    thread may run it)."""
    try:
        return None, hash_share(path, checkpoint_files(path), progress)
    except (OSError, CheckpointError) as exc:
        return f"hashing {path}: {describe(exc)}", None


def checkpoint_files(path: str) -> list[str]:
    """The files checkpoint ``path`` consists of, from its own index, never from a directory
    listing (which would take whatever happens to be there): megatron's ``metadata.json`` and
    ``common.pt``, torch DCP's ``.metadata`` and every data file it references.

    Raises:
        CheckpointError: the index is unreadable, or a file it names is missing.
    """
    names = {CONFIG_FNAME, COMMON_STATE_FNAME, DCP_METADATA}
    names.update(info.relative_path for info in read_dcp_metadata(path).storage_data.values())
    missing = sorted(n for n in names if not os.path.isfile(os.path.join(path, n)))
    if missing:
        raise CheckpointError(
            f"{path} is missing {', '.join(missing)}, named by its index (removed by another "
            "process during the save?); it is not published")
    return sorted(names)


def record_checksums(path: str, what: str,
                     hashed: Optional[tuple[Optional[str], Optional[dict]]] = None) -> None:
    """Hash every file of ``path`` (``checkpoint_files``: a share per rank; or take this
    rank's ``hashed`` share from :func:`local_digests`) and write ``CHECKSUM_FILENAME``
    (rank 0).

    Collectives: two ``all_gather_object`` (the digests, then rank 0's write result),
    default group. Every rank reads the index: a missing file fails every rank.
    """
    error, digests = hashed if hashed is not None else local_digests(path)
    gathered = gather(error, digests)
    raise_errors(gathered, what)
    error = None
    if dist.get_rank() == 0:
        files: dict[str, list] = {}
        for _, share in gathered:
            files.update(share)
        try:
            write_checksums(path, files)
        except OSError as exc:
            error = f"writing {os.path.join(path, CHECKSUM_FILENAME)}: {describe(exc)}"
    agree(error, what)


def verify_files(path: str, fix: str) -> None:
    """Check sizes of all files and the digests of this rank's share against
    ``CHECKSUM_FILENAME``. Local: no collectives (the caller agrees on the outcome)."""
    file = os.path.join(path, CHECKSUM_FILENAME)
    try:
        algorithm, files = read_checksums(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {CHECKSUM_FILENAME} is missing or corrupt "
                              f"({describe(exc)}); {fix}") from exc
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
    for name, (_, digest) in hash_share(path, names).items():
        if digest != files[name][1]:
            raise CheckpointError(
                f"checkpoint {path}: file {name} does not match its {CHECKSUM_ALGORITHM} "
                f"checksum (the bytes changed after the save: disk or copy corruption); {fix}")

