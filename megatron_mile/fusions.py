"""Which fused kernels a run uses: the one place that decides, from what this process can load.

megatron-core exposes each fast path as a ``TransformerConfig`` flag and either fails (an apex
extension that is missing) or raises at config time (RoPE fusion without Transformer Engine)
when the kernel behind it is absent. Megatron-LM turns them all on by default and leaves the
user to pass ``--no-...`` flags where a kernel is missing. Here each flag is on exactly when
its kernel can run in this process, decided once by :func:`fusion_settings` from
:class:`Kernels`, and ``model.transformer_impl: auto`` picks Transformer Engine where it is
importable with CUDA (:func:`resolve_transformer_impl`).

    kernels = Kernels.detect()
    impl = resolve_transformer_impl(cfg.model.transformer_impl, kernels)
    TransformerConfig(..., **fusion_settings(impl, kernels))

docs/launching.md ("Fused kernels") tabulates the result on a GPU with Transformer Engine, a
GPU without it and a CPU, next to Megatron-LM's value for the same LLaMA arguments;
tests/test_fusions.py checks that table against this module with CUDA and the kernels faked.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from megatron_mile.config import TRANSFORMER_IMPLS, TrainConfig
from megatron_mile.errors import ConfigError

__all__ = ["FUSIONS", "Kernels", "check_kernels", "fusion_settings", "kernel_notice",
           "resolve_transformer_impl", "TRANSFORMER_IMPLS"]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or half-installed
        return False


@dataclass(frozen=True)
class Kernels:
    """What this process can load; every field is read once, by :meth:`detect`."""

    cuda: bool
    """torch sees a CUDA device (``megatron_mile.cpu_compat.cuda_available``)."""
    transformer_engine: bool
    """``transformer_engine`` is importable (NVIDIA's PyTorch containers ship it)."""
    apex_gradient_accumulation: bool
    """apex's ``fused_weight_gradient_mlp_cuda`` extension, which megatron-core's
    ``ColumnParallelLinear`` (the output layer, and every linear of the local spec) needs for
    ``gradient_accumulation_fusion`` (megatron/core/tensor_parallel/layers.py)."""
    apex_masked_softmax: bool
    """apex's ``scaled_masked_softmax_cuda`` / ``scaled_upper_triang_masked_softmax_cuda``,
    the kernels of megatron-core's ``FusedScaleMaskSoftmax`` (fusions/fused_softmax.py)."""
    apex_persist_layer_norm: bool
    """apex's ``FastLayerNormFN`` (``apex.contrib.layer_norm``), behind
    ``persist_layer_norm`` (fusions/fused_layer_norm.py)."""

    @classmethod
    def detect(cls) -> "Kernels":
        from megatron_mile.cpu_compat import cuda_available

        cuda = cuda_available()
        return cls(
            cuda=cuda,
            transformer_engine=_importable("transformer_engine"),
            apex_gradient_accumulation=_importable("fused_weight_gradient_mlp_cuda"),
            apex_masked_softmax=(_importable("scaled_masked_softmax_cuda")
                                 and _importable("scaled_upper_triang_masked_softmax_cuda")),
            apex_persist_layer_norm=_importable("apex.contrib.layer_norm"),
        )


def resolve_transformer_impl(requested: str, kernels: Kernels) -> str:
    """``auto`` -> ``transformer_engine`` with CUDA and TE importable, else ``local``; other
    values are returned as given (config validation reports a TE that is missing)."""
    if requested != "auto":
        return requested
    return "transformer_engine" if kernels.cuda and kernels.transformer_engine else "local"


def check_kernels(cfg: TrainConfig, kernels: Optional[Kernels] = None) -> None:
    """What ``cfg`` asks of this machine's kernels: FP8, ``model.transformer_impl=
    transformer_engine`` and a ``model.sliding_window`` shorter than ``model.seq_length``
    need Transformer Engine with CUDA. Run where a run is set up
    (:func:`megatron_mile.run_config.resolve_run_config`, ``initialize_parallel``), not in
    the configuration's own validation, which reads no machine state.

    Raises:
        ConfigError: one line naming the field and the fix.
    """
    kernels = kernels or Kernels.detect()
    m = cfg.model
    impl = resolve_transformer_impl(m.transformer_impl, kernels)
    te_usable = kernels.cuda and kernels.transformer_engine
    needs_te = [what for what, needed in (
        (f"precision.fp8={cfg.precision.fp8!r}", bool(cfg.precision.fp8)),
        ("model.transformer_impl=transformer_engine", impl == "transformer_engine"),
    ) if needed]
    if needs_te and not te_usable:
        raise ConfigError(
            f"{needs_te[0]} needs Transformer Engine with CUDA, which this process cannot "
            "load: run in NVIDIA's PyTorch container (see docker/), or set "
            "model.transformer_impl=auto and precision.fp8=null (bf16 on the local "
            "layer spec)")
    if needs_te and impl != "transformer_engine":
        raise ConfigError(f"{needs_te[0]} needs model.transformer_impl=transformer_engine "
                          f"(or auto), not {m.transformer_impl!r}")
    if m.sliding_window is not None and m.sliding_window < m.seq_length \
            and impl != "transformer_engine":
        raise ConfigError(
            f"model.sliding_window={m.sliding_window} (config.json's sliding_window) is "
            f"shorter than model.seq_length={m.seq_length}: the window then masks tokens, "
            "which only Transformer Engine's attention implements here; set "
            f"model.seq_length<={m.sliding_window} (the attention is then plain causal), or "
            "run with Transformer Engine (model.transformer_impl=auto on a GPU in NVIDIA's "
            "container)")


class Fusion(NamedTuple):
    """One ``TransformerConfig`` flag: when it is on here, and what Megatron-LM does."""

    field: str
    enabled: Callable[[str, Kernels], bool]
    """(resolved transformer_impl, kernels) -> on?"""
    requires: str
    megatron_lm: str
    """Megatron-LM's value for the LLaMA arguments, and the argument that sets it."""


FUSIONS: tuple[Fusion, ...] = (
    Fusion("gradient_accumulation_fusion",
           lambda impl, k: k.cuda and k.apex_gradient_accumulation,
           "CUDA + apex `fused_weight_gradient_mlp_cuda` (megatron's output layer needs it with "
           "either spec)",
           "True (`--no-gradient-accumulation-fusion` turns it off)"),
    Fusion("bias_activation_fusion",
           lambda impl, k: k.cuda,
           "CUDA (megatron's jit-fused SwiGLU, `fusions/fused_bias_swiglu.py`)",
           "True (`--swiglu` with `--no-bias-swiglu-fusion` unset)"),
    Fusion("bias_dropout_fusion",
           lambda impl, k: k.cuda,
           "CUDA (megatron's jit-fused bias-dropout-add, `fusions/fused_bias_dropout.py`)",
           "True (`--no-bias-dropout-fusion` turns it off)"),
    Fusion("apply_rope_fusion",
           lambda impl, k: k.cuda and k.transformer_engine,
           "CUDA + Transformer Engine (megatron's fused RoPE comes from TE >= 1.4)",
           "True (`--no-rope-fusion` turns it off)"),
    Fusion("masked_softmax_fusion",
           lambda impl, k: k.cuda and (impl == "transformer_engine" or k.apex_masked_softmax),
           "CUDA + TE spec (TE's attention) or apex's softmax kernels (local spec)",
           "True (`--no-masked-softmax-fusion` turns it off)"),
    Fusion("persist_layer_norm",
           lambda impl, k: k.cuda and k.apex_persist_layer_norm,
           "CUDA + apex `FastLayerNormFN` (used by LayerNorm only; these models use RMSNorm)",
           "True (`--no-persist-layer-norm` turns it off)"),
    Fusion("cross_entropy_loss_fusion",
           lambda impl, k: False,
           "never: the project's loss replaces megatron's (`loss.fused_output_layer` is the "
           "fusion here)",
           "False (`--cross-entropy-loss-fusion` turns it on)"),
)


def fusion_settings(transformer_impl: str, kernels: Kernels) -> dict[str, bool]:
    """The ``TransformerConfig`` fusion flags for a resolved ``transformer_impl``."""
    return {f.field: bool(f.enabled(transformer_impl, kernels)) for f in FUSIONS}


def kernel_notice(transformer_impl: str, kernels: Kernels) -> Optional[str]:
    """One line for the log (rank 0) on a GPU where kernels are missing, naming what runs
    unfused; None on CPU (the expected setting there) or when nothing is missing. It replaces
    megatron-core's per-module "Transformer Engine and Apex are not installed" warnings, which
    ``megatron_mile.log_filters`` drops."""
    if not kernels.cuda:
        return None
    missing = []
    if not kernels.transformer_engine:
        missing.append("Transformer Engine (local layer spec: no fused attention, no FP8, "
                       "unfused RoPE)")
    if not kernels.apex_gradient_accumulation:
        missing.append("apex (no gradient-accumulation fusion; torch optimizers and "
                       "multi-tensor kernels)")
    if not missing:
        return None
    off = [f.field for f in FUSIONS
           if f.field != "cross_entropy_loss_fusion" and not f.enabled(transformer_impl, kernels)]
    verb = "stays" if len(off) == 1 else "stay"
    return (f"kernels: {'; '.join(missing)} not importable, so {', '.join(off) or 'nothing'} "
            f"{verb} off. NVIDIA's PyTorch container (docker/) has both")
