"""A real filesystem that is slow the way a loaded parallel filesystem is, for fault tests.

A FUSE passthrough (mfusepy over libfuse 3) of a source directory: every ``read`` and
``write`` of a file whose name matches ``slow_files`` is throttled to ``bandwidth`` bytes per
second, as on a loaded Lustre/GPFS object storage target (other files go at full speed: one
rank's file on a loaded target makes that rank a straggler), and every metadata or sync
operation (open, create, fsync, rename, unlink, ...) waits ``latency`` seconds. Data is never
changed: what is written lands in the source directory.

    with SlowFilesystem(source, mountpoint, bandwidth=200_000, latency=0.02):
        ...  # a checkpoint saved under mountpoint takes as long as on a slow cluster

Run as ``python -m megatron_mile.testing.slow_fs SOURCE MOUNTPOINT BANDWIDTH LATENCY GLOB``
(the context manager does that, and unmounts with ``fusermount3 -u``). Needs root or
``/dev/fuse`` access, libfuse 3 (Debian ``fuse3``) and the ``mfusepy`` package:
:func:`available` says whether they are there.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Optional


def available() -> Optional[str]:
    """None if a slow filesystem can be mounted here, else why not (a skip reason)."""
    if not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "no usable /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 missing (Debian package fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: libfuse not found
        return f"mfusepy unusable ({exc})"
    return None


class _Throttle:
    """One shared budget of ``bandwidth`` bytes/s: concurrent transfers share it."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth
        self._next_free = time.monotonic()
        self._lock = threading.Lock()

    def transfer(self, nbytes: int) -> None:
        with self._lock:
            start = max(self._next_free, time.monotonic())
            self._next_free = start + nbytes / self.bandwidth
            done = self._next_free
        time.sleep(max(0.0, done - time.monotonic()))


def _operations(source: str, bandwidth: float, latency: float, slow_files: str) -> Any:
    import mfusepy

    throttle = _Throttle(bandwidth)

    def transfer(path: str, nbytes: int) -> None:
        if fnmatch.fnmatch(os.path.basename(path), slow_files):
            throttle.transfer(nbytes)

    def real(path: str) -> str:
        return os.path.join(source, path.lstrip("/"))

    def slow_metadata() -> None:
        time.sleep(latency)

    class SlowPassthrough(mfusepy.Operations):
        """Each call maps to the same call on the source directory, throttled."""

        use_ns = True

        def __call__(self, op: str, *args: Any) -> Any:
            try:
                return super().__call__(op, *args)
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None

        def access(self, path, amode):
            if not os.access(real(path), amode):
                raise mfusepy.FuseOSError(errno.EACCES)
            return 0

        def getattr(self, path, fh=None):
            st = os.lstat(real(path))
            out = {key: getattr(st, key) for key in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino", "st_dev")}
            for key in ("st_atime", "st_mtime", "st_ctime"):
                out[key] = getattr(st, key + "_ns")
            return out

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(real(path))]

        def readlink(self, path):
            return os.readlink(real(path))

        def statfs(self, path):
            st = os.statvfs(real(path))
            return {key: getattr(st, key) for key in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                "f_flag", "f_frsize", "f_namemax")}

        def chmod(self, path, mode):
            os.chmod(real(path), mode)
            return 0

        def chown(self, path, uid, gid):
            os.chown(real(path), uid, gid)
            return 0

        def utimens(self, path, times=None):
            os.utime(real(path), ns=times)
            return 0

        def mkdir(self, path, mode):
            slow_metadata()
            os.mkdir(real(path), mode)
            return 0

        def rmdir(self, path):
            slow_metadata()
            os.rmdir(real(path))
            return 0

        def unlink(self, path):
            slow_metadata()
            os.unlink(real(path))
            return 0

        def symlink(self, target, source_path):
            os.symlink(source_path, real(target))
            return 0

        def rename(self, old, new):
            slow_metadata()
            os.rename(real(old), real(new))
            return 0

        def link(self, target, source_path):
            os.link(real(source_path), real(target))
            return 0

        def open(self, path, flags):
            slow_metadata()
            return os.open(real(path), flags)

        def create(self, path, mode, fi=None):
            slow_metadata()
            return os.open(real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

        def read(self, path, size, offset, fh):
            data = os.pread(fh, size, offset)
            transfer(path, len(data))
            return data

        def write(self, path, data, offset, fh):
            transfer(path, len(data))
            return os.pwrite(fh, data, offset)

        def truncate(self, path, length, fh=None):
            os.truncate(real(path), length)
            return 0

        def flush(self, path, fh):
            return 0

        def release(self, path, fh):
            os.close(fh)
            return 0

        def fsync(self, path, datasync, fh):
            slow_metadata()
            os.fsync(fh)
            return 0

    return SlowPassthrough()


class SlowFilesystem:
    """Mount a throttled view of ``source`` at ``mountpoint`` for the ``with`` block.

    Args:
        source: directory whose content is served (created if missing).
        mountpoint: empty directory to mount on (created if missing).
        bandwidth: bytes per second for all reads and writes together.
        latency: seconds added to each open, create, fsync, mkdir, rename, unlink, rmdir.
        slow_files: glob of the file names (basenames) that are throttled; "*": all.
    """

    def __init__(self, source: str, mountpoint: str, bandwidth: float,
                 latency: float = 0.0, slow_files: str = "*") -> None:
        self.source, self.mountpoint = source, mountpoint
        self.bandwidth, self.latency, self.slow_files = bandwidth, latency, slow_files
        self._proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "SlowFilesystem":
        os.makedirs(self.source, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_mile.testing.slow_fs", self.source, self.mountpoint,
             str(self.bandwidth), str(self.latency), self.slow_files], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                err = self._proc.stderr.read().decode() if self._proc.poll() is not None else ""
                self.__exit__()
                raise RuntimeError(f"could not mount a slow filesystem at {self.mountpoint}: "
                                   f"{err.strip() or 'timed out'}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._proc is None:
            return
        subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def main(argv: list[str]) -> None:
    import mfusepy

    source, mountpoint, bandwidth, latency, slow_files = argv
    mfusepy.FUSE(_operations(os.path.abspath(source), float(bandwidth), float(latency),
                             slow_files),
                 mountpoint, foreground=True, nothreads=False, allow_other=False)


if __name__ == "__main__":
    main(sys.argv[1:])
