"""Profiling hooks of the training loop: a torch.profiler window (``profile.*``) and NVTX ranges
for Nsight Systems.

    profiler = StepProfiler(cfg.profile, rank, cuda)
    profiler.before_step(iteration + 1)   # starts the trace at profile.start_step
    ... one training step ...
    profiler.after_step(iteration)        # marks the step; stops (and writes) before end_step

The trace is started and stopped by hand, not by a torch.profiler schedule: outside the
window no profiler object is running at all. Every rank calls the hooks; only the ranks in
``profile.ranks`` record. No collectives.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch

from megatron_mile.config import ProfileConfig

log = logging.getLogger("megatron_mile")


class StepProfiler:
    """torch.profiler over iterations ``start_step .. end_step - 1`` on the chosen ranks,
    written as Chrome trace JSON (``<dir>/rank<r>.<time>.pt.trace.json``) that TensorBoard's
    profiler plugin and Perfetto read; each iteration is a ``ProfilerStep#<iteration>`` range.
    With ``cuda_profiler_api`` (profile.nvtx on GPU) it also calls cudaProfilerStart/Stop
    around the window, for ``nsys profile --capture-range=cudaProfilerApi``."""

    def __init__(self, cfg: ProfileConfig, rank: int, cuda: bool):
        self.cfg = cfg
        self.rank = rank
        self.cuda = cuda
        self.records = cfg.enabled and rank in cfg.ranks
        self.cuda_profiler_api = cfg.enabled and cfg.nvtx and cuda
        self.profiler: Optional[torch.profiler.profile] = None

    @property
    def running(self) -> bool:
        return self.profiler is not None

    def before_step(self, iteration: int) -> None:
        """Called before iteration ``iteration`` (from 1) runs."""
        if iteration != self.cfg.start_step:
            return
        if self.cuda_profiler_api:
            torch.cuda.cudart().cudaProfilerStart()
        if not self.records:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(self.cfg.dir, exist_ok=True)
        self.profiler = torch.profiler.profile(
            activities=activities, record_shapes=self.cfg.record_shapes,
            # Record every step it sees (started and stopped by hand); a schedule is what
            # makes torch mark each step as a ProfilerStep#<n> range.
            schedule=lambda step: torch.profiler.ProfilerAction.RECORD,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                self.cfg.dir, worker_name=f"rank{self.rank}"))
        # Number the ProfilerStep ranges as the log numbers iterations.
        self.profiler.step_num = iteration
        self.profiler.start()

    def after_step(self, iteration: int) -> None:
        """Called after iteration ``iteration`` finished: the next ProfilerStep begins, or the
        window closes and the trace is written."""
        if iteration + 1 != self.cfg.end_step:
            if self.profiler is not None:
                self.profiler.step()
            return
        self.stop()
        if self.cuda_profiler_api:
            torch.cuda.cudart().cudaProfilerStop()

    def stop(self) -> None:
        """End the trace now (the window's end, or a run that stops inside it) and write it."""
        if self.profiler is None:
            return
        self.profiler.stop()
        self.profiler = None
        log.info(f"rank {self.rank}: profiler trace of iterations {self.cfg.start_step}.."
                 f"{self.cfg.end_step - 1} written to {self.cfg.dir}")


class NvtxTimers:
    """megatron-core's ``config.timers`` hook turned into NVTX ranges: its pipeline schedules
    call ``timers("forward-compute").start()`` / ``.stop()`` around each micro-batch's forward,
    ``"backward-compute"`` around its backward, ``"forward-backward"`` around the step, the
    p2p send/recv names around pipeline communication, and ``finalize_model_grads`` calls
    ``"all-grads-sync"`` (and the embedding/non-TP all-reduces) around gradient reduction.
    Ranges are started and ended by handle (``range_start`` / ``range_end``), so they need
    not nest."""

    def __init__(self):
        self._open: dict[str, int] = {}

    def __call__(self, name: str, log_level: Optional[int] = None) -> "_NvtxTimer":
        return _NvtxTimer(self._open, name)


class _NvtxTimer:
    def __init__(self, open_ranges: dict[str, int], name: str):
        self._open, self._name = open_ranges, name

    def start(self, barrier: bool = False) -> None:
        self._open[self._name] = torch.cuda.nvtx.range_start(self._name)

    def stop(self, barrier: bool = False) -> None:
        handle = self._open.pop(self._name, None)
        if handle is not None:
            torch.cuda.nvtx.range_end(handle)


def nvtx_range(name: str, enabled: bool):
    """An NVTX range around a block when ``enabled`` (profile.nvtx on GPU), else nothing."""
    return torch.cuda.nvtx.range(name) if enabled else contextlib.nullcontext()
