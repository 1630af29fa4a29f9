"""Multi-node training through the user's own entry points, on a 2-node Slurm cluster on this
host (tests/slurm_cluster.py: each node a slurmd with its own host name, loopback address and
/etc/hosts, in its own UTS + mount namespace), CPU, the tiny model on mock data.

1. DP across nodes: `NODES=2 examples/slurm/submit.sh tiny` (one trainer per node, DP=2) prints
   the same per-iteration lm_loss as the same layout on one node (`examples/launch.sh`, two
   trainers).
2. Signals across nodes, each rank getting each signal once (examples/slurm/pretrain.sbatch's
   header says who signals whom): SIGUSR1 on the batch shell (Slurm's pre-timeout warning) ->
   every rank saves once and exits 0, the job requeues and resumes on both nodes; scancel
   (SIGTERM from Slurm to every process) -> every rank saves once and exits 0, no "second
   SIGTERM". The time limit (training.exit_duration_in_mins) -> save, requeue, resume on both.
3. Faults across nodes (docs/launching.md, "Failures"): a node's trainers killed, a node hung
   (SIGSTOP), a node lost (slurmd and processes gone), each ending as promised there.

Skipped, with the reason, where Slurm, munge or root are missing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import FINAL_STATES, SlurmCluster, find_or_install_slurm, slurm_cluster

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "examples" / "slurm" / "submit.sh"
PRETRAIN = ROOT / "examples" / "slurm" / "pretrain.sbatch"
LAUNCH = ROOT / "examples" / "launch.sh"
JOB_TIMEOUT_S = 240
# The same lr schedule however many iterations a job is given (resuming with another schedule
# is refused); one log line per iteration, no evaluation.
COMMON = ["training.log_interval=1", "training.eval_interval=0", "optimizer.lr_warmup_iters=2",
          "optimizer.lr_decay_iters=1000"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    reason = find_or_install_slurm()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as c:
        yield c


def _env(root: Path, **extra: str) -> dict[str, str]:
    """One CPU trainer per node; nothing about addresses: the job finds node0 by name."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MASTER_", "GLOO_", "NCCL_")) and k not in ("RANK", "WORLD_SIZE")}
    env.update(DEVICE="cpu", NPROC_PER_NODE="1", CKPT_ROOT=str(root / "ckpt"),
               LOG_DIR=str(root / "logs"), TENSORBOARD_DIR=str(root / "tb"),
               OMP_NUM_THREADS="1", SHUTDOWN_TIMEOUT="60", CONFIG="tiny", MOCK_DATA="true")
    env.update(extra)
    return env


def _losses(log: str) -> list[tuple[int, str]]:
    """(iteration, lm_loss as printed) for every iteration line."""
    return [(int(i), x) for i, x in re.findall(r"iteration (\d+)/\d+ .*?lm_loss (\d+\.\d+)", log)]


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for_log(cluster: SlurmCluster, job: str, log: Path, pattern: str, count: int = 1,
                  timeout_s: float = JOB_TIMEOUT_S, allow_end: bool = False) -> str:
    """Wait until ``pattern`` occurs ``count`` times in the job's log; fail if the job ends
    first (unless ``allow_end``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = _read(log)
        if len(re.findall(pattern, text)) >= count:
            return text
        state = cluster.state(job)
        if state in FINAL_STATES and not allow_end:
            time.sleep(1)
            text = _read(log)
            if len(re.findall(pattern, text)) >= count:
                return text
            pytest.fail(f"job {job} ended ({state}) before {pattern!r} x{count} in its log:\n{text}")
        time.sleep(0.5)
    pytest.fail(f"no {pattern!r} x{count} in job {job}'s log after {timeout_s} s:\n{_read(log)}")


def _no_walls(text: str) -> None:
    """No torchrun-agent logs or tracebacks, no second-signal exits, in a job's log."""
    for wall in ("Traceback", "ChildFailedError", "SignalException", "elastic/agent",
                 "closing signal", "second SIGTERM", "second SIGINT"):
        assert wall not in text, f"{wall!r} in the job's log:\n{text}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ITERS = 6


