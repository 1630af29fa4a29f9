"""Helpers for multi-process tests on CPU (gloo): used by tests/ and by users debugging layouts."""

from megatron_mile.testing.distributed import (
    CollectiveCounter,
    DistributedTestError,
    run_distributed,
    tp_groups,
)

__all__ = ["CollectiveCounter", "DistributedTestError", "run_distributed", "tp_groups"]
