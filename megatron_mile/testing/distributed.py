"""Run a function in N processes joined by a gloo process group, and collect what each returns.

The import of torch (about 2 s) and megatron-core (about 8 s) is paid once per calling
process, by the fork server the first launch starts (see below); later launches start their
ranks in a fraction of a second.

    def _body(rank: int, world_size: int, gamma: float) -> float:
        ...                                  # torch.distributed is initialised here
        return loss.item()

    results = run_distributed(_body, world_size=2, args=(1.0,))   # [result_rank0, result_rank1]

Return plain Python values (floats, lists, dicts), not tensors: a tensor crosses the result
queue through shared memory that disappears when its process exits (``.tolist()`` it).

A failure on any rank is re-raised in the caller with that rank's traceback, and the other
ranks are terminated instead of being left blocked in a collective. A run that exceeds
``timeout_s`` is terminated and reported as a hang.

Ranks start from a fork server (one per calling process, started by the first launch) that
has imported torch and megatron-core once (``warm_start.py``): a rank is a fork of it, not a
fresh interpreter, so a launch does not pay those imports again. Each rank gets the caller's
environment and its stdout/stderr as they are at the launch, as a spawned process would.
"""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing import reduction
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mile.log_filters import install_warning_filters


class DistributedTestError(RuntimeError):
    """A rank raised, crashed or hung; the message carries the rank and its traceback."""


class _CallerStdio:
    """Pickles as the caller's stdout and stderr file descriptors (passed to the fork server's
    child with the process object), which the child puts in place of its own: a rank's output
    goes where a spawned rank's would (a test's captured output, say), not to the fork
    server's."""

    def __reduce__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        return _attach_stdio, (reduction.DupFd(1), reduction.DupFd(2))


def _attach_stdio(out: Any, err: Any) -> None:
    for target, dup in ((1, out), (2, err)):
        fd = dup.detach()
        os.dup2(fd, target)
        os.close(fd)


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    fn: Callable[..., Any],
    args: Sequence[Any],
    results: "mp.Queue",
    env: dict[str, str],
    stdio: None = None,  # attached while unpickling (_CallerStdio)
) -> None:
    os.environ.clear()  # the caller's environment at the launch, as a spawned rank inherits
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # torch was imported in the fork server, before this
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # A spawned process starts without the parent's warning filters: the same quiet log as
    # the entry points (megatron_mile/log_filters.py), on CPU processes.
    install_warning_filters(cuda=False)
    try:
        dist.init_process_group(
            backend="gloo", init_method=f"file://{init_file}", rank=rank,
            world_size=world_size, timeout=timedelta(seconds=120),
        )
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes over gloo.

    Args:
        fn: a module-level (picklable) function; ``torch.distributed`` is initialised before
            it is called and destroyed after it returns.
        world_size: number of processes.
        args: extra positional arguments, pickled to every rank.
        timeout_s: wall-clock limit for the whole run; past it every rank is terminated.
        env: extra environment variables set in each rank before initialisation.

    Returns:
        The values returned by ``fn``, indexed by rank.

    Raises:
        DistributedTestError: a rank raised or died, or the run exceeded ``timeout_s``.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["megatron_mile.testing.warm_start"])  # used at its start
    results = ctx.Queue()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="mile-dist-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, init_file, fn, tuple(args), results, env,
                      _CallerStdio()),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        outputs: dict[int, Any] = {}
        try:
            deadline = time.monotonic() + timeout_s
            while len(outputs) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DistributedTestError(
                        f"distributed run of {fn.__name__} exceeded {timeout_s:.0f} s "
                        f"(ranks finished: {sorted(outputs)}); likely a hang in a collective"
                    )
                try:
                    rank, ok, payload = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs)
                            if r not in outputs and p.exitcode is not None]
                    if dead:
                        # A rank that exited without reporting may still have a message in
                        # flight: give the queue a moment before declaring a crash.
                        try:
                            rank, ok, payload = results.get(timeout=2.0)
                        except queue.Empty:
                            raise DistributedTestError(
                                f"rank {dead[0]} of {fn.__name__} died with exit code "
                                f"{procs[dead[0]].exitcode} without reporting"
                            ) from None
                    else:
                        continue
                if not ok:
                    raise DistributedTestError(
                        f"rank {rank} of {world_size} failed in {fn.__name__}:\n{payload}"
                    )
                outputs[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=5)
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
    return [outputs[r] for r in range(world_size)]


class CollectiveCounter:
    """Counts the ``torch.distributed`` collectives called while active (a context manager),
    by name in call order in ``calls``: how the tests hold a function to the collectives its
    docstring lists. Wraps the module attributes, so it sees calls made as ``dist.NAME``."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
             "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single",
             "send", "recv", "isend", "irecv", "barrier")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._orig: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> "CollectiveCounter":
        for name in self.NAMES:
            orig = self._orig[name] = getattr(dist, name)

            def wrapped(*args, _name=name, _orig=orig, **kwargs):
                self.calls.append(_name)
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def tp_groups(rank: int, world_size: int, tp_size: int) -> tuple[dist.ProcessGroup, int]:
    """Split the world into consecutive groups of ``tp_size`` ranks; return this rank's group
    and its rank in it. Collective: every rank creates every group, in the same order (as
    ``torch.distributed.new_group`` requires)."""
    mine = None
    for start in range(0, world_size, tp_size):
        ranks = list(range(start, start + tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, rank - start)
    assert mine is not None, f"rank {rank} is not in a world of {world_size}"
    return mine
