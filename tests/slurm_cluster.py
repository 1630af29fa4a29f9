"""A throw-away N-node Slurm cluster on one host for tests: munged, slurmctld and one slurmd
per node, all on loopback addresses.

    with slurm_cluster(tmp_path, nodes=2) as cluster:
        job = cluster.sbatch(["--nodes=2", "examples/slurm/pretrain.sbatch"], env=...)
        assert cluster.wait(job, timeout_s=300) == "COMPLETED"

Each node is its own ``slurmd`` in its own UTS and mount namespace (``unshare --uts --mount``):
its own host name (``node0``, ``node1``, ...), its own loopback address (``127.0.0.11``,
``.12``, ...), its own port (``Port=`` in slurm.conf), spool directory and pid and log files
(``%n`` in slurm.conf), and a private ``/etc/hosts`` (bind-mounted inside its namespace) that
names every node, so a job step on ``node1`` resolves ``node0`` to ``127.0.0.11`` as on a real
cluster: torchrun's rendezvous and gloo's sockets use those addresses. Job steps inherit the
namespaces of the slurmd that started them, so a node's processes are found by its UTS
namespace (:meth:`SlurmCluster.node_pids`): frozen (a hung node), killed with the slurmd (a
lost node, :meth:`SlurmCluster.kill_node`) and started again
(:meth:`SlurmCluster.start_node`).

Everything lives under one temporary directory: the munge key and socket, slurm.conf (free
ports, not Slurm's defaults), state, spool, logs and pid files, so a cluster never touches
/etc/slurm or another cluster on the same machine. On exit, also after a failure, the cluster
cancels its jobs, stops its daemons by pid, then kills every process left in its nodes'
namespaces and any process still carrying this cluster's SLURM_CONF in its environment.
Namespaces and slurmd need root: without it ``find_or_install_slurm`` returns the skip reason.

Needs Debian's slurmctld, slurmd, slurm-client and munge (Slurm 22.05 on Debian 12):
``find_or_install_slurm`` installs them with apt-get when missing and this is root, and
otherwise returns the reason the tests should skip.

The test modules share one cluster of :data:`SHARED_NODES` nodes (the pytest fixtures at the
end of this file, registered by tests/conftest.py): starting one takes seconds, and every job
of the suite fits on it (one-node jobs on node0, two-node jobs on two of them, the 4-node
case on all).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "scancel")
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which is not on every PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def apt_install(packages: Sequence[str], timeout_s: float = 600) -> str | None:
    """apt-get install as root (with an update if the lists are stale); None or why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{' '.join(packages)}: not installed, and apt-get as root is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *packages]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=timeout_s).returncode:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                           timeout=timeout_s)
            done = subprocess.run(install, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            if done.returncode:
                return f"apt-get install {' '.join(packages)} failed: {done.stderr[-500:]}"
    except subprocess.TimeoutExpired:
        return f"apt-get install {' '.join(packages)} took over {timeout_s:.0f} s"
    return None


def find_or_install_slurm() -> str | None:
    """Return None when Slurm and munge are usable, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "the test Slurm cluster needs root (slurmd, unshare --uts --mount)"
    if _which("unshare") is None:
        return "unshare (util-linux) is missing: the test cluster's nodes need it"
    if not _missing_binaries():
        return None
    reason = apt_install(PACKAGES)
    missing = _missing_binaries()
    if missing:
        return reason or f"still missing after apt-get: {', '.join(missing)}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def wait_for_log(cluster: "SlurmCluster", job: str, log: Path, pattern: str, count: int = 1,
                 timeout_s: float = 300, allow_end: bool = False) -> str:
    """Poll the job's log until ``pattern`` occurs ``count`` times; return the log. Fails the
    test if the job ends first (unless ``allow_end``) or after ``timeout_s``."""
    def read() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(re.findall(pattern, read())) >= count:
            return read()
        state = cluster.state(job)
        if state in FINAL_STATES and not allow_end:
            time.sleep(1)  # the last lines of an ending job
            if len(re.findall(pattern, read())) >= count:
                return read()
            pytest.fail(f"job {job} ended ({state}) before {pattern!r} x{count} in its log:\n"
                        f"{read()}")
        time.sleep(0.3)
    pytest.fail(f"no {pattern!r} x{count} in job {job}'s log after {timeout_s} s:\n{read()}")


def node_address(index: int) -> str:
    """The loopback address of node ``index``: 127.0.0.11, .12, ..."""
    return f"127.0.0.{11 + index}"


def _uts_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class SlurmCluster:
    """A running cluster: ``env`` makes the Slurm clients talk to it; ``nodes`` are the node
    names in order, ``procs`` the daemons (``munged``, ``slurmctld``, ``slurmd-node0``, ...)."""

    root: Path
    nodes: list[str]
    cpus: int
    env: dict[str, str]
    conf: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    namespaces: dict[str, str] = field(default_factory=dict)  # node -> its UTS namespace

    @property
    def node(self) -> str:
        return self.nodes[0]

    def run(self, *cmd: str, env: Mapping[str, str] | None = None,
            timeout_s: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout_s, check=False)

    def sbatch(self, args: Sequence[str], env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike | None = None) -> str:
        """Submit a batch job; return its id."""
        done = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stderr}\n{self.logs()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty once the job is forgotten)."""
        done = self.run("scontrol", "show", "job", "--oneliner", job_id)
        if done.returncode:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: str, timeout_s: float,
             states: Sequence[str] | set[str] = FINAL_STATES) -> str:
        """Wait until the job is in one of ``states``; return that state."""
        seen: list[str] = []

        def reached() -> bool:
            s = self.state(job_id)
            if not seen or seen[-1] != s:
                seen.append(s)
            return s in states

        try:
            _wait_for(reached, timeout_s, f"job {job_id} to reach {sorted(states)}", 0.5)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; states seen: {seen}\n{self.logs()}") from None
        return seen[-1]

    def node_states(self) -> dict[str, str]:
        """``sinfo`` per node: name -> state (``idle``, ``allocated``, ``down*``, ...)."""
        out = self.run("sinfo", "--noheader", "--Node", "--format=%N %T").stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout_s: float = 60) -> None:
        """Wait until every node is idle (registered, no job)."""
        def idle() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            states = self.node_states()
            return set(states) == set(self.nodes) and all(
                s.rstrip("*") == "idle" for s in states.values())

        _wait_for(idle, timeout_s, f"nodes {self.nodes} to be idle")

    def node_pids(self, node: str) -> list[int]:
        """Every process in ``node``'s namespaces: its slurmd and its job steps."""
        ns = self.namespaces.get(node)
        if ns is None:
            return []
        return [int(e.name) for e in Path("/proc").iterdir()
                if e.name.isdigit() and _uts_ns(int(e.name)) == ns]

    def job_nodes(self, job_id: str) -> list[str]:
        """The nodes the job runs on (``NodeList`` expanded), in order."""
        nodelist = self.job(job_id).get("NodeList", "")
        if not nodelist or nodelist == "(null)":
            return []
        return self.run("scontrol", "show", "hostnames", nodelist).stdout.split()

    def cancel_all(self, timeout_s: float = 60) -> None:
        """Cancel every job and wait until none is left (a failed test must not leave its job
        holding the nodes for the next one)."""
        jobs = self.run("squeue", "--noheader", "--format=%i").stdout.split()
        if jobs:
            self.run("scancel", *jobs)
            _wait_for(lambda: not self.run("squeue", "--noheader").stdout.strip(), timeout_s,
                      f"jobs {jobs} to end", 0.5)

    def job_pids(self, node: str) -> list[int]:
        """The processes of the jobs running on ``node`` (all but slurmd and slurmstepd)."""
        return [p for p in self.node_pids(node) if _comm(p) not in ("slurmd", "slurmstepd")]

    def kill_node(self, node: str) -> None:
        """A lost node: SIGKILL its slurmd and every process in its namespaces."""
        proc = self.procs.pop(f"slurmd-{node}", None)
        for pid in self.node_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(10)

    def start_node(self, node: str) -> None:
        """Start ``node``'s slurmd in new namespaces (again, after :meth:`kill_node`)."""
        index = self.nodes.index(node)
        hosts = self.root / "hosts"
        # unshare execs sh, which execs slurmd: the Popen's pid is the slurmd's.
        script = (f"hostname {node} && mount --bind {hosts} /etc/hosts && "
                  f"exec {_which('slurmd')} -D -f {self.conf}")
        proc = subprocess.Popen(
            [_which("unshare"), "--uts", "--mount", "sh", "-c", script], env=self.env,
            stdout=(self.root / "log" / f"slurmd-{node}.out").open("ab"),
            stderr=subprocess.STDOUT)
        self.procs[f"slurmd-{node}"] = proc
        ours = _uts_ns(os.getpid())

        def unshared() -> bool:
            if proc.poll() is not None:
                out = (self.root / "log" / f"slurmd-{node}.out").read_text(errors="replace")
                raise RuntimeError(f"slurmd on {node} ({node_address(index)}) exited with "
                                   f"{proc.returncode}: {out}")
            ns = _uts_ns(proc.pid)
            return ns is not None and ns != ours

        _wait_for(unshared, 10, f"{node}'s namespaces", 0.05)
        self.namespaces[node] = _uts_ns(proc.pid)

    def logs(self, tail: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", *(f"slurmd-{n}.log" for n in self.nodes)):
            path = self.root / "log" / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)


