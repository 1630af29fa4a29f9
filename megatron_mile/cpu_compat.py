"""Run megatron-core on CPU processes over gloo: a small, explicit compatibility layer.

megatron-core 0.16.1 assumes CUDA in many places. On a machine with CUDA nothing here is
applied (``install_cpu_compat`` is a strict no-op there). Without CUDA, ``install_cpu_compat``
checks that the installed megatron-core is the release these patches were written against
(:data:`MEGATRON_CORE_VERSION`), then changes, process-wide and once:

* every entry of :data:`PATCHES`: module attributes of ``torch.cuda`` and of megatron-core
  replaced by CPU versions, and one logging filter, each with the megatron code that needs it;
* a ``torch.overrides.TorchFunctionMode`` (:class:`_CudaToCpuMode`) pushed onto the calling
  thread's mode stack, for the ``device="cuda"`` literals, ``Tensor.cuda()`` calls and
  ``Tensor.type()`` name checks spread over megatron's optimizer, schedules and DDP. The
  mode is thread-local (torch keeps the mode stack per thread): install from the thread that
  runs training. Autograd's backward pass on CPU runs in the calling thread.

Every "is CUDA here" decision of the package goes through :func:`cuda_available`. Joining the
process group (which installs this layer on CPU) is :mod:`megatron_mile.launch`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "MEGATRON_CORE_VERSION",
    "PATCHES",
    "Patch",
    "cuda_available",
    "install_cpu_compat",
    "cpu_compat_installed",
]

MEGATRON_CORE_VERSION = "0.16.1"
"""The megatron-core release whose internals :data:`PATCHES` replace (setup.py pins it)."""

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
    """True when torch sees at least one CUDA device: the GPU path (nccl, no compat layer).

    The package's one place for this decision, so that the compat layer, the process group's
    backend, model initialisation and the data loader never disagree about the device.
    """
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
    """Rewrites CUDA device requests to CPU and reports CPU float tensors under CUDA names.

    * ``device="cuda"`` / ``"cuda:N"`` / ``torch.device("cuda")`` keyword arguments, and the
      positional device of ``Tensor.to`` -> CPU: literals in ``pipeline_parallel/schedules.py``
      (``total_num_tokens``), ``optimizer/clip_grads.py``, ``optimizer/optimizer.py``,
      ``optimizer/grad_scaler.py``, ``distributed/param_and_grad_buffer.py``,
      ``transformer/utils.py`` (attention masks).
    * ``Tensor.cuda(...)`` -> the tensor itself (``models/common/language_module/
      language_module.py``, ``grad_scaler.py`` ``load_state_dict``, ``distrib_optimizer.py``
      gloo paths).
    * ``pin_memory=True`` keyword arguments -> dropped (pinning needs CUDA):
      ``models/common/embeddings/rope_utils.py`` ``get_pos_emb_on_this_cp_rank`` (RoPE under
      context parallelism) builds its chunk index with ``pin_memory=True``.
    * ``Tensor.type()`` with no argument, on a CPU float32/float16/bfloat16 tensor -> the
      ``"torch.cuda.*Tensor"`` name: ``optimizer/optimizer.py``
      (``Float16OptimizerWithFloat16Params``), ``optimizer/distrib_optimizer.py`` (param
      sharding) and ``optimizer/clip_grads.py`` (``assert param.grad.type() ==
      'torch.cuda.FloatTensor'``) compare these strings and reject CPU names.
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
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _DropForkWarning(logging.Filter):
    """Drops the tracker's CPU-RNG-changed warning, meaningless when CUDA RNG is the CPU RNG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_current_device() -> torch.device:
    return _CPU


def _no_synchronize(device: Any = None) -> None:
    return None


def _cpu_manual_seed(seed: int) -> None:
    # Seeds the CPU generator directly: torch.manual_seed would call
    # torch.cuda.manual_seed_all, which must stay untouched (see PATCHES).
    torch.default_generator.manual_seed(int(seed))


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


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    # megatron's get_default_causal_mask, on the CPU: True above the diagonal = masked.
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


@dataclass(frozen=True)
class Patch:
    """One process-wide change made by :func:`install_cpu_compat` without CUDA.

    ``attr`` names the attribute of ``module`` that ``replacement`` replaces; ``attr=None``
    means ``replacement`` is a ``logging.Filter`` added to the logger named ``module``.
    """

    module: str
    attr: str | None
    replacement: Any
    why: str

    def apply(self) -> None:
        """Make the change (imports ``module``)."""
        if self.attr is None:
            logging.getLogger(self.module).addFilter(self.replacement)
        else:
            setattr(importlib.import_module(self.module), self.attr, self.replacement)


_RNG_WHY = ("megatron/core/tensor_parallel/random.py: CudaRNGStatesTracker.add and "
            "model_parallel_cuda_manual_seed call it directly; on CPU the 'CUDA' generator is "
            "the CPU default generator")
_MASK_WHY = ("megatron/core/transformer/utils.py get_default_causal_mask (imported by name into "
             "fusions/fused_softmax.py) builds the mask with device='cuda'. The mode rewrites "
             "that in forward, but not under activation recomputation: torch dispatches "
             "torch.autograd.backward itself through the mode and pops the mode while its "
             "handler runs, so the layer forward that CheckpointFunction replays inside "
             "backward sees no mode")

PATCHES: tuple[Patch, ...] = (
    Patch("torch.cuda", "current_device", _cpu_current_device,
          "a device= argument for buffers all over megatron: utils.py GlobalMemoryBuffer, "
          "tensor_parallel/mappings.py gathers, pipeline_parallel/p2p_communication.py "
          "receive buffers, distributed/param_and_grad_buffer.py, RoPE"),
    Patch("torch.cuda", "synchronize", _no_synchronize,
          "nothing to wait for on CPU: pipeline_parallel/p2p_communication.py after batched "
          "p2p, dist_checkpointing/strategies/filesystem_async.py preload_tensors"),
    # torch.cuda.manual_seed_all is left alone: torch.manual_seed calls it (a queued no-op
    # without CUDA), so routing it to torch.manual_seed would recurse.
    Patch("torch.cuda", "manual_seed", _cpu_manual_seed, _RNG_WHY),
    Patch("torch.cuda.random", "manual_seed", _cpu_manual_seed, _RNG_WHY),
    Patch("torch.cuda", "get_rng_state", _cpu_get_rng_state, _RNG_WHY),
    Patch("torch.cuda.random", "get_rng_state", _cpu_get_rng_state, _RNG_WHY),
    Patch("torch.cuda", "set_rng_state", _cpu_set_rng_state, _RNG_WHY),
    Patch("torch.cuda.random", "set_rng_state", _cpu_set_rng_state, _RNG_WHY),
    Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _megatron_get_rng_state,
          "the RNG tracker's fork() (weight init under TP, dropout in TP regions) and "
          "_get_all_rng_states swap the 'CUDA' generator through it; on CPU that is the CPU "
          "default generator, so forking swaps the generator that CPU ops draw from"),
    Patch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _megatron_set_rng_state,
          "the other half of _get_cuda_rng_state (fork() restores the generator through it)"),
    Patch("megatron.core.tensor_parallel.random", None, _DropForkWarning(),
          "fork() warns 'CPU RNG state changed within GPU RNG context' whenever the CPU "
          "generator moved inside the fork: with the CUDA generator backed by the CPU one "
          "that is every fork that draws random numbers, and means nothing"),
    Patch("megatron.core.transformer.utils", "get_default_causal_mask", _cpu_default_causal_mask,
          _MASK_WHY),
    Patch("megatron.core.fusions.fused_softmax", "get_default_causal_mask",
          _cpu_default_causal_mask, _MASK_WHY),
)
"""Everything ``install_cpu_compat`` changes besides pushing :class:`_CudaToCpuMode`, in the
order it is applied. tests/test_cpu_compat.py checks every entry."""


def _check_megatron_core_version() -> None:
    from megatron.core import package_info

    if package_info.__version__ != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"megatron_mile.cpu_compat patches megatron-core {MEGATRON_CORE_VERSION} internals "
            f"but megatron-core {package_info.__version__} is installed: pip install "
            f"megatron-core=={MEGATRON_CORE_VERSION}")


def install_cpu_compat() -> None:
    """Apply :data:`PATCHES` and push the device-rewriting mode (CPU only).

    Idempotent (a second call does nothing) and a strict no-op when ``cuda_available()``.
    Issues no collectives.

    Raises:
        RuntimeError: (without CUDA) the installed megatron-core is not
            :data:`MEGATRON_CORE_VERSION`, whose internals the patches replace.
    """
    global _installed_mode
    if cuda_available():
        return
    with _install_lock:
        if _installed_mode is not None:
            return
        _check_megatron_core_version()
        for patch in PATCHES:
            patch.apply()
        mode = _CudaToCpuMode()
        mode.__enter__()  # stays pushed for the life of this thread
        _installed_mode = mode
