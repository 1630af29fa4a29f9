"""The multi-process harness itself: results per rank, failures surfaced, hangs terminated, and
what a rank inherits from its caller (ranks are forked from a warm fork server, not spawned).
"""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_mile.testing import DistributedTestError, run_distributed

pytestmark = pytest.mark.slow  # the multi-process harness itself (spawns, hangs, crashes)


def _allreduce_rank(rank: int, world_size: int, scale: float) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item() * scale


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 blocks here: the harness must not wait for it forever


def _hang(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.barrier()
    else:
        time.sleep(120)  # never reaches the barrier, never exits in time


def _environment_and_hello(rank: int, world_size: int) -> list:
    if os.environ.get("MILE_HARNESS_MARK") == "second":  # the launch inside the capture
        print(f"rank {rank} of {world_size} says hello", flush=True)
    return [os.environ.get("MILE_HARNESS_MARK"), os.environ.get("OMP_NUM_THREADS"),
            torch.get_num_threads()]


def test_ranks_get_the_callers_environment_and_output_at_each_launch(monkeypatch, capfd):
    """As a spawned rank would: the caller's os.environ at this launch (not the one the fork
    server started with), one torch thread, and stdout to the caller's, here the capture."""
    monkeypatch.setenv("MILE_HARNESS_MARK", "first")
    with capfd.disabled():  # the fork server, if this starts it, starts outside the capture
        assert run_distributed(_environment_and_hello, 2) == [["first", "1", 1]] * 2
    monkeypatch.setenv("MILE_HARNESS_MARK", "second")
    assert run_distributed(_environment_and_hello, 2) == [["second", "1", 1]] * 2
    out = capfd.readouterr().out
    assert "rank 0 of 2 says hello" in out and "rank 1 of 2 says hello" in out, out


def test_results_are_indexed_by_rank():
    assert run_distributed(_allreduce_rank, 3, args=(2.0,)) == [6.0, 6.0, 6.0]


def test_failure_on_one_rank_is_reported_with_its_traceback():
    with pytest.raises(DistributedTestError, match=r"rank 1 of 2 failed[\s\S]*boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout_s=60)


def test_hang_is_terminated():
    with pytest.raises(DistributedTestError, match="exceeded"):
        run_distributed(_hang, 2, timeout_s=8)
