"""Rank agreement: every rank reports its outcome before any collective that could hang.

A rank that cannot write, read or validate a file says so in one ``all_gather_object``; every
rank then raises the same one-line ``CheckpointError`` (ranks with the same message named
together) instead of one rank failing while the others wait in megatron's collectives.
Collectives: each function names its own (default group, every rank must call).
"""

from __future__ import annotations

import logging
import re
import shutil
from typing import Any, Optional

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_mile.errors import CheckpointError
from megatron_mile.training.watchdog import wait_for_peers

logger = logging.getLogger(__name__)


# torch.distributed.checkpoint raises CheckpointException, a BaseException (not Exception),
# after it has gathered every rank's failure: catch it alongside ordinary errors.
FAILURES = (Exception, CheckpointException)





def gather(local_error: str | None, value: Any = None) -> list[tuple[str | None, Any]]:
    """Every rank's ``(error, value)``. Collectives: one ``all_gather_object``, default group,
    after a store wait for every rank (``wait_for_peers``: a slow peer's file operations before
    this point do not time the gather out)."""
    wait_for_peers("its checkpoint files")
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local_error, value))
    return gathered


def raise_errors(gathered: list[tuple[str | None, Any]], what: str) -> None:
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


def agree(local_error: str | None, what: str, value: Any = None) -> Any:
    """Raise ``CheckpointError`` on every rank if any rank has an error or values differ.

    Collectives: one ``all_gather_object`` of ``(local_error, value)`` on the default group.
    Returns the (common) ``value``.
    """
    gathered = gather(local_error, value)
    raise_errors(gathered, what)
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


def full_disk(path: str) -> Optional[str]:
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


def describe(exc: BaseException) -> str:
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