def _slurm_conf(root: Path, nodes: Sequence[str], cpus: int, munge_socket: Path) -> str:
    d = {k: root / k for k in ("state", "spool", "log", "run")}
    ctl = socket.gethostname().split(".")[0]
    node_lines = "\n".join(
        f"NodeName={n} NodeAddr={node_address(i)} NodeHostname={n} Port={_free_port()} "
        f"CPUs={cpus} State=UNKNOWN" for i, n in enumerate(nodes))
    return f"""\
ClusterName=miletest
SlurmctldHost={ctl}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={d['state']}
SlurmdSpoolDir={d['spool']}/%n
SlurmctldPidFile={d['run']}/slurmctld.pid
SlurmdPidFile={d['run']}/slurmd-%n.pid
SlurmctldLogFile={d['log']}/slurmctld.log
SlurmdLogFile={d['log']}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmdTimeout=10
MessageTimeout=5
PlugStackConfig={root}/plugstack.conf
{node_lines}
PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def _hosts_file(nodes: Sequence[str]) -> str:
    """The nodes' private /etc/hosts: every node by name, on loopback."""
    lines = ["127.0.0.1 localhost"]
    lines += [f"{node_address(i)} {n}" for i, n in enumerate(nodes)]
    return "\n".join(lines) + "\n"


