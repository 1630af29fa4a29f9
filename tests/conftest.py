"""Fixtures shared by the test modules, and the test tiers.

Tiers: tests marked ``slow`` are multi-process (gloo launches, torchrun, a Slurm cluster) or
end-to-end; the rest are single-process unit tests. ``bash tests/run.sh --fast`` runs the unit
tier (``-m "not slow"``), ``bash tests/run.sh`` everything. Helpers that run inside spawned
workers live in importable modules beside this file (``data_fixtures.py``,
``trainer_runs.py``): a worker cannot reach a conftest.

The Slurm tests (tests/test_slurm.py, tests/test_multinode.py) share one throw-away cluster:
its fixtures live in tests/slurm_cluster.py and are registered here, so that every module
gets the same one.
"""

from __future__ import annotations

import pytest

from data_fixtures import train_small_tokenizer
from slurm_cluster import _slurm_jobs_left, cluster  # noqa: F401 - shared fixtures


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    """A 400-piece SentencePiece BPE model trained on generated text (about a second)."""
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


_GUARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Every test gives back the signal handlers it changed in the pytest process: a handler
    left behind is inherited by every process later tests fork (a worker that ignores SIGTERM
    outlives whatever stops it that way; CI once hung 600 s in multiprocessing.Pool's
    terminate() after an in-process CLI run had left its SIGTERM handler behind)."""
    import signal

    sigs = [getattr(signal, name) for name in _GUARDED_SIGNALS]
    before = {sig: signal.getsignal(sig) for sig in sigs}
    yield
    leaked = {sig: signal.getsignal(sig) for sig in sigs if signal.getsignal(sig) != before[sig]}
    for sig in leaked:
        signal.signal(sig, before[sig])
    if leaked:
        pytest.fail("left signal handlers changed in the pytest process: " + ", ".join(
            f"{signal.Signals(sig).name} -> {handler!r}" for sig, handler in leaked.items()))
