"""Multi-node training through the user's own entry points, on the suite's Slurm cluster of 4
nodes on this host (tests/slurm_cluster.py: each node a slurmd with its own host name, loopback
address and /etc/hosts, in its own UTS + mount namespace), CPU, the tiny model on mock data.

1. Layouts across nodes, each printing the per-iteration lm_loss of the same layout on one node
   (`examples/launch.sh`): DP=2 on 2 nodes (`NODES=2 examples/slurm/submit.sh tiny`); TP=2 x
   PP=2 on 4 nodes, one trainer per node, so that both the TP pairs and the pipeline stages
   span nodes.
2. Signals across nodes, each rank getting each signal once (examples/slurm/pretrain.sbatch's
   header says who signals whom), in a job that resumes from the DP job's checkpoint
   (`sbatch pretrain.sbatch` straight): SIGUSR1 on the batch shell (Slurm's pre-timeout warning) ->
   every rank saves once and exits 0, the job requeues and resumes on both nodes; scancel
   (SIGTERM from Slurm to every process) -> every rank saves once and exits 0, no "second
   SIGTERM". The time limit (training.exit_duration_in_mins) -> save, requeue, resume on both.
3. Faults across nodes (docs/launching.md, "Failures"), one checkpoint directory handed from
   case to case, so that the resubmission after one fault is the job of the next: a node's
   trainers killed (the job fails at once, one dead-peer line for the surviving node, a
   resubmission resumes), a node hung (SIGSTOP: the watchdog ends the job within the timeout),
   a node lost (slurmd and processes gone: Slurm marks it down, requeues the job, which resumes
   on two nodes that are up).

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

from slurm_cluster import SlurmCluster, wait_for_log

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


def _env(root: Path, **extra: str) -> dict[str, str]:
    """One CPU trainer per node; nothing about addresses: the job finds its first node by
    name."""
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


def _no_walls(text: str) -> None:
    """No torchrun-agent logs or tracebacks, no second-signal exits, in a job's log."""
    for wall in ("Traceback", "ChildFailedError", "SignalException", "elastic/agent",
                 "closing signal", "second SIGTERM", "second SIGINT"):
        assert wall not in text, f"{wall!r} in the job's log:\n{text}"


def _srun_lines(text: str) -> list[str]:
    """Slurm's own lines in a job's log (srun's, slurmstepd's)."""
    return [line for line in text.splitlines() if re.match(r"(srun|slurmstepd(-\S+)?): ", line)]


SLURM_ENDING_A_STEP = (r"srun: error: \S+: tasks? [\d,-]+: (Exited with exit code \d+|Killed)",
                       r"slurmstepd-\S+: error: \*\*\* STEP [\d.]+ ON \S+ CANCELLED AT \S+ \*\*\*")
