"""Joining the job's process group: what every entry point (training, evaluation, export)
does first, whether it was started by torchrun, srun or a plain ``python`` command.

    default_single_process_env()     # plain `python -m ...`: describe a world of one process
    device = initialize_distributed()  # nccl + cuda:LOCAL_RANK, or gloo + the CPU compat layer
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

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


def initialize_distributed(timeout_minutes: int = 10) -> torch.device:
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
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(minutes=timeout_minutes),
    )
    return device
