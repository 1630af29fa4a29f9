"""Real trainer processes for the fault tests: ``python -m megatron_mile.train`` ranks joined
over gloo on a free loopback port (no torchrun), each with its own stdout/stderr file, so a
test can stop, kill or signal one rank by PID and read what every rank printed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

TINY = ["--config", "tiny", "training.eval_interval=0", "training.log_interval=1",
        "optimizer.lr_warmup_iters=2", "optimizer.lr_decay_iters=40"]
"""The shipped debug model, every iteration logged, no evaluation."""


def launch(tmp: Path, name: str, overrides: list[str], world_size: int = 2,
           tp: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
    """``world_size`` trainer ranks (TP=``tp``) of ``TINY`` + ``overrides``; rank r writes
    ``tmp/<name><r>.out`` and ``.err``. Training runs until the overrides stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world_size):
        rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_mile.train", *TINY, "training.train_iters=100000",
             f"parallel.tensor_model_parallel_size={tp}", *overrides],
            env=rank_env, stdout=open(tmp / f"{name}{rank}.out", "w"),
            stderr=open(tmp / f"{name}{rank}.err", "w")))
    return procs


def wait_for_line(tmp: Path, name: str, procs, needle: str, timeout_s: float = 180) -> None:
    """Until the logging rank (the last) has printed ``needle``; fails if a rank exits."""
    log = tmp / f"{name}{len(procs) - 1}.out"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in log.read_text():
            return
        assert all(p.poll() is None for p in procs), (
            f"a rank exited before {needle!r}: " + (tmp / f"{name}{len(procs) - 1}.err").read_text())
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not printed within {timeout_s} s: {log.read_text()}")


def wait_for_training(tmp: Path, name: str, procs, timeout_s: float = 180) -> None:
    """Until the logging rank has reported iteration 3."""
    wait_for_line(tmp, name, procs, "iteration 3/", timeout_s)


def wait_all(procs, timeout_s: float = 240) -> list[int]:
    """Every rank's exit code; whatever still runs after ``timeout_s`` is killed (and the
    wait fails)."""
    try:
        return [p.wait(timeout=timeout_s) for p in procs]
    finally:
        kill(procs)


def wait_for_files(directory: Path, names: list[str], procs, timeout_s: float = 60) -> None:
    """Until every one of ``names`` exists in ``directory`` (the data files of a save in
    progress, in its ``.tmp``); fails if a rank exits first."""
    deadline = time.monotonic() + timeout_s
    while not all((directory / n).exists() for n in names):
        assert all(p.poll() is None for p in procs), f"a rank exited before {names} existed"
        assert time.monotonic() < deadline, f"no {names} in {directory} after {timeout_s} s"
        time.sleep(0.02)


def kill(procs) -> None:
    """SIGKILL what still runs (also a SIGSTOPped rank) and reap it."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def one_line(stderr: str) -> str:
    """The only non-empty line of ``stderr`` (fails, showing it, if there are more)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]
