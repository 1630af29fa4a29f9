"""The watchdog on its own (``megatron_mile.training.watchdog``), in real processes: a world of
one has no stall timer; a rank waiting for a slow peer (``wait_for_peers``) lives as long as
the peer reports progress and ends ``timeout_s`` after its last progress."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

_ALONE = """
import time
from megatron_mile.training.watchdog import Watchdog
Watchdog(timeout_s=0.3, rank=0, world_size={world}).start()
time.sleep(1.5)
print("alive", flush=True)
"""

# Two ranks over one c10d TCPStore: rank 1 "works" (reports progress) for WORK_S seconds, then
# arrives (or stops reporting, and never arrives); rank 0 arrives at once and waits.
_PEERS = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from megatron_mile.training.watchdog import Watchdog, report_progress, wait_for_peers
rank, port, work_s, arrive = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=60))
Watchdog(timeout_s=1.0, rank=rank, world_size=2, store=store).start()
if rank == 1:
    end = time.monotonic() + work_s
    while time.monotonic() < end:
        time.sleep(0.1)
        report_progress()
    if arrive == "no":
        time.sleep(60)
start = time.monotonic()
wait_for_peers("the test phase")
print(f"rank {rank} waited {time.monotonic() - start:.1f}", flush=True)
time.sleep(0.3)
"""


@pytest.mark.parametrize("world, code", [(1, 0), (2, 3)])
def test_a_world_of_one_has_no_stall_timer(world, code):
    proc = subprocess.run([sys.executable, "-c", _ALONE.format(world=world)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    if code:
        assert "no progress for" in proc.stderr and "iteration 0 (setup)" in proc.stderr
    else:
        assert proc.stdout.strip() == "alive" and proc.stderr == ""


def _peers(work_s: float, arrive: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return tuple(subprocess.Popen(
        [sys.executable, "-c", _PEERS, str(rank), str(port), str(work_s), arrive],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1))


@pytest.mark.slow
def test_a_rank_waits_for_a_slow_peer_as_long_as_it_progresses():
    """Rank 1 works 4x the timeout; rank 0 waits for it and both go on."""
    procs = _peers(work_s=4.0, arrive="yes")
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    waited = float(outs[0][0].split()[-1])
    assert waited > 3.5, outs


@pytest.mark.slow
def test_a_waiting_rank_ends_a_timeout_after_its_peers_last_progress():
    procs = _peers(work_s=2.0, arrive="no")
    start = time.monotonic()
    out, err = procs[0].communicate(timeout=60)
    ended = time.monotonic() - start
    procs[1].kill()
    procs[1].wait()
    assert procs[0].returncode == 3, err
    assert "waiting for 1 of 2 ranks to finish the test phase" in err, err
    assert 2.0 + 1.0 <= ended < 2.0 + 1.0 + 8, ended  # work, then the 1 s timeout
