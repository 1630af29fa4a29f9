"""torchrun for one node of a megatron-mile job, with one line per event instead of torchrun's
logs and traceback walls, and a choice of who signals the trainers.

    python -m megatron_mile.node_agent [torchrun arguments] -m megatron_mile.train ...

examples/launch.sh starts this on every node (``torchrun``'s arguments, unchanged). It runs
torchrun's own agent (``torch.distributed.run``) and differs in two ways:

* **Signals.** With ``MILE_SIGNALS=slurm`` (launch.sh sets it inside a Slurm job step) the
  agent does not pass SIGTERM, SIGINT or SIGUSR1 on to the trainers: Slurm delivers a step's
  signals (``scancel``, the time limit, ``srun`` forwarding the batch script's SIGUSR1) to
  every process of the step, the trainers included, so a second copy from torchrun would
  reach each trainer twice, and a second SIGTERM means "exit now, without saving"
  (megatron_mile/training/watchdog.py). The agent notes the signal and waits for its trainers,
  which save and exit 0; it then exits 0. It ignores SIGUSR1, and its trainers inherit
  that until they install their own handler: a SIGUSR1 (a warning, not a stop) that arrives
  while a trainer starts up is dropped instead of killing it. Otherwise (``MILE_SIGNALS=forward``, the default:
  a launch by hand) torchrun forwards them as usual (``--signals-to-handle``).
* **Logs.** torchrun's agent logs (warnings about closing signals, ``ChildFailedError``
  tables and tracebacks) are off. When trainers fail, the agent prints one line per outcome
  naming the node, the global and local ranks, the pids and how they ended ("ranks 0, 1 (local
  ranks 0, 1; pids 17, 18) exited with 3 (a peer rank died or hung)"), then exits with the
  first failed rank's exit code (128 + N when signal N killed it), so that
  ``srun --kill-on-bad-exit`` ends the job. On the node where a multi-node job failed (its
  trainers killed or crashed, not exiting 3 for a dead peer) it first waits up to
  ``MILE_PEER_REPORT_S`` (10 s) for Slurm to end the step, so that the other nodes' trainers
  say "a peer rank died" before Slurm cancels them.
  The failing trainer's own message (one line for the failures the trainer knows, a
  traceback for a bug) stays in the log above it; a dead or hung peer is said once per node,
  by local rank 0 (the agent sets ``MILE_NODE_AGENT=1`` for its trainers).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time

from megatron_mile.training.watchdog import EXIT_STALLED, NODE_AGENT_ENV

PROG = "megatron-mile-node"
_QUIET = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")
_SLURM_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PEER_REPORT_ENV = "MILE_PEER_REPORT_S"


def _node() -> str:
    return socket.gethostname().split(".")[0]


def _say(message: str) -> None:
    sys.stderr.write(f"{PROG}: {_node()}: {message}\n")
    sys.stderr.flush()


def _quiet_torchrun() -> None:
    """torchrun's loggers (created at import, each with its own level) to errors only."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(_QUIET):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _which(failed: list) -> str:
    """"rank 2 (local rank 0, pid 17)" or "ranks 2, 3 (local ranks 0, 1; pids 17, 18)"."""
    failed = sorted(failed, key=lambda rank_failure: rank_failure[0])
    if len(failed) == 1:
        rank, f = failed[0]
        return f"rank {rank} (local rank {f.local_rank}, pid {f.pid})"
    ranks = ", ".join(str(rank) for rank, _ in failed)
    local = ", ".join(str(f.local_rank) for _, f in failed)
    pids = ", ".join(str(f.pid) for _, f in failed)
    return f"ranks {ranks} (local ranks {local}; pids {pids})"


def _how(exitcode: int, plural: bool = False) -> str:
    if exitcode < 0:
        was = "were" if plural else "was"
        try:
            return f"{was} killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"{was} killed by signal {-exitcode}"
    what = {3: " (a peer rank died or hung)", 2: " (bad input)", 1: " (the run failed)"}
    return f"exited with {exitcode}{what.get(exitcode, '')}"


def _nodes(nnodes: str) -> int:
    """The most nodes of torchrun's ``--nnodes`` ("2" or "1:2")."""
    try:
        return int(str(nnodes).split(":")[-1])
    except ValueError:
        return 1


