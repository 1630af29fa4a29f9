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
4. PP across 2 nodes and TP across nodes on a 4-node cluster, against one node.

Tests marked ``multinode_full`` (3. and 4.) exceed the suite's time budget on 2 cores and are
skipped unless MILE_MULTINODE_FULL=1 (tests/conftest.py).

Skipped, with the reason, where Slurm, munge or root are missing.
"""

from __future__ import annotations

import contextlib
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


@pytest.fixture(autouse=True)
def _cancel_jobs_left(request):
    """A failed test must not leave its job holding the nodes for the next one."""
    yield
    if "cluster" in request.fixturenames:
        c = request.getfixturevalue("cluster")
        jobs = c.run("squeue", "--noheader", "--format=%i").stdout.split()
        if jobs:
            c.run("scancel", *jobs)
            deadline = time.monotonic() + 60
            while c.run("squeue", "--noheader").stdout.strip() and time.monotonic() < deadline:
                time.sleep(1)


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
FULL = pytest.mark.multinode_full  # beyond the default suite's time: MILE_MULTINODE_FULL=1


def _compare_with_one_node(cluster: SlurmCluster, tmp_path: Path, nodes: int,
                           layout: dict[str, str], world: str) -> None:
    """``layout`` with one trainer per node on ``nodes`` nodes (submit.sh), then on one node
    with ``nodes`` trainers (launch.sh): the same lm_loss at every iteration, as printed."""
    args = [f"training.train_iters={ITERS}", *COMMON]
    env = _env(tmp_path, NODES=str(nodes), **layout)
    done = cluster.run(str(SUBMIT), "tiny", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    job = re.search(r"Submitted batch job (\d+)", done.stdout).group(1)
    state = cluster.wait(job, JOB_TIMEOUT_S)
    logs = list((tmp_path / "logs").glob(f"*-{job}.out"))
    many = _read(logs[0]) if logs else "(no log)"
    assert state == "COMPLETED", many
    assert world in many, many
    for i in range(nodes):
        assert f"node {i}/{nodes} on node{i}" in many, many
    _no_walls(many)

    port = str(_free_port())  # the same layout on one node, without Slurm
    one_env = _env(tmp_path / "one", NPROC_PER_NODE=str(nodes), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, RDZV_ID=f"one-{port}", GLOO_SOCKET_IFNAME="lo", **layout)
    one = subprocess.run(["bash", str(LAUNCH), *args], env=one_env, capture_output=True,
                         text=True, timeout=JOB_TIMEOUT_S)
    out = one.stdout + one.stderr
    assert one.returncode == 0, out
    assert world in out, out
    reference = _losses(out)
    assert [i for i, _ in reference] == list(range(1, ITERS + 1)), out
    assert _losses(many) == reference, f"{nodes} nodes: {_losses(many)}\n1 node: {reference}"


@pytest.mark.timeout(400)
def test_dp_across_two_nodes_prints_the_losses_of_one_node(cluster, tmp_path):
    """DP=2 as one trainer on each of 2 nodes (submit.sh, NODES=2) and as two trainers on one
    node (launch.sh): the same lm_loss at every iteration, to the printed decimals."""
    _compare_with_one_node(cluster, tmp_path, 2, {}, "world 2 = TP 1 x PP 1 x CP 1 x DP 2")


@FULL
@pytest.mark.timeout(400)
def test_pp_across_two_nodes_prints_the_losses_of_one_node(cluster, tmp_path):
    """PP=2, one stage per node, against PP=2 on one node."""
    _compare_with_one_node(cluster, tmp_path, 2, {"PP": "2"},
                           "world 2 = TP 1 x PP 2 x CP 1 x DP 1")


@FULL
@pytest.mark.timeout(600)
def test_tp_across_nodes_on_four_nodes_prints_the_losses_of_one_node(tmp_path_factory,
                                                                      tmp_path):
    """TP=2 x DP=2 with one trainer on each of 4 nodes (each TP pair spans two nodes),
    against the same layout as 4 trainers on one node."""
    reason = find_or_install_slurm()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm4"), nodes=4) as four:
        _compare_with_one_node(four, tmp_path, 4, {"TP": "2"},
                               "world 4 = TP 2 x PP 1 x CP 1 x DP 2")


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


@pytest.mark.timeout(420)
def test_time_limit_saves_once_requeues_and_resumes_on_both_nodes(cluster, tmp_path):
    """--time=2 with EXIT_MARGIN_MINUTES=1.9: the trainers of both nodes stop by themselves
    (training.exit_duration_in_mins=0.1) after their first iteration, save once and exit 0;
    the script requeues, and the requeued job resumes on both nodes."""
    log = tmp_path / "job.out"
    env = _env(tmp_path, CKPT_DIR=str(tmp_path / "ckpt"), TRAIN_ITERS="100000",
               EXIT_MARGIN_MINUTES="1.9")
    job = cluster.sbatch([f"--output={log}", "--nodes=2", "--exclusive", "--time=2",
                          "--signal=B:USR1@5", str(PRETRAIN), *COMMON], env=env, cwd=tmp_path)
    text = _wait_for_log(cluster, job, log, r"resumed from checkpoint at iteration \d+")
    before, after = text.split(f"requeueing job {job}")
    # The limit is the time left at the script's start minus the margin: 0.1 at most, less
    # when the job started slowly.
    assert re.search(r"exiting \d\.\d+ minutes after the job started "
                     r"\(training\.exit_duration_in_mins=0\.\d+\)", before), before
    saved = [int(i) for i in re.findall(r"saved checkpoint at iteration (\d+)", before)]
    assert len(saved) == 1, before
    assert "== trainers saved and stopped before the time limit" in before, before
    assert "megatron-mile-node:" not in before, before  # no rank of any node failed
    assert f"== job {job} (restart 1) on 2 node(s): node[0-1]" in after, text
    text = _wait_for_log(cluster, job, log, rf"iteration {saved[0] + 1}/100000")
    cluster.run("scancel", job)
    assert cluster.wait(job, 60) == "CANCELLED", _read(log)  # not requeued by the script
    after = text.split(f"requeueing job {job}")[1]
    assert f"resumed from checkpoint at iteration {saved[0]}" in after, after
    assert "node 0/2 on node0" in after and "node 1/2 on node1" in after, after
    _no_walls(text)


# ---- Faults across nodes ---------------------------------------------------------------

def _trainer_pids(cluster: SlurmCluster, node: str) -> list[int]:
    """The trainers running on ``node``: the processes torchrun's agent started (LOCAL_RANK
    in their environment) running megatron_mile.train; not the agent, whose arguments name
    the module too."""
    pids = []
    for pid in cluster.job_pids(node):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"megatron_mile.train" in cmd and b"\0LOCAL_RANK=" in env:
            pids.append(pid)
    return pids


def _start_training(cluster: SlurmCluster, tmp_path: Path, log: Path, *extra: str,
                    **env: str) -> str:
    """A 2-node job that saves every 2 iterations; returns once iteration 4 is logged."""
    e = _env(tmp_path, CKPT_DIR=str(tmp_path / "ckpt"), TRAIN_ITERS="100000",
             SAVE_INTERVAL="2", **env)
    job = cluster.sbatch([f"--output={log}", "--nodes=2", "--exclusive", str(PRETRAIN),
                          *COMMON, *extra], env=e, cwd=tmp_path)
    _wait_for_log(cluster, job, log, r"saved checkpoint at iteration 4\b")
    return job


def _resubmit_resumes(cluster: SlurmCluster, tmp_path: Path, at_least: int) -> None:
    """Submitting the same command again resumes on both nodes from a saved iteration."""
    log = tmp_path / "again.out"
    e = _env(tmp_path, CKPT_DIR=str(tmp_path / "ckpt"), TRAIN_ITERS="100000", SAVE_INTERVAL="2")
    job = cluster.sbatch([f"--output={log}", "--nodes=2", "--exclusive", str(PRETRAIN), *COMMON],
                         env=e, cwd=tmp_path)
    text = _wait_for_log(cluster, job, log, r"resumed from checkpoint at iteration (\d+)")
    resumed = int(re.search(r"resumed from checkpoint at iteration (\d+)", text).group(1))
    assert resumed >= at_least, text
    text = _wait_for_log(cluster, job, log, rf"iteration {resumed + 1}/100000")
    assert "node 0/2 on node0" in text and "node 1/2 on node1" in text, text
    cluster.run("scancel", job)
    cluster.wait(job, 60)


@FULL
@pytest.mark.timeout(500)
def test_killed_trainers_on_one_node_end_the_job_cleanly_and_a_resubmission_resumes(cluster,
                                                                                    tmp_path):
    log = tmp_path / "job.out"
    job = _start_training(cluster, tmp_path, log)
    victims = _trainer_pids(cluster, "node1")
    assert victims, f"no trainer found on node1: {cluster.job_pids('node1')}"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert cluster.wait(job, 90) == "FAILED", _read(log)
    took = time.monotonic() - killed_at
    time.sleep(1)
    text = _read(log)
    after = text.split("saved checkpoint at iteration 4")[1]
    # node1: which rank, where, how; node0: the dead-peer line; the job: one status line.
    assert re.search(r"megatron-mile-node: node1: rank 1 \(local rank 0, pid \d+\) was killed "
                     r"by SIGKILL", after), after
    assert re.search(r"megatron-mile-train: rank 0: a collective failed in iteration \d+ "
                     r"\(.*\): a peer rank died or hung", after), after
    assert re.search(r"== trainers exited with [1-9]\d*", after), after
    assert "does not answer" not in after, after  # every node answered: no wait for a requeue
    _no_walls(text)
    assert took < 60, f"the job took {took:.0f} s to end after node1's trainers died"
    assert cluster.job(job).get("Restarts") == "0"
    _resubmit_resumes(cluster, tmp_path, at_least=4)


@FULL
@pytest.mark.timeout(500)
def test_hung_node_is_ended_by_the_watchdog_within_the_timeout(cluster, tmp_path):
    log = tmp_path / "job.out"
    timeout_min = 0.4  # 24 s
    job = _start_training(cluster, tmp_path, log,
                          f"parallel.distributed_timeout_minutes={timeout_min}")
    frozen = cluster.job_pids("node1")
    assert _trainer_pids(cluster, "node1"), frozen
    for pid in frozen:  # the node's trainers and agent freeze; its slurmd still answers
        os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        assert cluster.wait(job, 120) == "FAILED", _read(log)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    took = time.monotonic() - stopped_at
    time.sleep(1)
    text = _read(log)
    after = text.split("saved checkpoint at iteration 4")[1]
    assert re.search(r"megatron-mile-train: rank 0: no progress for \d+ s in iteration \d+ "
                     r"\(.*\): a peer rank is hung or dead", after), after
    assert re.search(r"megatron-mile-node: node0: rank 0 \(local rank 0, pid \d+\) exited "
                     r"with 3 \(a peer rank died or hung\)", after), after
    _no_walls(text)
    assert took < timeout_min * 60 + 45, f"the job ended {took:.0f} s after node1 froze"


@FULL
@pytest.mark.timeout(600)
def test_lost_node_is_marked_down_and_the_job_requeues_and_resumes_when_it_returns(cluster,
                                                                                   tmp_path):
    log = tmp_path / "job.out"
    job = _start_training(cluster, tmp_path, log)
    saved = max(int(i) for i in re.findall(r"saved checkpoint at iteration (\d+)", _read(log)))
    cluster.kill_node("node1")  # its slurmd and every process on it
    try:
        deadline = time.monotonic() + 120
        while not cluster.node_states().get("node1", "").startswith("down"):
            assert time.monotonic() < deadline, (cluster.node_states(), _read(log))
            time.sleep(1)
        # Slurm requeues the --requeue job (NODE_FAIL); it waits for two nodes.
        deadline = time.monotonic() + 60
        while cluster.job(job).get("Restarts") != "1":
            assert time.monotonic() < deadline, (cluster.job(job), _read(log))
            time.sleep(1)
        assert cluster.state(job) in ("COMPLETING", "REQUEUED", "PENDING"), cluster.job(job)
        assert "DUE TO NODE FAILURE" in _read(log), _read(log)
    finally:
        cluster.start_node("node1")
    text = _wait_for_log(cluster, job, log, r"resumed from checkpoint at iteration \d+")
    after = text.split(f"== job {job} (restart 1)")[1]
    resumed = int(re.search(r"resumed from checkpoint at iteration (\d+)", after).group(1))
    assert resumed >= saved, text
    text = _wait_for_log(cluster, job, log, rf"iteration {resumed + 1}/100000")
    after = text.split(f"== job {job} (restart 1)")[1]
    assert "node 0/2 on node0" in after and "node 1/2 on node1" in after, after
    cluster.run("scancel", job)
    cluster.wait(job, 60)
    _no_walls(text)
