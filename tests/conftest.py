"""Fixtures shared by the test modules, and the test tiers.

Tiers: tests marked ``slow`` are multi-process (gloo launches, torchrun, a Slurm cluster) or
end-to-end; the rest are single-process unit tests. ``bash tests/run.sh --fast`` runs the unit
tier (``-m "not slow"``), ``bash tests/run.sh`` everything. Helpers that run inside spawned
workers live in importable modules beside this file (``data_fixtures.py``,
``trainer_runs.py``): a worker cannot reach a conftest.

Tests marked ``multinode_full`` (tests/test_multinode.py: faults across nodes, PP across
nodes, the 4-node case; about 7 minutes on 2 cores) are skipped, saying so, unless
``MILE_MULTINODE_FULL=1``: ``MILE_MULTINODE_FULL=1 bash tests/run.sh -k multinode``.
"""

from __future__ import annotations

import os

import pytest

from data_fixtures import train_small_tokenizer


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    """A 400-piece SentencePiece BPE model trained on generated text (about a second)."""
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MILE_MULTINODE_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="multi-node extra beyond the suite's time budget: "
                                   "set MILE_MULTINODE_FULL=1 to run it")
    for item in items:
        if "multinode_full" in item.keywords:
            item.add_marker(skip)
