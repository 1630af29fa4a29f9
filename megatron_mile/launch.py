"""Joining the job's process group: what every entry point (training, evaluation, export)
does first, whether it was started by torchrun, srun or a plain ``python`` command.

    default_single_process_env()     # plain `python -m ...`: describe a world of one process
    device = initialize_distributed()  # nccl + cuda:LOCAL_RANK, or gloo + the CPU compat layer
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import time
from datetime import timedelta
from typing import BinaryIO, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_mile.cpu_compat import cuda_available, install_cpu_compat

__all__ = ["default_single_process_env", "initialize_distributed", "job_start_time"]

_PROCESS_START = time.time()  # this module is imported first by every entry point


def job_start_time() -> float:
    """When the job started, in Unix seconds: ``MILE_JOB_START_TIME`` when set (the Slurm
    batch script sets it before launching anything), else when this process started.

    Raises:
        ConfigError: ``MILE_JOB_START_TIME`` is not a number.
    """
    from megatron_mile.config import ConfigError

    value = os.environ.get("MILE_JOB_START_TIME")
    if value is None:
        return _PROCESS_START
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"MILE_JOB_START_TIME={value!r} is not a Unix time in seconds "
                         "(e.g. the output of `date +%s`)") from None


def default_single_process_env() -> None:
    """Without torchrun (no ``RANK`` in the environment), describe a world of one process on
    a free local port, so ``initialize_distributed`` works from a plain ``python`` command."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class _HeldOutput:
    """What was written to file descriptor 2 while held back (see :func:`_held_back_stderr`)."""

    def __init__(self, file: Optional[BinaryIO]) -> None:
        self.file = file
        self.released = False

    def release(self) -> None:
        """Let the held-back output through when the block ends."""
        self.released = True


_STORE_RETRY_LINE = re.compile(
    rb"^(\[[EW]\d{4} [^\]]*\] \[c10d\] .*(client socket|TCP client failed to connect)"
    rb"|Exception raised from \w+ at .*c10d"
    rb"|frame #\d+: |<omitting python frames>)")


def _without_store_retries(output: bytes) -> bytes:
    """``output`` without c10d's TCPStore connection-retry reports (an ``[E...]``/``[W...]``
    line, then ``Exception raised from ...`` and its C++ frames): a rank that starts before
    the store's host retries its connection, and a rendezvous that then succeeds has nothing
    to report. Everything else is kept."""
    kept, in_report = [], False
    for line in output.splitlines(keepends=True):
        if _STORE_RETRY_LINE.match(line) or (in_report and not line.strip()):
            in_report = True  # a report's lines, and the blank line that ends it
        else:
            kept.append(line)
            in_report = False
    return b"".join(kept)


@contextlib.contextmanager
def _held_back_stderr() -> Iterator[_HeldOutput]:
    """Hold back what C++ code writes to file descriptor 2 inside the block (c10d's TCPStore
    logs every failed connection attempt with a C++ stack trace there), and write it out at
    the end only if :meth:`_HeldOutput.release` was called: a failed rendezvous then prints
    only the caller's one line. Without a usable descriptor 2 nothing is held back."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield _HeldOutput(None)
        return
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        held = _HeldOutput(file)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.released:
                file.seek(0)
                os.write(2, _without_store_retries(file.read()))  # where it was going


def initialize_distributed(timeout_minutes: float = 10) -> torch.device:
    """Join the job's process group and return the device this rank places tensors on.

    Reads the torchrun environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and (through
    ``init_method="env://"``) ``MASTER_ADDR`` / ``MASTER_PORT``. With CUDA: nccl,
    ``torch.cuda.set_device(LOCAL_RANK)`` and ``CUDA_DEVICE_MAX_CONNECTIONS=1`` unless set. Without: gloo and
    :func:`megatron_mile.cpu_compat.install_cpu_compat`. If a process group already exists
    (e.g. the gloo test harness) it is kept as is; the compat layer is still installed on CPU.

    Collectives: ``init_process_group``'s rendezvous (all ranks), unless already initialised.

    Raises:
        RuntimeError: a required environment variable is missing, or an existing process
            group's backend does not match the device (nccl without CUDA).
        ConfigError: the rendezvous timed out (not every rank joined within
            ``timeout_minutes``); one line naming the setting and the fix.
    """
    use_cuda = cuda_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        # Read when the CUDA context is created, i.e. later. megatron's tensor-parallel
        # communication overlap relies on kernels running in issue order (it warns without
        # this, megatron/core/tensor_parallel/layers.py); examples/launch.sh and the image set
        # it too. A value set by the user is kept.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        install_cpu_compat()
        device = torch.device("cpu")

    if dist.is_initialized():
        backend = dist.get_backend()
        if not use_cuda and "nccl" in str(backend):
            raise RuntimeError(
                f"process group already initialised with backend {backend!r} but CUDA is not "
                "available: initialise with backend='gloo' on CPU"
            )
        return device

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"initialize_distributed: environment variables {missing} are not set; launch with "
            "torchrun (or srun with those variables exported)"
        )
    world_size = int(os.environ["WORLD_SIZE"])
    try:
        with _held_back_stderr() as held:
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                init_method="env://",
                rank=int(os.environ["RANK"]),
                world_size=world_size,
                timeout=timedelta(minutes=timeout_minutes),
            )
            held.release()
    except dist.DistError as err:  # DistStoreError / DistNetworkError: a rendezvous timeout
        from megatron_mile.config import ConfigError

        first = " ".join(str(err).split())[:200]
        raise ConfigError(
            f"rank {os.environ['RANK']}: the process group rendezvous at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} did not gather all "
            f"{world_size} ranks within parallel.distributed_timeout_minutes={timeout_minutes} "
            f"({first}). Start every rank (WORLD_SIZE={world_size}) and check MASTER_ADDR/"
            "MASTER_PORT, or raise parallel.distributed_timeout_minutes (default 10) if the "
            "ranks start that far apart") from None
    return device