@pytest.mark.timeout(400)
def test_dp_across_two_nodes_prints_the_losses_of_one_node(cluster, tmp_path):
    """DP=2 as one trainer on each of 2 nodes (submit.sh, NODES=2) and as two trainers on one
    node (launch.sh): the same lm_loss at every iteration, to the printed decimals."""
    args = [f"training.train_iters={ITERS}", *COMMON]
    env = _env(tmp_path, NODES="2")
    done = cluster.run(str(SUBMIT), "tiny", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    job = re.search(r"Submitted batch job (\d+)", done.stdout).group(1)

    # Meanwhile nothing: two cores. Then the same layout on one node, without Slurm.
    state = cluster.wait(job, JOB_TIMEOUT_S)
    logs = list((tmp_path / "logs").glob(f"*-{job}.out"))
    two = _read(logs[0]) if logs else "(no log)"
    assert state == "COMPLETED", two
    assert "world 2 = TP 1 x PP 1 x CP 1 x DP 2" in two, two
    assert re.search(r"node 0/2 on node0", two) and re.search(r"node 1/2 on node1", two), two
    _no_walls(two)

    port = str(_free_port())
    one_env = _env(tmp_path / "one", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, RDZV_ID=f"one-{port}", GLOO_SOCKET_IFNAME="lo")
    one = subprocess.run(["bash", str(LAUNCH), *args], env=one_env, capture_output=True,
                         text=True, timeout=JOB_TIMEOUT_S)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "world 2 = TP 1 x PP 1 x CP 1 x DP 2" in one.stdout + one.stderr
    reference = _losses(one.stdout + one.stderr)
    assert [i for i, _ in reference] == list(range(1, ITERS + 1)), one.stdout + one.stderr
    assert _losses(two) == reference, f"2 nodes: {_losses(two)}\n1 node:  {reference}"


@pytest.mark.timeout(500)
def test_usr1_saves_once_requeues_resumes_on_both_nodes_then_sigterm_saves_once(cluster,
                                                                                tmp_path):
    """SIGUSR1 on the batch shell: every rank saves once and exits 0, the job requeues and
    resumes on both nodes. Then scancel (SIGTERM from Slurm to every process of the job on
    every node): the ranks save once more and exit 0; none takes the second-SIGTERM exit."""
    log = tmp_path / "job.out"
    ckpt = tmp_path / "ckpt"
    env = _env(tmp_path, CKPT_DIR=str(ckpt), TRAIN_ITERS="100000")
    job = cluster.sbatch([f"--output={log}", "--nodes=2", "--exclusive", str(PRETRAIN), *COMMON],
                         env=env, cwd=tmp_path)
    _wait_for_log(cluster, job, log, r"iteration 2/100000")

    signalled = cluster.run("scancel", "--signal=USR1", "--batch", job)
    assert signalled.returncode == 0, signalled.stderr
    text = _wait_for_log(cluster, job, log, r"resumed from checkpoint at iteration \d+")
    before, after = text.split(f"requeueing job {job}")
    saved = [int(i) for i in re.findall(r"saved checkpoint at iteration (\d+)", before)]
    assert len(saved) == 1 and saved[0] >= 2, before
    assert "exiting on signal" in before, before
    # Every trainer of every node exited 0: srun's status is 0 and no node agent names a
    # failed rank.
    assert "== trainers exited with 0 after SIGUSR1" in before, before
    assert "megatron-mile-node:" not in before, before
    assert f"== job {job} (restart 1) on 2 node(s): node[0-1]" in after, text
    text = _wait_for_log(cluster, job, log, rf"iteration {saved[0] + 2}/100000")
    after = text.split(f"requeueing job {job}")[1]
    assert "node 0/2 on node0" in after and "node 1/2 on node1" in after, after
    assert f"resumed from checkpoint at iteration {saved[0]}" in after, after
    assert cluster.job(job).get("Restarts") == "1"

    # scancel: Slurm's SIGTERM reaches each trainer once (no agent or script forwards it).
    cancelled = cluster.run("scancel", job)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cluster.wait(job, 120) == "CANCELLED"
    text = _wait_for_log(cluster, job, log, r"== trainers exited with \d+", count=1,
                         timeout_s=30, allow_end=True)
    after = text.split(f"requeueing job {job}")[1]
    resaved = re.findall(r"saved checkpoint at iteration (\d+)", after)
    assert len(resaved) == 1 and int(resaved[0]) > saved[0], after
    assert "megatron-mile-node: node0: got SIGTERM (as did every trainer, from Slurm); " \
           "the trainers exited 0" in after, after
    assert "megatron-mile-node: node1" not in after, after
    assert "== trainers exited with 0" in after, after
    _no_walls(text)
