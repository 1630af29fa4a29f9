"""The multi-process harness itself: results per rank, failures surfaced, hangs terminated."""

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


def test_results_are_indexed_by_rank():
    assert run_distributed(_allreduce_rank, 3, args=(2.0,)) == [6.0, 6.0, 6.0]


def test_failure_on_one_rank_is_reported_with_its_traceback():
    with pytest.raises(DistributedTestError, match=r"rank 1 of 2 failed[\s\S]*boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout_s=60)


def test_hang_is_terminated():
    with pytest.raises(DistributedTestError, match="exceeded"):
        run_distributed(_hang, 2, timeout_s=8)
