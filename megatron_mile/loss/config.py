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
    every parallel layout. In fp32 the trainer hands the loss mask to the fused loss, which
    then forms the gradients in forward (3 GEMMs of the output layer's size, as unfused;
    at TP > 1 with two small all-reduces per chunk) and only scales them in backward; bf16
    and fp16 recompute the logits in backward (one extra GEMM; see
    ``fused_linear.PRECOMPUTE_DTYPES`` for why). Off by default: the issue-20 goals (time
    <= 1.0x unfused as a function, tokens/s >= 1.0x in training) are not shown met on the
    shared 2-core CPU where it was measured, and it is not yet measured on a GPU, where
    tools/gpu_checks.sh measures it (docs/benchmarks.md). Turn it on where the logits'
    memory is the limit (128k vocabularies). ``cross_entropy`` then runs as weight-1 CE in
    the same kernel, not megatron-core's CE."""

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
