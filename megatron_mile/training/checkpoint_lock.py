"""One run per checkpoint directory: a lock file that names its holder.

Two runs saving into one directory (a requeued job whose old copy is still alive, a submission
sent twice) would remove each other's saves in progress and publish broken checkpoints. So the
run that saves into ``save_dir`` holds ``save_dir/mile.lock`` for its whole life:

* taken by global rank 0 at setup, before anything is loaded or saved, with
  ``O_CREAT | O_EXCL`` (atomic on local filesystems, NFSv3+, Lustre and GPFS); it holds a JSON
  record of the holder: host, pid, the process's start time and boot id, the Slurm job id and a
  random token;
* refreshed (its mtime) every ``refresh_s`` seconds by a daemon thread, which runs even while
  the main thread is blocked in a slow save;
* removed when the run ends (by the holder only: the token must still be its own).

A second run is refused with one line naming the holder. The lock is taken over only when its
holder is provably gone: on the same host, its process no longer exists (or the pid is now
another process, or the host rebooted); the holder was this Slurm job before a requeue (an
earlier ``SLURM_RESTART_COUNT``: Slurm restarts a job only after its processes have ended);
on another host, its lock was not refreshed for
``stale_s`` seconds (a live holder refreshes every ``refresh_s`` whatever its main thread does).
A holder that was frozen past ``stale_s`` and wakes up finds another token at its next publish
(:meth:`CheckpointLock.verify`, called before every publish) and refuses to publish.

Local: no collectives (``checkpoint.lock_save_dir`` takes it on rank 0 and agrees).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from megatron_mile.utils import fsync_path

logger = logging.getLogger(__name__)

LOCK_FILENAME = "mile.lock"


class LockError(RuntimeError):
    """The checkpoint directory is held by another run, or this run lost its lock."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> Optional[int]:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), or None if
    no such process exists."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return -1  # exists, unreadable
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _me(token: str) -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_ticks": _start_ticks(pid),
            "boot_id": _boot_id(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": _slurm_restart(), "token": token, "created": time.time()}


def _slurm_restart() -> Optional[int]:
    """This job's restart count (``SLURM_RESTART_COUNT``: 0 until Slurm requeues it), or None
    outside Slurm."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return None


def _describe(holder: dict[str, Any]) -> str:
    job = holder.get("slurm_job_id")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("created", 0)))
    return (f"host {holder.get('host')}, pid {holder.get('pid')}"
            + (f", Slurm job {job}" if job else "") + f", since {since}")


class CheckpointLock:
    """The lock of one checkpoint directory, held by this process (see the module docstring).

    Args:
        save_dir: the checkpoint directory (created if missing).
        stale_s: another host's lock unrefreshed for this long is abandoned.
        refresh_s: how often the holder refreshes its lock (default ``stale_s / 10``).
    """

    def __init__(self, save_dir: str, stale_s: float, refresh_s: Optional[float] = None) -> None:
        self.path = os.path.join(save_dir, LOCK_FILENAME)
        self.stale_s = stale_s
        self.refresh_s = refresh_s if refresh_s is not None else stale_s / 10
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ taking it

    def acquire(self) -> "CheckpointLock":
        """Take the lock, or take over a provably abandoned one; start refreshing it.

        Raises:
            LockError: another live run holds it (one line naming the holder and the fix).
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        record = json.dumps(_me(self.token), sort_keys=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self._take_over(record)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(os.path.dirname(self.path))
        self._thread = threading.Thread(target=self._refresh, name="mile-ckpt-lock",
                                        daemon=True)
        self._thread.start()
        return self

    def _take_over(self, record: str) -> None:
        holder, age = self._read()
        gone = self._holder_gone(holder, age)
        if gone is None:
            who = _describe(holder) if holder else "an unreadable lock record"
            raise LockError(
                f"checkpoint directory {os.path.dirname(self.path)} is in use by another run "
                f"({who}; lock {self.path} refreshed {age:.0f} s ago): two runs saving into one "
                "directory would destroy each other's checkpoints. Stop that run or set another "
                f"checkpoint.save; if it is certainly gone, delete {self.path}")
        tmp = f"{self.path}.{self.token}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        current, _ = self._read()
        if not current or current.get("token") != self.token:  # another run took it first
            raise LockError(f"checkpoint directory {os.path.dirname(self.path)}: another run "
                            f"took over the abandoned lock {self.path} at the same time "
                            f"({_describe(current) if current else 'unknown'}); set another "
                            "checkpoint.save or stop that run")
        logger.warning("took over %s from %s: %s", self.path,
                       _describe(holder) if holder else "an unreadable lock record", gone)

    def _read(self) -> tuple[Optional[dict], float]:
        """The holder's record (None if unreadable) and seconds since its last refresh."""
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except OSError:
            return None, float("inf")
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
        except (OSError, ValueError):  # removed meanwhile, or a holder crashed mid-write
            return None, age
        return (holder if isinstance(holder, dict) else None), age

    def _holder_gone(self, holder: Optional[dict], age: float) -> Optional[str]:
        """Why the holder is provably gone, or None if it may be alive."""
        if holder is not None and holder.get("host") == socket.gethostname() and \
                holder.get("boot_id") == _boot_id():
            ticks = _start_ticks(int(holder.get("pid", -1)))
            if ticks is None:
                return f"its process {holder.get('pid')} no longer exists"
            if ticks not in (-1, holder.get("start_ticks")):
                return f"pid {holder.get('pid')} is another process now"
            return None
        if holder is not None and holder.get("host") == socket.gethostname():
            return "this host rebooted since"
        job, restart = os.environ.get("SLURM_JOB_ID"), _slurm_restart()
        if (holder is not None and job and holder.get("slurm_job_id") == job
                and isinstance(holder.get("slurm_restart"), int) and restart is not None
                and holder["slurm_restart"] < restart):
            # Slurm starts a requeued job once every process of its previous run has ended
            # (or its node is down): the holder was this job before its requeue, killed
            # before it could release the lock (a node lost during a save).
            return (f"it was this Slurm job {job} before its requeue (restart "
                    f"{holder['slurm_restart']}; this is restart {restart})")
        if age > self.stale_s:
            return (f"not refreshed for {age:.0f} s (checkpoint.lock_stale_minutes="
                    f"{self.stale_s / 60:g})")
        return None

    # ------------------------------------------------------------------ holding it

    def verify(self) -> None:
        """Raise ``LockError`` if this run no longer holds the lock (fencing before a publish)."""
        holder, _ = self._read()
        if not holder or holder.get("token") != self.token:
            raise LockError(
                f"this run lost the lock {self.path} to "
                f"{_describe(holder) if holder else 'nobody (it was removed)'}: another run "
                "took over the directory while this one was not refreshing it (frozen?); not "
                "publishing, so as not to overwrite that run's checkpoints")

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            holder, _ = self._read()
            if not holder or holder.get("token") != self.token:
                return  # lost: verify() refuses the next publish
            try:
                os.utime(self.path)
            except OSError as exc:
                logger.warning("could not refresh %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop refreshing and remove the lock file if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder, _ = self._read()
        if holder and holder.get("token") == self.token:
            try:
                os.remove(self.path)
            except OSError as exc:
                logger.warning("could not remove %s: %s", self.path, exc)
