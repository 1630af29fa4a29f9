"""The project's real Slurm scripts on a one-node Slurm cluster, on CPU: the tiny model with
mock data, 2 processes (TP=2) in one job.

1. examples/slurm/submit.sh tiny: the job completes, lm_loss goes down, a checkpoint is saved.
2. examples/slurm/pretrain.sbatch submitted again on that checkpoint: it resumes; then, as
   Slurm does before a time limit, the batch shell gets SIGUSR1: the trainers save and exit,
   the job requeues itself, and the requeued job resumes from the new checkpoint.

Skipped, with the reason, only where Slurm and munge cannot be installed
(.ci/install_test_tools.sh installs them; tests/slurm_cluster.py tries apt-get itself).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from slurm_cluster import (FINAL_STATES, SlurmCluster, _uts_ns, find_or_install_slurm,
                           slurm_cluster)

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "examples" / "slurm" / "submit.sh"
PRETRAIN = ROOT / "examples" / "slurm" / "pretrain.sbatch"
FIRST_ITERS = 8
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    reason = find_or_install_slurm()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _job_env(root: Path, **extra: str) -> dict[str, str]:
    """CPU, two processes with TP=2, everything on loopback and under ``root``."""
    env = dict(DEVICE="cpu", NPROC_PER_NODE="2", TP="2", CKPT_ROOT=str(root / "ckpt"),
               LOG_DIR=str(root / "logs"), TENSORBOARD_DIR=str(root / "tb"),
               MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               SHUTDOWN_TIMEOUT="120")
    env.update(extra)
    return env


def _losses(log: str) -> list[tuple[int, float]]:
    return [(int(i), float(x)) for i, x in
            re.findall(r"iteration (\d+)/\d+ .*?lm_loss (\d+\.\d+)", log)]


def _wait_for_log(cluster: SlurmCluster, job: str, log: Path, pattern: str,
                  count: int = 1, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Wait until ``pattern`` occurs ``count`` times in the job's log; fail early if it ends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if len(re.findall(pattern, text)) >= count:
            return text
        state = cluster.state(job)
        if state in FINAL_STATES:
            pytest.fail(f"job {job} ended ({state}) before {pattern!r} x{count} in its log:\n{text}")
        time.sleep(1)
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    pytest.fail(f"no {pattern!r} x{count} in job {job}'s log after {timeout_s} s:\n{text}")


def test_cluster_daemons_stop_even_when_the_body_fails(tmp_path):
    reason = find_or_install_slurm()
    if reason:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"):
        with slurm_cluster(tmp_path, nodes=2) as c:
            daemons = dict(c.procs)
            namespaces = dict(c.namespaces)
            in_nodes = {n: c.node_pids(n) for n in c.nodes}
            raise RuntimeError("boom")
    assert set(daemons) == {"munged", "slurmctld", "slurmd-node0", "slurmd-node1"}
    for name, proc in daemons.items():
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) still runs"
    # Each node had its own namespace (with its slurmd in it), and nothing is left in any.
    assert len(set(namespaces.values())) == 2 and all(in_nodes.values()), (namespaces, in_nodes)
    left = [pid for pid in Path("/proc").iterdir() if pid.name.isdigit()
            and _uts_ns(int(pid.name)) in namespaces.values()]
    assert not left, f"processes left in the nodes' namespaces: {left}"


# The same lr schedule in both jobs although train_iters grows (8 -> 100000): resuming with a
# different schedule is an error unless told which to use.
SCHEDULE = ["optimizer.lr_warmup_iters=2", "optimizer.lr_decay_iters=1000"]


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    env = _job_env(root)
    done = cluster.run(str(SUBMIT), "tiny", f"training.train_iters={FIRST_ITERS}",
                       "training.log_interval=1", "training.eval_interval=0", *SCHEDULE,
                       env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    job = re.search(r"Submitted batch job (\d+)", done.stdout).group(1)
    state = cluster.wait(job, JOB_TIMEOUT_S)
    logs = list((root / "logs").glob(f"*-{job}.out"))
    log = logs[0].read_text(errors="replace") if logs else "(no log)"
    return {"job": job, "state": state, "log": log, "ckpt": root / "ckpt" / "tiny-mile-g1.0"}


@pytest.mark.timeout(420)
def test_tiny_job_completes_learns_and_saves(first_run):
    log = first_run["log"]
    assert first_run["state"] == "COMPLETED", log
    losses = _losses(log)
    assert [i for i, _ in losses] == list(range(1, FIRST_ITERS + 1)), log
    first, last = losses[0][1], losses[-1][1]
    assert last < first - 0.05, f"lm_loss did not go down: {losses}"
    assert f"saved checkpoint at iteration {FIRST_ITERS} to {first_run['ckpt']}" in log, log
    assert any(first_run["ckpt"].iterdir()), "the checkpoint directory is empty"


@pytest.mark.timeout(600)
def test_resume_then_save_requeue_and_resume_on_usr1(cluster, first_run, tmp_path):
    assert first_run["state"] == "COMPLETED", first_run["log"]
    log = tmp_path / "job.out"
    # Straight through sbatch this time: the script finds the checkout on its own.
    env = _job_env(tmp_path, CONFIG="tiny", CKPT_DIR=str(first_run["ckpt"]),
                   TRAIN_ITERS="100000", MOCK_DATA="true")
    job = cluster.sbatch([f"--output={log}", "--nodes=1", "--exclusive", str(PRETRAIN),
                          "training.log_interval=1", "training.eval_interval=0", *SCHEDULE],
                         env=env, cwd=tmp_path)
    _wait_for_log(cluster, job, log, rf"resumed from checkpoint at iteration {FIRST_ITERS}\b")
    _wait_for_log(cluster, job, log, rf"iteration {FIRST_ITERS + 2}/100000")

    # What Slurm sends before the time limit (--signal=B:USR1@...): to the batch shell only.
    signalled = cluster.run("scancel", "--signal=USR1", "--batch", job)
    assert signalled.returncode == 0, signalled.stderr
    text = _wait_for_log(cluster, job, log, r"resumed from checkpoint at iteration \d+", count=2)
    saved = [int(i) for i in re.findall(r"saved checkpoint at iteration (\d+)", text)]
    assert len(saved) == 1 and saved[0] > FIRST_ITERS + 1, text
    # The requeued job trains on from the iteration after the one it saved.
    text = _wait_for_log(cluster, job, log, rf"iteration {saved[0] + 1}/100000")
    assert cluster.job(job).get("Restarts") == "1"
    cluster.run("scancel", job)

    before, after = text.split(f"requeueing job {job}")
    assert "exiting on signal" in before, text
    resumed = [int(i) for i in re.findall(r"resumed from checkpoint at iteration (\d+)", text)]
    assert resumed == [FIRST_ITERS, saved[0]], text
    assert f"== job {job} (restart 1)" in after, text


@pytest.mark.timeout(420)
def test_time_limit_stops_saves_and_requeues(cluster, tmp_path):
    """pretrain.sbatch turns the job's time limit (1 minute here) minus EXIT_MARGIN_MINUTES
    into training.exit_duration_in_mins; the trainers save and exit 0 before the limit, the
    script sees why (MILE_EXIT_FILE) and requeues, and the requeued job resumes."""
    log = tmp_path / "job.out"
    ckpt = tmp_path / "ckpt"
    env = _job_env(tmp_path, CONFIG="tiny", CKPT_DIR=str(ckpt), TRAIN_ITERS="100000",
                   MOCK_DATA="true", EXIT_MARGIN_MINUTES="0.9")
    # SIGUSR1 only 5 s before the limit: the time limit, not the signal, must stop the run.
    job = cluster.sbatch([f"--output={log}", "--nodes=1", "--exclusive", "--time=1",
                          "--signal=B:USR1@5", str(PRETRAIN), "training.log_interval=1",
                          "training.eval_interval=0", *SCHEDULE], env=env, cwd=tmp_path)
    text = _wait_for_log(cluster, job, log, r"resumed from checkpoint at iteration \d+")
    cluster.run("scancel", job)
    before, after = text.split(f"requeueing job {job}")
    assert re.search(r"the trainers save and stop after 0\.\d+ \(EXIT_MARGIN_MINUTES=0\.9\)",
                     before), before
    stopped = re.search(r"exiting (\d\.\d+) minutes after the job started "
                        r"\(training\.exit_duration_in_mins=(0\.\d+)\)", before)
    assert stopped and float(stopped.group(1)) >= float(stopped.group(2)), before
    assert "saved and stopped before the time limit" in before, before
    # The time limit, not the signal, stopped the run: the trainers were exiting before any
    # SIGUSR1 reached the script (under load it may still come, 5 s before the limit).
    assert "got SIGUSR1" not in before.split(stopped.group(0))[0], before
    saved = int(re.findall(r"saved checkpoint at iteration (\d+)", before)[-1])
    assert f"== job {job} (restart 1)" in after, text
    assert f"resumed from checkpoint at iteration {saved}" in after, text
