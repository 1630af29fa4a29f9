"""The project's real Slurm scripts in one-node jobs, on CPU: the tiny model with mock data, 2
processes (TP=2) in one job, on the suite's shared Slurm cluster (tests/slurm_cluster.py).

1. The test cluster's daemons stop, and nothing is left in its nodes, also when the body
   fails.
2. examples/slurm/submit.sh tiny: the job completes, lm_loss goes down, a checkpoint is saved.

Resuming a job from an earlier one's checkpoint, SIGUSR1 before the time limit, the time limit
itself, requeues and scancel are tested across nodes, where they matter most: in
tests/test_multinode.py.

Skipped, with the reason, only where Slurm and munge cannot be installed
(.ci/install_test_tools.sh installs them; tests/slurm_cluster.py tries apt-get itself).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slurm_cluster import _uts_ns, find_or_install_slurm, slurm_cluster

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "examples" / "slurm" / "submit.sh"
FIRST_ITERS = 8
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


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
