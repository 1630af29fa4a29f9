"""Run megatron-core on CPU processes over gloo: a small, explicit compatibility layer.

megatron-core 0.16.1 assumes CUDA in many places. On a machine with CUDA none of this module's
patches is applied (``install_cpu_compat`` is a strict no-op there). Without CUDA,
``install_cpu_compat`` changes exactly the following, process-wide, once:

torch.cuda functions (module attributes replaced)
    ``torch.cuda.current_device``  -> returns ``torch.device("cpu")``: used as a ``device=``
        argument for buffers all over megatron (``utils.py`` GlobalMemoryBuffer,
        ``tensor_parallel/mappings.py`` gathers, ``pipeline_parallel/p2p_communication.py``
        receive buffers, ``distributed/param_and_grad_buffer.py`` grad buffers, RoPE ...).
    ``torch.cuda.manual_seed``, ``torch.cuda.get_rng_state``, ``torch.cuda.set_rng_state``
        (also under ``torch.cuda.random``) -> act on the CPU default generator:
        ``tensor_parallel/random.py`` ``CudaRNGStatesTracker.add`` and
        ``model_parallel_cuda_manual_seed`` call them directly. ``torch.cuda.manual_seed_all``
        is left alone: ``torch.manual_seed`` calls it (a queued no-op without CUDA), so routing
        it to ``torch.manual_seed`` would recurse.
    ``torch.cuda.synchronize`` -> no-op (nothing to wait for on CPU): called by
        ``pipeline_parallel/p2p_communication.py`` after batched p2p, and by
        ``dist_checkpointing/strategies/filesystem_async.py`` ``preload_tensors``.

megatron.core.tensor_parallel.random (module attributes replaced)
    ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> ``torch.get/set_rng_state``: the RNG
        tracker's ``fork()`` (weight init under TP, dropout in TP regions) and
        ``_get_all_rng_states`` swap the "CUDA" generator through these; on CPU that generator
        *is* the CPU default generator, so forking swaps the generator that CPU ops draw from.
    A logging filter on that module's logger drops "CPU RNG state changed within GPU RNG
        context": with the CUDA generator backed by the CPU one, that warning fires on every
        fork that draws random numbers, and means nothing.

megatron.core.transformer.utils / megatron.core.fusions.fused_softmax (module attributes)
    ``get_default_causal_mask`` -> built on the CPU: under activation recomputation the
        layer forward runs again inside ``torch.autograd.backward``, which torch dispatches
        through the mode below (popping it while the handler runs), so the mode cannot
        rewrite this function's ``device="cuda"`` there.

A ``torch.overrides.TorchFunctionMode`` pushed onto the calling thread's mode stack
    ``device="cuda"`` / ``"cuda:N"`` / ``torch.device("cuda")`` keyword arguments, and the
        positional device of ``Tensor.to`` -> CPU: literals in ``pipeline_parallel/schedules.py``
        (``total_num_tokens``), ``optimizer/clip_grads.py``, ``optimizer/optimizer.py``,
        ``optimizer/grad_scaler.py``, ``distributed/param_and_grad_buffer.py``,
        ``transformer/utils.py`` (attention masks).
    ``Tensor.cuda(...)`` -> returns the tensor itself (``language_module.py``,
        ``grad_scaler.py`` ``load_state_dict``, ``distrib_optimizer.py`` gloo paths).
    ``Tensor.type()`` with no argument, on a CPU float32/float16/bfloat16 tensor, -> the
        ``"torch.cuda.*Tensor"`` name: ``optimizer/optimizer.py``
        (``Float16OptimizerWithFloat16Params``), ``optimizer/distrib_optimizer.py`` (param
        sharding) and ``optimizer/clip_grads.py`` (``assert param.grad.type() ==
        'torch.cuda.FloatTensor'``) compare these strings and reject CPU names.
    The mode is thread-local (torch keeps the mode stack per thread): install from the thread
    that runs training. Autograd's backward pass on CPU runs in the calling thread.

Joining the process group (which installs this layer on CPU) is :mod:`megatron_mile.launch`;
the pipeline setting that mixes up p2p messages is checked by
:func:`megatron_mile.model.check_pipeline_config`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "cuda_available",
    "install_cpu_compat",
    "cpu_compat_installed",
]

_CPU = torch.device("cpu")
_install_lock = threading.Lock()
_installed_mode: "_CudaToCpuMode | None" = None

# Tensor.type() names megatron compares against, for CPU tensors of these dtypes.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def cuda_available() -> bool:
    """True when torch sees at least one CUDA device (the GPU path; no compat layer)."""
    return torch.cuda.is_available()


def cpu_compat_installed() -> bool:
    """True once ``install_cpu_compat`` has patched this process (always False with CUDA)."""
    return _installed_mode is not None


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU and reports CPU float tensors under CUDA type names.

    See the module docstring for which megatron code needs each rule.
    """

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            name = _CUDA_TYPE_NAMES.get(tensor.dtype)
            if name is not None and tensor.device.type == "cpu":
                return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _DropForkWarning(logging.Filter):
    """Drops the tracker's CPU-RNG-changed warning, meaningless when CUDA RNG is the CPU RNG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_manual_seed(seed: int) -> None:
    # Seeds the CPU generator directly: torch.manual_seed would call
    # torch.cuda.manual_seed_all, which must stay untouched (see module docstring).
    torch.default_generator.manual_seed(int(seed))


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    # megatron's get_default_causal_mask, on the CPU: True above the diagonal = masked.
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(new_state)


def _megatron_get_rng_state(device: Any = "cuda", clone: bool = False,
                            graph_safe: bool = False) -> torch.Tensor:
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG tracking needs CUDA; set use_cudagraphable_rng=False")
    return torch.get_rng_state()


def _megatron_set_rng_state(new_state: torch.Tensor, device: Any = -1,
                            graph_safe: bool = False) -> None:
    if graph_safe:
        raise RuntimeError("CUDA-graph-safe RNG tracking needs CUDA; set use_cudagraphable_rng=False")
    torch.set_rng_state(new_state)


def install_cpu_compat() -> None:
    """Patch torch.cuda, megatron's RNG helpers and push the device-rewriting mode (CPU only).

    Idempotent (a second call does nothing) and a strict no-op when ``cuda_available()``.
    Everything changed is listed in the module docstring. Issues no collectives.
    """
    global _installed_mode
    if cuda_available():
        return
    with _install_lock:
        if _installed_mode is not None:
            return
        # Import here: megatron-core is heavy and this module must stay cheap to import.
        from megatron.core.tensor_parallel import random as mcore_random

        torch.cuda.current_device = lambda: _CPU  # buffers: device=torch.cuda.current_device()
        torch.cuda.synchronize = lambda device=None: None  # p2p_communication, filesystem_async
        # tensor_parallel/random.py: CudaRNGStatesTracker.add, model_parallel_cuda_manual_seed.
        for namespace in (torch.cuda, torch.cuda.random):
            namespace.manual_seed = _cpu_manual_seed
            namespace.get_rng_state = _cpu_get_rng_state
            namespace.set_rng_state = _cpu_set_rng_state
        # tensor_parallel/random.py: CudaRNGStatesTracker.fork, _get/_set_all_rng_states.
        mcore_random._get_cuda_rng_state = _megatron_get_rng_state
        mcore_random._set_cuda_rng_state = _megatron_set_rng_state
        logging.getLogger(mcore_random.__name__).addFilter(_DropForkWarning())
        # transformer/utils.py get_default_causal_mask (imported by name into
        # fusions/fused_softmax.py) builds the attention mask with device="cuda". The mode
        # below rewrites that in forward, but not under activation recomputation: torch
        # dispatches torch.autograd.backward itself through the mode and pops the mode while
        # its handler runs, so the layer forward that megatron's CheckpointFunction replays
        # inside backward sees no mode. The mask is the device literal on that path.
        from megatron.core.fusions import fused_softmax as mcore_fused_softmax
        from megatron.core.transformer import utils as mcore_transformer_utils

        mcore_transformer_utils.get_default_causal_mask = _cpu_default_causal_mask
        mcore_fused_softmax.get_default_causal_mask = _cpu_default_causal_mask

        mode = _CudaToCpuMode()
        mode.__enter__()  # stays pushed for the life of this thread
        _installed_mode = mode
