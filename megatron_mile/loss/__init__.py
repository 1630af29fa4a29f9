"""Losses over vocabulary-parallel logits: MiLe, focal and cross-entropy.

``vocab_parallel.py`` holds the autograd Function, ``reference.py`` the dense float64
specification, ``reduction.py`` the normalisation into a micro-batch loss (the typed
configuration, :class:`LossConfig`, lives in :mod:`megatron_mile.config`, re-exported here),
``fused_linear.py`` the output layer and loss in one chunked Function,
and :func:`token_losses` the one dispatch the model calls.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_mile.config import LOSS_TYPES, LossConfig  # re-exported: its old import path
from megatron_mile.loss.fused_linear import DeferredLogits, linear_weighted_cross_entropy
from megatron_mile.loss.reduction import (
    NORMALIZATIONS,
    LossNormalizer,
    ReducedLoss,
    reduce_global,
    reduce_paper,
    reduce_token_losses,
)
from megatron_mile.loss.vocab_parallel import (
    IGNORE_INDEX,
    WeightedCrossEntropy,
    vocab_parallel_focal_loss,
    vocab_parallel_mile_loss,
    vocab_parallel_weighted_cross_entropy,
)

__all__ = [
    "DeferredLogits", "IGNORE_INDEX", "LOSS_TYPES", "NORMALIZATIONS", "LossConfig",
    "LossNormalizer", "ReducedLoss", "WeightedCrossEntropy", "fused_token_losses",
    "linear_weighted_cross_entropy", "reduce_global", "reduce_paper", "reduce_token_losses",
    "token_losses", "vocab_parallel_focal_loss", "vocab_parallel_mile_loss",
    "vocab_parallel_weighted_cross_entropy",
]


def token_losses(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    cfg: LossConfig,
    tp_group: Optional[dist.ProcessGroup] = None,
    valid_vocab_size: Optional[int] = None,
) -> WeightedCrossEntropy:
    """Per-token losses of the configured objective; ``[s, b, v/tp]`` logits, ``[s, b]`` target.

    ``valid_vocab_size``: the real (unpadded) vocabulary size; columns at global index >= it
    (padding, at the end of the last TP shard) count nowhere: not in the softmax, CE or
    entropy, and get zero gradient; targets >= it are an error. None: every column is real.

    ``focal`` and ``mile`` use the fused Function of ``vocab_parallel.py`` (2 all-reduces).
    ``cross_entropy`` goes through megatron-core's ``vocab_parallel_cross_entropy`` (3
    all-reduces on megatron's TP group, so ``tp_group`` must be that group or None; weight 1,
    entropy not computed: NaN) when the vocabulary has no padding; megatron's CE would count
    padding columns in its softmax, so with padding it runs through the same Function with
    ``weighting="none"`` (weight 1, CE identical up to rounding, entropy computed).
    """
    if cfg.type == "cross_entropy":
        from megatron.core import parallel_state, tensor_parallel

        if (tp_group is not None and parallel_state.model_parallel_is_initialized()
                and tp_group is not parallel_state.get_tensor_model_parallel_group()):
            raise ValueError("loss.type=cross_entropy runs on megatron-core's TP group only")
        tp_size = _tp_size(tp_group)
        padded = valid_vocab_size is not None and \
            valid_vocab_size < vocab_parallel_logits.shape[-1] * tp_size
        if not padded:
            ce = tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits, target)
            ones = torch.ones_like(ce, dtype=torch.float32).detach()
            nan = torch.full_like(ones, float("nan"))
            return WeightedCrossEntropy(weighted_ce=ce.float(), weight=ones,
                                        ce=ce.detach().float(), entropy=nan)
    return vocab_parallel_weighted_cross_entropy(
        vocab_parallel_logits, target, weighting=cfg.weighting, gamma=cfg.gamma, sigma=cfg.sigma,
        tp_group=tp_group, validate=cfg.validate_targets, valid_vocab_size=valid_vocab_size,
    )


def _tp_size(tp_group: Optional[dist.ProcessGroup]) -> int:
    """Size of ``tp_group`` (None: megatron-core's TP group, or 1 without a process group)."""
    if tp_group is not None:
        return dist.get_world_size(tp_group)
    from megatron.core import parallel_state

    if dist.is_available() and dist.is_initialized() and \
            parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


def fused_token_losses(
    deferred: DeferredLogits,
    target: torch.Tensor,
    cfg: LossConfig,
    valid_vocab_size: Optional[int] = None,
) -> WeightedCrossEntropy:
    """Per-token losses of the configured objective computed from the output layer's inputs
    (:class:`DeferredLogits`) by :func:`linear_weighted_cross_entropy`, with the layer's own
    TP group, sequence parallelism and gradient-accumulation fusion; ``[s, b]`` target.

    ``cross_entropy`` is weight-1 CE there (its entropy is computed, not NaN). The deferred
    ``loss_mask`` ``[b, s]``, when the model had one, is the ``grad_factor`` (transposed to
    ``[s, b]``): the per-token factor ``loss_func`` applies before the schedule's scalar.
    Collectives: those of :func:`linear_weighted_cross_entropy`.
    """
    mask = deferred.loss_mask
    grad_factor = None if mask is None else mask.transpose(0, 1)
    return linear_weighted_cross_entropy(
        deferred.hidden, deferred.weight, target, weighting=cfg.weighting, gamma=cfg.gamma,
        sigma=cfg.sigma, tp_group=deferred.tp_group,
        sequence_parallel=deferred.sequence_parallel, valid_vocab_size=valid_vocab_size,
        validate=cfg.validate_targets,
        gradient_accumulation_fusion=deferred.gradient_accumulation_fusion,
        grad_factor=grad_factor,
    )
