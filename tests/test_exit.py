"""Stopping before a wall-clock limit or at a chosen step: the trainer saves, exits 0, says
why (``MILE_EXIT_FILE``), and the next start resumes from that checkpoint.

The Slurm side (examples/slurm/pretrain.sbatch turning the job's time limit into
``training.exit_duration_in_mins`` and requeueing) runs on a real cluster in
tests/test_multinode.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_mile.testing import run_distributed
from trainer_runs import run_trainer


REPO = Path(__file__).resolve().parents[1]


def _launch(ckpt: Path, exit_file: Path, job_start: float | None = None) -> tuple[int, str]:
    """The tiny model at TP=2 over 2 processes with a 0.05-minute (3 s) limit."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MILE_EXIT_FILE": str(exit_file)}
    env.pop("MILE_JOB_START_TIME", None)
    if job_start is not None:
        env["MILE_JOB_START_TIME"] = str(job_start)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_mile.train", "--config", "tiny", "data.mock=true",
           "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
           "training.train_iters=100000", "training.exit_duration_in_mins=0.05",
           "training.log_interval=1", "training.eval_interval=0", f"checkpoint.save={ckpt}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow  # two torchrun launches
def test_time_limit_saves_exits_0_and_resumes_at_tp2(tmp_path):
    ckpt, exit_file = tmp_path / "ckpt", tmp_path / "exit.json"
    rc, log = _launch(ckpt, exit_file)
    assert rc == 0, log[-4000:]
    stopped = json.loads(exit_file.read_text())
    assert stopped["reason"] == "time_limit" and stopped["iteration"] >= 1, stopped
    first = stopped["iteration"]
    assert re.search(r"exiting 0\.\d+ minutes after the job started "
                     r"\(training\.exit_duration_in_mins=0\.05\); resume", log), log[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(first)
    assert f"iteration {first}/100000" in log

    # Started again, as a requeued job is; MILE_JOB_START_TIME (what the batch script exports)
    # says the job began 10 s ago, past the 3 s limit: exactly one more iteration, then stop.
    rc, log = _launch(ckpt, exit_file, job_start=time.time() - 10)
    assert rc == 0, log[-4000:]
    assert f"resumed from checkpoint at iteration {first}" in log, log[-3000:]
    assert json.loads(exit_file.read_text()) == {"reason": "time_limit", "iteration": first + 1}
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(first + 1)


def _exit_interval_runs(rank: int, world_size: int, ckpt: str) -> list[dict]:
    overrides = ["training.train_iters=10", "training.exit_interval=3", "training.eval_interval=0",
                 f"checkpoint.save={ckpt}"]
    return [run_trainer(overrides, world_size) for _ in range(2)]


@pytest.mark.slow  # two trainer runs
def test_exit_interval_saves_and_stops_at_each_multiple(tmp_path):
    first, second = run_distributed(_exit_interval_runs, 1, args=(str(tmp_path),),
                                    timeout_s=300)[0]
    assert (first["exit_reason"], first["iteration"]) == ("exit_interval", 3)
    assert [h["iteration"] for h in second["history"]] == [4, 5, 6]
    assert (second["exit_reason"], second["iteration"]) == ("exit_interval", 6)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_bad_limits_are_config_errors(value):
    from megatron_mile.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"training.exit_duration_in_mins={value}"):
        load_config("tiny", [f"training.exit_duration_in_mins={value}"])


def test_the_job_start_comes_from_the_batch_script(monkeypatch):
    from megatron_mile.config import load_config
    from megatron_mile.launch import job_start_time
    from megatron_mile.training.trainer import Trainer

    monkeypatch.setenv("MILE_JOB_START_TIME", "1764400000.5")
    assert job_start_time() == 1764400000.5
    assert Trainer(load_config("tiny")).job_start == 1764400000.5
    monkeypatch.setenv("MILE_JOB_START_TIME", "yesterday")
    with pytest.raises(ValueError, match=r"MILE_JOB_START_TIME='yesterday' is not a Unix time"):
        job_start_time()
    monkeypatch.delenv("MILE_JOB_START_TIME")
    assert job_start_time() <= time.time()