"""What Slurm still says when srun --kill-on-bad-exit ends a step (srun --quiet keeps only
its errors): the exit of each failed node's task, and the step's cancellation."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ITERS = 4


def _compare_with_one_node(cluster: SlurmCluster, tmp_path: Path, nodes: int,
                           layout: dict[str, str], world: str) -> Path:
    """``layout`` with one trainer per node on ``nodes`` nodes (submit.sh), then on one node
    with ``nodes`` trainers (launch.sh): the same lm_loss at every iteration, as printed.
    Returns the multi-node job's checkpoint directory."""
    args = [f"training.train_iters={ITERS}", *COMMON]
    env = _env(tmp_path, NODES=str(nodes), **layout)
    done = cluster.run(str(SUBMIT), "tiny", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    job = re.search(r"Submitted batch job (\d+)", done.stdout).group(1)

    # Meanwhile the same layout on one node, without Slurm (the cluster's nodes are this host:
    # the two runs share its cores).
    port = str(_free_port())
    one_env = _env(tmp_path / "one", NPROC_PER_NODE=str(nodes), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, RDZV_ID=f"one-{port}", GLOO_SOCKET_IFNAME="lo", **layout)
    one = subprocess.run(["bash", str(LAUNCH), *args], env=one_env, capture_output=True,
                         text=True, timeout=JOB_TIMEOUT_S)
    out = one.stdout + one.stderr
    assert one.returncode == 0, out
    assert world in out, out
    reference = _losses(out)
    assert [i for i, _ in reference] == list(range(1, ITERS + 1)), out

    state = cluster.wait(job, JOB_TIMEOUT_S)
    logs = list((tmp_path / "logs").glob(f"*-{job}.out"))
    many = _read(logs[0]) if logs else "(no log)"
    assert state == "COMPLETED", many
    assert world in many, many
    for i in range(nodes):
        assert f"node {i}/{nodes} on node{i}" in many, many
    _no_walls(many)
    assert not _srun_lines(many), many
    assert _losses(many) == reference, f"{nodes} nodes: {_losses(many)}\n1 node: {reference}"
    ckpt = tmp_path / "ckpt" / "tiny-mile-g1.0"
    assert f"saved checkpoint at iteration {ITERS} to {ckpt}" in many, many
    return ckpt


@pytest.fixture(scope="module")
def dp_checkpoint(cluster, tmp_path_factory) -> Path:
    """DP=2 across 2 nodes against one node (the test below); its checkpoint is where the
    signal test's job resumes from."""
    return _compare_with_one_node(cluster, tmp_path_factory.mktemp("dp"), 2, {},
                                  "world 2 = TP 1 x PP 1 x CP 1 x DP 2")


@pytest.mark.timeout(400)
def test_dp_across_two_nodes_prints_the_losses_of_one_node(dp_checkpoint):
    """DP=2 as one trainer on each of 2 nodes (submit.sh, NODES=2) and as two trainers on one
    node (launch.sh): the same lm_loss at every iteration, to the printed decimals; the job
    saved its last iteration."""
    assert (dp_checkpoint / "latest_checkpointed_iteration.txt").read_text().strip() == \
        str(ITERS)


@pytest.mark.timeout(500)
def test_tp_and_pp_across_four_nodes_print_the_losses_of_one_node(cluster, tmp_path):
    """TP=2 x PP=2 with one trainer on each of 4 nodes: megatron's rank order puts ranks 0,1
    and 2,3 in TP pairs and 0,2 and 1,3 in pipelines, so every TP pair and every pipeline
    spans two nodes; against the same layout as 4 trainers on one node."""
    _compare_with_one_node(cluster, tmp_path, 4, {"TP": "2", "PP": "2"},
                           "world 4 = TP 2 x PP 2 x CP 1 x DP 1")


@pytest.mark.timeout(500)
def test_usr1_saves_once_requeues_resumes_on_both_nodes_then_sigterm_saves_once(
        cluster, dp_checkpoint, tmp_path):
    """pretrain.sbatch straight (it finds the checkout itself) on the checkpoint submit.sh
    left: it resumes. SIGUSR1 on the batch shell: every rank saves once and exits 0, the job
    requeues and resumes on both nodes. Then scancel (SIGTERM from Slurm to every process of
    the job on every node): the ranks save once more and exit 0; none takes the
    second-SIGTERM exit."""
    log = tmp_path / "job.out"
    env = _env(tmp_path, CKPT_DIR=str(dp_checkpoint), TRAIN_ITERS="100000")
    job = cluster.sbatch([f"--output={log}", "--nodes=2", "--exclusive", str(PRETRAIN), *COMMON],
                         env=env, cwd=tmp_path)
    wait_for_log(cluster, job, log, rf"resumed from checkpoint at iteration {ITERS}\b",
                 timeout_s=JOB_TIMEOUT_S)
    wait_for_log(cluster, job, log, rf"iteration {ITERS + 2}/100000", timeout_s=60)

    signalled = cluster.run("scancel", "--signal=USR1", "--batch", job)
    assert signalled.returncode == 0, signalled.stderr
    text = wait_for_log(cluster, job, log,
                        rf"requeueing job {job}[\s\S]*resumed from checkpoint at iteration",
                        timeout_s=JOB_TIMEOUT_S)
    before, after = text.split(f"requeueing job {job}")
    saved = [int(i) for i in re.findall(r"saved checkpoint at iteration (\d+)", before)]
    assert len(saved) == 1 and saved[0] >= ITERS + 2, before
    assert "exiting on signal" in before, before
    # Every trainer of every node exited 0: srun's status is 0 and no node agent names a
    # failed rank.
    assert "== trainers exited with 0 after SIGUSR1" in before, before
    assert "megatron-mile-node:" not in before, before
    assert re.search(rf"== job {job} \(restart 1\) on 2 node\(s\): ", after), text
    text = wait_for_log(cluster, job, log, rf"iteration {saved[0] + 2}/100000",
                        timeout_s=JOB_TIMEOUT_S)
    after = text.split(f"requeueing job {job}")[1]
    first, second = cluster.job_nodes(job)
    assert f"node 0/2 on {first}" in after and f"node 1/2 on {second}" in after, after
    assert f"resumed from checkpoint at iteration {saved[0]}" in after, after
    assert cluster.job(job).get("Restarts") == "1"

    # scancel: Slurm's SIGTERM reaches each trainer once (no agent or script forwards it).
    cancelled = cluster.run("scancel", job)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cluster.wait(job, 120) == "CANCELLED"
    # the second status line (the first was the one after SIGUSR1)
    text = wait_for_log(cluster, job, log, r"== trainers exited with \d+", count=2,
                        timeout_s=30, allow_end=True)
    after = text.split(f"requeueing job {job}")[1]
    resaved = re.findall(r"saved checkpoint at iteration (\d+)", after)
    assert len(resaved) == 1 and int(resaved[0]) > saved[0], after
    assert f"megatron-mile-node: {first}: got SIGTERM (as did every trainer, from Slurm); " \
           "the trainers exited 0" in after, after
    assert f"megatron-mile-node: {second}" not in after, after
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
    text = wait_for_log(cluster, job, log, r"resumed from checkpoint at iteration \d+",
                        timeout_s=JOB_TIMEOUT_S)
    before, after = text.split(f"requeueing job {job}")
    # The limit is the time left at the script's start minus the margin: 0.1 at most, less
    # when the job started slowly; the trainers stop after it, not before.
    assert re.search(r"the trainers save and stop after 0\.\d+ \(EXIT_MARGIN_MINUTES=1\.9\)",
                     before), before
    stopped = re.search(r"exiting (\d\.\d+) minutes after the job started "
                        r"\(training\.exit_duration_in_mins=(0\.\d+)\)", before)
    assert stopped and float(stopped.group(1)) >= float(stopped.group(2)), before
    # The time limit, not the signal, stopped the run: the trainers were exiting before any
    # SIGUSR1 reached the script (under load it may still come, 5 s before the limit).
    assert "got SIGUSR1" not in before.split(stopped.group(0))[0], before
    saved = [int(i) for i in re.findall(r"saved checkpoint at iteration (\d+)", before)]
    assert len(saved) == 1, before
    assert "== trainers saved and stopped before the time limit" in before, before
    assert "megatron-mile-node:" not in before, before  # no rank of any node failed
    assert re.search(rf"== job {job} \(restart 1\) on 2 node\(s\): ", after), text
    text = wait_for_log(cluster, job, log, rf"iteration {saved[0] + 1}/100000",
                        timeout_s=JOB_TIMEOUT_S)
    first, second = cluster.job_nodes(job)
    cluster.run("scancel", job)
    assert cluster.wait(job, 60) == "CANCELLED", _read(log)  # not requeued by the script
    after = text.split(f"requeueing job {job}")[1]
    assert f"resumed from checkpoint at iteration {saved[0]}" in after, after
    assert f"node 0/2 on {first}" in after and f"node 1/2 on {second}" in after, after
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


HUNG_TIMEOUT_MIN = 0.5
"""parallel.distributed_timeout_minutes of the hung-node job (30 s): the hung node's peers
are ended within it. (It also bounds the start's process-group rendezvous, which a loaded
2-core machine can stretch past 15 s.)"""


class _FaultRun:
    """2-node jobs on one checkpoint directory, saving every 3 iterations unless told
    otherwise (the hung and lost nodes may hit a step or a save: the outcome is the same), so
    that each resubmission after a fault resumes from what the one before published."""

    def __init__(self, cluster: SlurmCluster, root: Path) -> None:
        self.cluster, self.root, self.jobs = cluster, root, 0

    def submit(self, *overrides: str, **env: str) -> tuple[str, Path, list[str]]:
        """Submit the job; return its id, log and nodes once it has saved a checkpoint."""
        self.jobs += 1
        log = self.root / f"job{self.jobs}.out"
        e = _env(self.root, **{"CKPT_DIR": str(self.root / "ckpt"), "TRAIN_ITERS": "100000",
                               "SAVE_INTERVAL": "3", "MICRO_BATCH": "2", **env})
        job = self.cluster.sbatch(
            [f"--output={log}", "--nodes=2", "--exclusive", str(PRETRAIN), *COMMON, *overrides],
            env=e, cwd=self.root)
        wait_for_log(self.cluster, job, log, r"saved checkpoint at iteration \d+",
                     timeout_s=JOB_TIMEOUT_S)
        return job, log, self.cluster.job_nodes(job)

    def resumes(self, log: Path, after: int) -> int:
        """The iteration the job's log says it resumed from (asserted > 0 and >= after)."""
        found = re.search(r"resumed from checkpoint at iteration (\d+)", _read(log))
        assert found and int(found.group(1)) >= max(after, 1), _read(log)
        return int(found.group(1))


def _saved(log: Path) -> int:
    return max(int(i) for i in re.findall(r"saved checkpoint at iteration (\d+)", _read(log)))


@pytest.mark.timeout(900)
def test_node_faults_end_as_promised_and_each_resubmission_resumes(cluster, tmp_path):
    """Killed trainers, a hung node, a lost node: three jobs on one checkpoint directory, each
    a resubmission that resumes from the one before."""
    run = _FaultRun(cluster, tmp_path)

    # 1. node B's two trainers killed (2 trainers per node, DP=4) in a training step (the
    # first save at iteration 40, the next 40 iterations later: node A's trainers are in a
    # collective with them, not waiting at a save for their files, which only the watchdog's
    # timeout or Slurm ends: docs/launching.md): node A's two trainers end at once, with one
    # dead-peer line for the node; the job fails with one status line.
    job, log, (node_a, node_b) = run.submit(NPROC_PER_NODE="2", SAVE_INTERVAL="40")
    saved = _saved(log)
    victims = _trainer_pids(cluster, node_b)
    assert len(victims) == 2, f"trainers on {node_b}: {victims} of {cluster.job_pids(node_b)}"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert cluster.wait(job, 90) == "FAILED", _read(log)
    took = time.monotonic() - killed_at
    text = wait_for_log(cluster, job, log, r"== trainers exited with [1-9]", timeout_s=10,
                        allow_end=True)
    after = text.split(f"saved checkpoint at iteration {saved}")[-1]
    # node B: which ranks, where, how, in one line, then its agent waits for Slurm to end the
    # step (megatron_mile/node_agent.py), so that node A's trainers end on their own first:
    # one dead-peer line for the node and one line from its agent (exit 3), never Slurm's
    # "STEP CANCELLED" alone, never a wall. The job: one status line.
    assert re.search(rf"megatron-mile-node: {node_b}: ranks 2, 3 \(local ranks 0, 1; pids "
                     r"\d+, \d+\) were killed by SIGKILL", after), after
    dead_peer = re.findall(r"a collective failed in iteration \d+ .*: a peer rank died", after)
    assert len(dead_peer) == 1, after
    assert re.search(r"megatron-mile-train: rank 0: a collective failed in iteration \d+ "
                     r"\(.*\): a peer rank died or hung", after), after
    assert re.search(rf"megatron-mile-node: {node_a}: ranks 0, 1 \(local ranks 0, 1; pids "
                     r"\d+, \d+\) exited with 3 \(a peer rank died or hung\)", after), after
    assert len(re.findall(r"^megatron-mile-node: ", after, re.M)) == 2, after
    slurm = _srun_lines(after)
    assert all(any(re.fullmatch(p, line) for p in SLURM_ENDING_A_STEP) for line in slurm) \
        and len(slurm) <= 3, slurm
    assert "does not answer" not in after, after  # every node answered: no wait for a requeue
    _no_walls(text)
    assert took < 60, f"the job took {took:.0f} s to end after {node_b}'s trainers died"
    assert cluster.job(job).get("Restarts") == "0"

    # 2. The resubmission resumes (one trainer per node now, DP=2); then node B hangs
    # (SIGSTOP of every process of the job there; its slurmd still answers): the watchdog
    # of node A's trainer ends the job within the timeout.
    job, log, (node_a, node_b) = run.submit(
        f"parallel.distributed_timeout_minutes={HUNG_TIMEOUT_MIN}")
    resumed = run.resumes(log, after=saved)
    wait_for_log(cluster, job, log, rf"iteration {resumed + 1}/100000", timeout_s=60)
    saved = _saved(log)
    frozen = cluster.job_pids(node_b)
    assert _trainer_pids(cluster, node_b), frozen
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        assert cluster.wait(job, 120) == "FAILED", _read(log)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    took = time.monotonic() - stopped_at
    text = wait_for_log(cluster, job, log, r"== trainers exited with [1-9]", timeout_s=10,
                        allow_end=True)
    after = text.split(f"saved checkpoint at iteration {saved}")[-1]
    stalled = re.search(r"megatron-mile-train: rank 0: no progress for (\d+) s in iteration "
                        r"\d+ \(.*\): a peer rank is hung or dead", after)
    assert stalled, after
    # The watchdog polls once a second (here, where 2 cores are shared, a few).
    assert int(stalled.group(1)) < HUNG_TIMEOUT_MIN * 60 + 10, stalled.group(0)
    assert re.search(rf"megatron-mile-node: {node_a}: rank 0 \(local rank 0, pid \d+\) exited "
                     r"with 3 \(a peer rank died or hung\)", after), after
    _no_walls(text)
    # Then Slurm ends the step on node B too (SIGCONT, SIGTERM, SIGKILL after KillWait; its
    # agent, which waited on the store of node A, gives up first).
    assert took < HUNG_TIMEOUT_MIN * 60 + 90, f"the job ended {took:.0f} s after {node_b} froze"

    # 3. The resubmission resumes again; then node B is lost (its slurmd and every process on
    # it): Slurm marks it down and requeues the --requeue job, which resumes on two nodes that
    # are up (this cluster has spare ones).
    job, log, (node_a, node_b) = run.submit()
    resumed = run.resumes(log, after=saved)
    wait_for_log(cluster, job, log, rf"iteration {resumed + 1}/100000", timeout_s=60)
    saved = _saved(log)
    cluster.kill_node(node_b)
    deadline = time.monotonic() + 90
    while not (cluster.node_states().get(node_b, "").startswith("down")
               and cluster.job(job).get("Restarts") == "1"):
        assert time.monotonic() < deadline, (cluster.node_states(), cluster.job(job), _read(log))
        time.sleep(0.5)
    text = wait_for_log(cluster, job, log, rf"== job {job} \(restart 1\)", timeout_s=60)
    assert "DUE TO NODE FAILURE" in text, text
    restarted = rf"== job {job} \(restart 1\)[\s\S]*"
    text = wait_for_log(cluster, job, log, restarted + r"resumed from checkpoint at iteration",
                        timeout_s=JOB_TIMEOUT_S)
    after = text.split(f"== job {job} (restart 1)")[1]
    again = int(re.search(r"resumed from checkpoint at iteration (\d+)", after).group(1))
    assert again >= saved, text
    text = wait_for_log(cluster, job, log, restarted + rf"iteration {again + 1}/100000",
                        timeout_s=60)
    after = text.split(f"== job {job} (restart 1)")[1]
    nodes = cluster.job_nodes(job)
    assert node_b not in nodes, nodes
    assert f"node 0/2 on {nodes[0]}" in after and f"node 1/2 on {nodes[1]}" in after, after
    _no_walls(text)
