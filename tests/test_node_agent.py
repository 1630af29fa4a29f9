"""megatron_mile/node_agent.py without launching anything: torchrun's ``run`` replaced by a
stand-in that records its arguments or raises what torchrun raises. (The real thing runs in
every Slurm job of tests/test_slurm.py and tests/test_multinode.py.)"""

from __future__ import annotations

import signal

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args

from megatron_mile import node_agent
from megatron_mile.training.watchdog import NODE_AGENT_ENV, speaks_for_node

ARGS = ["--nnodes=2", "--nproc-per-node=2",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m", "megatron_mile.train"]


@pytest.fixture
def agent(monkeypatch):
    """Run node_agent.main with ``behaviour(args)`` as torchrun's run; return (rc, seen)."""
    seen = {}
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    # No wait for the peers' reports unless a test asks for one (it sets this again).
    monkeypatch.setenv(node_agent.PEER_REPORT_ENV, "0")

    def start(behaviour, mode):
        monkeypatch.setenv("MILE_SIGNALS", mode)
        monkeypatch.setenv("SLURM_NODEID", "0")
        monkeypatch.setenv(NODE_AGENT_ENV, "0")  # restored after the agent sets it

        def run(args):
            seen["signals_to_handle"] = args.signals_to_handle
            seen["usr1"] = signal.getsignal(signal.SIGUSR1)
            behaviour(args)

        monkeypatch.setattr(node_agent, "_import_torchrun",
                            lambda: (ChildFailedError, parse_args, run))

        def torchrun_would_forward(signum, frame):  # what torchrun's own handler does
            raise RuntimeError(f"forwarded {signal.Signals(signum).name} to the trainers")

        signal.signal(signal.SIGTERM, torchrun_would_forward)
        return node_agent.main(ARGS), seen

    yield start
    for s, h in saved.items():
        signal.signal(s, h)


def _failure(local_rank: int, exitcode: int, at: float) -> ProcessFailure:
    f = ProcessFailure(local_rank=local_rank, pid=100 + local_rank, exitcode=exitcode,
                       error_file="<N/A>")
    f.timestamp = at
    return f


def test_under_slurm_the_agent_forwards_no_term_int_usr1(agent, capsys):
    def trainers_get_sigterm_from_slurm(args):
        signal.raise_signal(signal.SIGTERM)  # noted, not forwarded
        signal.raise_signal(signal.SIGUSR1)  # ignored (and so by a starting trainer)

    rc, seen = agent(trainers_get_sigterm_from_slurm, "slurm")
    assert rc == 0
    assert set(seen["signals_to_handle"].split(",")) == {"SIGHUP", "SIGQUIT"}
    assert seen["usr1"] == signal.SIG_IGN
    assert capsys.readouterr().err.endswith(
        "got SIGTERM (as did every trainer, from Slurm); the trainers exited 0\n")


def test_by_hand_the_agent_forwards_as_torchrun_does(agent):
    rc, seen = agent(lambda args: None, "forward")
    assert rc == 0
    assert seen["signals_to_handle"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def test_failed_ranks_are_one_line_per_outcome_and_the_first_failure_is_the_exit_code(
        agent, capsys):
    def two_failures(args):
        raise ChildFailedError("megatron_mile.train", {3: _failure(1, -9, 2.0),
                                                       2: _failure(0, 3, 1.0)})

    rc, _ = agent(two_failures, "slurm")
    err = capsys.readouterr().err.splitlines()
    assert rc == 3
    assert [line.split(": ", 2)[2] for line in err] == [
        "rank 2 (local rank 0, pid 100) exited with 3 (a peer rank died or hung)",
        "rank 3 (local rank 1, pid 101) was killed by SIGKILL"]
    assert all(line.startswith("megatron-mile-node: ") for line in err)


def test_ranks_of_a_node_that_fail_alike_are_one_line(agent, capsys):
    """Both trainers of a surviving node exit 3 (they saw the same dead peer): one line,
    in rank order whichever ended first."""
    def both_saw_a_dead_peer(args):
        raise ChildFailedError("megatron_mile.train", {5: _failure(1, 3, 1.0),
                                                       4: _failure(0, 3, 2.0)})

    rc, _ = agent(both_saw_a_dead_peer, "slurm")
    err = capsys.readouterr().err.splitlines()
    assert rc == 3
    assert [line.split(": ", 2)[2] for line in err] == [
        "ranks 4, 5 (local ranks 0, 1; pids 100, 101) exited with 3 (a peer rank died or hung)"]


def test_under_the_agent_only_local_rank_0_speaks_for_the_node(agent, monkeypatch):
    def trainers_see(args):
        import os

        seen["env"] = os.environ.get(NODE_AGENT_ENV)

    seen = {}
    agent(trainers_see, "slurm")
    assert seen["env"] == "1"  # set for the trainers it starts
    for local_rank, under_agent, speaks in [("0", "1", True), ("1", "1", False),
                                            ("1", "0", True), ("3", None, True)]:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        if under_agent is None:
            monkeypatch.delenv(NODE_AGENT_ENV, raising=False)
        else:
            monkeypatch.setenv(NODE_AGENT_ENV, under_agent)
        assert speaks_for_node() is speaks, (local_rank, under_agent)


def test_a_rank_killed_first_gives_128_plus_the_signal(agent, capsys):
    rc, _ = agent(lambda args: (_ for _ in ()).throw(
        ChildFailedError("t", {1: _failure(0, -9, 1.0)})), "slurm")
    assert rc == 137


def test_torchrun_errors_are_one_line(agent, capsys):
    def rendezvous_fails(args):
        raise RuntimeError("The connection to the C10d store has failed.\n  details")

    rc, _ = agent(rendezvous_fails, "slurm")
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "RuntimeError: The connection to the C10d store has failed. details" in err


def test_a_peer_failure_ignores_the_sigterms_that_end_the_step(monkeypatch, capsys):
    """After a dead peer, Slurm ends the step with SIGTERM (sometimes twice): the trainer
    ignores it from then on, also once it gives back its own handlers, and exits 3 with its
    one line (not 143 as a "second SIGTERM", nor killed by the signal)."""
    from megatron_mile import train

    class Trainer:  # what _peer_failure reads of a trainer that failed in its training loop
        rank, watchdog = 0, None
        setup_phase = "setting up the model"
        _previous_handlers = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.SIG_DFL}

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.delenv(NODE_AGENT_ENV, raising=False)
    try:
        trainer = Trainer()
        assert train._peer_failure(trainer, RuntimeError("Connection closed by peer")) == 3
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert set(trainer._previous_handlers.values()) == {signal.SIG_IGN}
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert "rank 0: a collective failed in setup (setting up the model)" in capsys.readouterr().err


def _trainers_killed(args):
    raise ChildFailedError("megatron_mile.train", {2: _failure(0, -9, 1.0),
                                                   3: _failure(1, -9, 1.1)})


def test_the_failed_node_waits_for_slurm_to_end_the_step(agent, capsys, monkeypatch):
    """Its trainers killed: the agent says so at once, then waits (here up to 60 s) until
    Slurm ends the step (SIGTERM, after a surviving node's agent exited 3), so that the
    survivors' "a peer rank died" comes before srun --kill-on-bad-exit cancels them."""
    import os
    import threading
    import time

    monkeypatch.setenv(node_agent.PEER_REPORT_ENV, "60")
    said = []
    timer = threading.Timer(1.0, lambda: (said.append(capsys.readouterr().err),
                                          os.kill(os.getpid(), signal.SIGTERM)))
    start = time.monotonic()
    timer.start()
    try:
        rc, _ = agent(_trainers_killed, "slurm")
    finally:
        timer.cancel()
    took = time.monotonic() - start
    assert rc == 137
    assert 1.0 <= took < 30, took  # until the SIGTERM, not the 60 s
    assert said and "ranks 2, 3 (local ranks 0, 1; pids 100, 101) were killed by SIGKILL" \
        in said[0]  # printed before the wait


def test_the_failed_node_gives_up_waiting_after_the_peer_report_time(agent, monkeypatch):
    import time

    monkeypatch.setenv(node_agent.PEER_REPORT_ENV, "0.5")
    start = time.monotonic()
    rc, _ = agent(_trainers_killed, "slurm")
    assert rc == 137 and 0.5 <= time.monotonic() - start < 20


@pytest.mark.parametrize("mode,nnodes,failure", [
    ("slurm", "2", 3),      # a survivor: its trainers saw the dead peer
    ("slurm", "1", -9),     # one node: nobody else to speak
    ("forward", "2", -9),   # by hand: no srun to cancel the others
])
def test_no_wait_for_survivors_single_nodes_and_launches_by_hand(agent, monkeypatch, mode,
                                                                 nnodes, failure):
    import time

    monkeypatch.setenv(node_agent.PEER_REPORT_ENV, "60")
    monkeypatch.setattr(node_agent, "main", _with_nnodes(node_agent.main, nnodes))
    start = time.monotonic()
    rc, _ = agent(lambda args: (_ for _ in ()).throw(
        ChildFailedError("t", {0: _failure(0, failure, 1.0)})), mode)
    assert rc == (3 if failure == 3 else 137)
    assert time.monotonic() - start < 20


def _with_nnodes(main, nnodes):
    def main_with(argv=None):
        return main([f"--nnodes={nnodes}", *(argv or ARGS)[1:]])
    return main_with


@pytest.mark.parametrize("value", ["ten", "-1", "nan"])
def test_a_bad_peer_report_time_is_one_line_at_the_start(agent, capsys, monkeypatch, value):
    started = []
    monkeypatch.setenv(node_agent.PEER_REPORT_ENV, value)
    rc, _ = agent(started.append, "slurm")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not started
    assert len(err) == 1 and f"MILE_PEER_REPORT_S={value!r} is not a number of seconds" in err[0]
