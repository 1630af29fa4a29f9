"""Typed configuration of the training objective."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mile.loss.reduction import NORMALIZATIONS
from megatron_mile.loss.vocab_parallel import check_weight_params

LOSS_TYPES = ("cross_entropy", "focal", "mile")


@dataclass
class LossConfig:
    """Which objective the model trains on, and how it is normalised."""

    type: str = "mile"
    """``cross_entropy`` (megatron-core's vocab_parallel_cross_entropy), ``focal``
    (w = (1 - p_target) ** gamma) or ``mile`` (w = (sigma + entropy) ** gamma)."""

    gamma: float = 1.0
    """Exponent of the token weight, >= 0. 0 turns focal and MiLe into cross-entropy.
    The paper's default is 1."""

    sigma: float = 1.0
    """MiLe only: offset added to the entropy before the power. The paper's default is 1.
    Negative values need an integer gamma."""

    normalization: str = "paper"
    """``paper``: alpha = 1 / mean(weight) per micro-batch, averaged over data-parallel ranks
    (the official code's semantics). ``global``: exact weighted mean
    sum(w * CE) / sum(w) over the global batch."""

    validate_targets: bool = True
    """Check that every target id is inside the vocabulary (one host sync per micro-batch on
    GPU). Turn off only for benchmarking trusted data."""

    fused_output_layer: bool = False
    """Compute the output layer and the loss together, a chunk of tokens at a time
    (``linear_weighted_cross_entropy``), so the ``[s, b, v/tp]`` logits and their gradient
    never exist; values and gradients equal the unfused path's within fp32 rounding, for
    every parallel layout. Costs one extra GEMM of the output layer's size (the logits are
    recomputed in backward). Off by default because it measured slower end to end on CPU:
    tiny with a 128000 vocabulary ran at 0.82 times the unfused tokens/s for 0.56 times its
    peak memory on a quiet 2-core machine (0.55 times when it was oversubscribed;
    docs/benchmarks.md); not yet measured on a GPU, where tools/gpu_checks.sh measures it. Turn it on where the logits' memory is the limit. ``cross_entropy`` then runs as
    weight-1 CE in the same kernel, not megatron-core's CE."""

    @property
    def weighting(self) -> str:
        """The ``weighting`` argument of the loss functions for this ``type``."""
        return {"cross_entropy": "none", "focal": "focal", "mile": "mile"}[self.type]

    def __post_init__(self) -> None:
        if self.type not in LOSS_TYPES:
            raise ValueError(f"loss.type={self.type!r} is not one of {LOSS_TYPES}")
        check_weight_params("mile" if self.type == "mile" else "focal", self.gamma, self.sigma,
                            prefix="loss.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"loss.normalization={self.normalization!r} is not one of {NORMALIZATIONS}"
            )
