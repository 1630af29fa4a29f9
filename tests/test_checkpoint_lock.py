"""The checkpoint directory's lock (``megatron_mile.training.checkpoint_lock``), with real
processes as holders: a live holder refuses a second run, a dead one (its process gone) or a
stale one of another host is taken over, a holder that lost the lock refuses to publish."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from megatron_mile.training.checkpoint_lock import LOCK_FILENAME, CheckpointLock, LockError

HOLD = ("import sys, time\n"
        "from megatron_mile.training.checkpoint_lock import CheckpointLock\n"
        "lock = CheckpointLock(sys.argv[1], stale_s=60).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path``'s lock (killed at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def _record(tmp_path) -> dict:
    with open(tmp_path / LOCK_FILENAME) as f:
        return json.load(f)


def test_a_live_holder_refuses_a_second_run_naming_it(tmp_path, holder):
    with pytest.raises(LockError) as err:
        CheckpointLock(str(tmp_path), stale_s=60).acquire()
    message = str(err.value)
    assert "\n" not in message
    assert f"in use by another run (host {os.uname().nodename}, pid {holder.pid}" in message
    assert "Stop that run or set another checkpoint.save" in message
    assert f"delete {tmp_path / LOCK_FILENAME}" in message
    assert _record(tmp_path)["pid"] == holder.pid  # untouched


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, holder, caplog):
    holder.kill()
    holder.wait()
    lock = CheckpointLock(str(tmp_path), stale_s=60).acquire()
    try:
        assert _record(tmp_path)["pid"] == os.getpid()
        assert f"its process {holder.pid} no longer exists" in caplog.text
        lock.verify()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILENAME).exists()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """Same pid, other process start time (the pid was recycled): taken over."""
    lock = CheckpointLock(str(tmp_path), stale_s=60).acquire()
    lock._stop.set()
    record = _record(tmp_path)
    record["start_ticks"] -= 1
    record["token"] = "old"
    (tmp_path / LOCK_FILENAME).write_text(json.dumps(record))
    second = CheckpointLock(str(tmp_path), stale_s=60).acquire()
    try:
        assert _record(tmp_path)["token"] == second.token
    finally:
        second.release()


def _foreign(tmp_path, age_s: float) -> None:
    (tmp_path / LOCK_FILENAME).write_text(json.dumps({
        "host": "node-that-died", "pid": 4242, "start_ticks": 1, "boot_id": "x",
        "slurm_job_id": "777", "token": "theirs", "created": time.time() - age_s}))
    os.utime(tmp_path / LOCK_FILENAME, (time.time() - age_s,) * 2)


def test_another_hosts_lock_is_taken_over_only_when_stale(tmp_path):
    _foreign(tmp_path, age_s=30)
    with pytest.raises(LockError, match=r"host node-that-died, pid 4242, Slurm job 777"):
        CheckpointLock(str(tmp_path), stale_s=60).acquire()
    _foreign(tmp_path, age_s=120)
    lock = CheckpointLock(str(tmp_path), stale_s=60).acquire()
    try:
        assert _record(tmp_path)["token"] == lock.token
    finally:
        lock.release()


def test_a_requeued_job_takes_over_the_lock_of_its_previous_run(tmp_path, monkeypatch, caplog):
    """A node lost during a save: Slurm kills the job's other processes before their lock is
    released and requeues the job on other hosts, where the lock is not yet stale. The same
    job at a later restart takes it over; another job, or the same restart, is refused."""
    def held_by(job: str, restart):
        record = {"host": "node-that-died", "pid": 4242, "start_ticks": 1, "boot_id": "x",
                  "slurm_job_id": job, "token": "theirs", "created": time.time()}
        if restart is not None:
            record["slurm_restart"] = restart
        (tmp_path / LOCK_FILENAME).write_text(json.dumps(record))

    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for job, restart in [("778", 0), ("777", 1), ("777", None)]:
        held_by(job, restart)
        with pytest.raises(LockError, match=rf"in use by another run .*Slurm job {job}"):
            CheckpointLock(str(tmp_path), stale_s=600).acquire()
    held_by("777", 0)
    with caplog.at_level(logging.WARNING, logger="megatron_mile.training.checkpoint_lock"):
        lock = CheckpointLock(str(tmp_path), stale_s=600).acquire()
    try:
        assert _record(tmp_path)["token"] == lock.token
        assert _record(tmp_path)["slurm_restart"] == 1
        assert "it was this Slurm job 777 before its requeue (restart 0; this is restart 1)" \
            in caplog.text
    finally:
        lock.release()


def test_the_holder_refreshes_its_lock(tmp_path):
    lock = CheckpointLock(str(tmp_path), stale_s=1.0, refresh_s=0.1).acquire()
    try:
        os.utime(tmp_path / LOCK_FILENAME, (time.time() - 100,) * 2)
        time.sleep(0.5)
        assert time.time() - os.stat(tmp_path / LOCK_FILENAME).st_mtime < 0.5
    finally:
        lock.release()


def test_a_holder_that_lost_its_lock_refuses_to_publish(tmp_path):
    lock = CheckpointLock(str(tmp_path), stale_s=60).acquire()
    _foreign(tmp_path, age_s=0)  # another run took over while this one was frozen
    with pytest.raises(LockError, match=r"this run lost the lock .* to host node-that-died"):
        lock.verify()
    lock.release()
    assert _record(tmp_path)["token"] == "theirs"  # never removes another run's lock