def _peer_report_s() -> float:
    """``MILE_PEER_REPORT_S`` in seconds (default 10); ValueError naming it when it is not a
    number >= 0."""
    raw = os.environ.get(PEER_REPORT_ENV, "10")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # NaN too
        raise ValueError(f"{PEER_REPORT_ENV}={raw!r} is not a number of seconds >= 0; set it "
                         "to how long a failed node waits for its peers' reports (default 10), "
                         "or unset it")
    return value


def _let_the_peers_speak(received: list[str]) -> None:
    """Wait (up to ``MILE_PEER_REPORT_S``, default 10 s) before this node's bad exit, unless
    Slurm ends the step first (a SIGTERM, noted in ``received``).

    This node is where a multi-node job failed (its trainers were killed or crashed; a
    survivor's trainers exit 3 instead). ``srun --kill-on-bad-exit`` cancels the step on
    every node as soon as one node agent exits non-zero: leaving at once would cancel the
    surviving nodes before their trainers notice the dead peer, and the log would end with
    Slurm's "STEP CANCELLED" instead of their one-line message. Their collectives fail within
    an iteration (at once, when they are waiting on this node); their agents' exit then ends
    the step, this agent included. Costs nothing where the peers speak first; at most the
    wait where they do not (a peer computing a long iteration).
    """
    wait_s = _peer_report_s()
    deadline = time.monotonic() + wait_s
    while not received and time.monotonic() < deadline:
        time.sleep(0.1)


def _import_torchrun():
    """torch.distributed.run, with torch's C++ warnings off in this process only (the c10d
    store's "recvValue failed ... frame #0 ..." walls when a node goes away); the trainers
    it starts get the environment as it was."""
    before = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run
    finally:
        if before is None:
            del os.environ["TORCH_CPP_LOG_LEVEL"]
        else:
            os.environ["TORCH_CPP_LOG_LEVEL"] = before
    return ChildFailedError, parse_args, run


def main(argv: list[str] | None = None) -> int:
    ChildFailedError, parse_args, run = _import_torchrun()

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _peer_report_s()  # checked now, not when a node has failed
    except ValueError as e:
        _say(str(e))
        return 2
    _quiet_torchrun()
    # The trainers' one-line messages about a dead or hung peer come from local rank 0 only:
    # every trainer of the node saw the same event (megatron_mile/training/watchdog.py).
    os.environ[NODE_AGENT_ENV] = "1"
    received: list[str] = []
    slurm = os.environ.get("MILE_SIGNALS", "forward") == "slurm"
    if slurm:
        # Slurm signals the trainers itself: note the signal, forward nothing, wait for them.
        handled = {s.strip() for s in args.signals_to_handle.split(",")}
        args.signals_to_handle = ",".join(
            sorted(handled - {s.name for s in _SLURM_SIGNALS})) or "SIGHUP"

        def note(signum, frame) -> None:
            received.append(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, note)
        signal.signal(signal.SIGINT, note)
        # Ignored, and so ignored by the trainers until they install their handler: a
        # SIGUSR1 (a warning, not a stop) while a trainer starts must not kill it.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        run(args)
    except ChildFailedError as e:
        # One line per outcome: the trainers of a node that all saw the same dead peer (or
        # were all killed) are one event.
        outcomes: dict[int, list] = {}
        for rank, failure in sorted(e.failures.items(), key=lambda kv: kv[1].timestamp):
            outcomes.setdefault(failure.exitcode, []).append((rank, failure))
        for exitcode, failed in outcomes.items():
            _say(f"{_which(failed)} {_how(exitcode, plural=len(failed) > 1)}")
        codes = [c if c > 0 else 128 - c for c in outcomes if c != 0]
        if slurm and _nodes(args.nnodes) > 1 and EXIT_STALLED not in outcomes:
            _let_the_peers_speak(received)
        return codes[0] if codes else 1  # the first failure's
    except Exception as e:  # noqa: BLE001 - torchrun's own failures: one line, not a traceback
        sigval = getattr(e, "sigval", None)
        if sigval is not None:  # SignalException: torchrun forwarded it and stopped its trainers
            _say(f"got {signal.Signals(sigval).name}: passed it to the trainers and stopped them")
            return 128 + int(sigval)
        _say(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return 1
    if received and os.environ.get("SLURM_NODEID", "0") == "0":  # one line, from node 0
        _say(f"got {', '.join(sorted(set(received)))} (as did every trainer, from Slurm); "
             "the trainers exited 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