def _pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (this cluster's SLURM_CONF=...)."""
    needle = b"\0" + marker.encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in b"\0" + (entry / "environ").read_bytes() + b"\0":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _stop(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


@contextlib.contextmanager
def slurm_cluster(root: Path, nodes: int = 1, cpus: int | None = None,
                  start_timeout_s: float = 60) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and ``nodes`` slurmds under ``root``; stop all on exit."""
    if not 1 <= nodes <= 200:
        raise ValueError(f"nodes={nodes}: 1 to 200 (127.0.0.11 to 127.0.0.210)")
    root = Path(root).resolve()
    cpus = cpus or os.cpu_count() or 1
    names = [f"node{i}" for i in range(nodes)]
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / "spool" / n).mkdir(exist_ok=True)
    # munged insists on a key only its owner can read and a socket directory every user can
    # reach, so that directory lives directly under /tmp (a test's tmp_path is private).
    munge = Path(tempfile.mkdtemp(prefix="mile-munge-"))
    munge.chmod(0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = munge / "munge.socket"
    (root / "plugstack.conf").write_text("")  # no site SPANK plugins (pyxis) in tests
    (root / "hosts").write_text(_hosts_file(names))
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, names, cpus, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
        if var != "SLURM_CONF":
            del env[var]  # an outer allocation must not leak into this cluster's jobs
    cluster = SlurmCluster(root=root, nodes=names, cpus=cpus, env=env, conf=conf)
    marker = f"SLURM_CONF={conf}"
    try:
        cluster.procs["munged"] = subprocess.Popen(
            [_which("munged"), "--foreground", f"--key-file={key}", f"--socket={munge_socket}",
             f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
             f"--seed-file={munge}/munged.seed"],
            env=env, stdout=(root / "log" / "munged.out").open("wb"), stderr=subprocess.STDOUT)

        def munge_up() -> bool:
            if cluster.procs["munged"].poll() is not None:
                out = (root / "log" / "munged.out").read_text(errors="replace")
                raise RuntimeError(f"munged exited with {cluster.procs['munged'].returncode}: {out}")
            return munge_socket.exists()

        _wait_for(munge_up, start_timeout_s, "munged's socket")
        cluster.procs["slurmctld"] = subprocess.Popen(
            [_which("slurmctld"), "-D", "-f", str(conf)], env=env,
            stdout=(root / "log" / "slurmctld.out").open("wb"), stderr=subprocess.STDOUT)
        for n in names:
            cluster.start_node(n)
        cluster.wait_idle(start_timeout_s)
        yield cluster
    finally:
        _teardown(cluster, marker)
        shutil.rmtree(munge, ignore_errors=True)


def _teardown(cluster: SlurmCluster, marker: str) -> None:
    slurmctld = cluster.procs.get("slurmctld")
    if slurmctld is not None and slurmctld.poll() is None:
        with contextlib.suppress(Exception):
            jobs = cluster.run("squeue", "--noheader", "--format=%i").stdout.split()
            if jobs:
                cluster.run("scancel", *jobs)
                _wait_for(lambda: not cluster.run("squeue", "--noheader").stdout.strip(),
                          30, "cancelled jobs to end")
    for name in [n for n in cluster.procs if n.startswith("slurmd-")]:
        _stop(cluster.procs[name])
    for name in ("slurmctld", "munged"):
        if name in cluster.procs:
            _stop(cluster.procs[name])
    # Whatever is left in a node's namespaces (stopped or orphaned job steps), then job
    # steps elsewhere that carry this cluster's configuration.
    for node in cluster.nodes:
        for pid in cluster.node_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in _pids_with_env(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- The suite's shared cluster ---------------------------------------------------------

SHARED_NODES = 4
"""Nodes of the shared cluster: the 4-node layout test needs them all; the other jobs take
one or two."""


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """The suite's Slurm cluster (:data:`SHARED_NODES` nodes), started once for every test
    module that asks for it and stopped at the end of the session; skips where Slurm, munge
    or root are missing."""
    reason = find_or_install_slurm()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=SHARED_NODES) as c:
        yield c


@pytest.fixture(autouse=True)
def _slurm_jobs_left(request) -> Iterator[None]:
    """After each test that used the shared cluster: cancel what it left running, bring back
    a node it took down, wait until every node is idle again."""
    yield
    if "cluster" not in request.fixturenames:
        return
    c: SlurmCluster = request.getfixturevalue("cluster")
    c.cancel_all()
    for node in c.nodes:
        if f"slurmd-{node}" not in c.procs:
            c.start_node(node)
    c.wait_idle(120)
