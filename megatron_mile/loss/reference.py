"""Dense float64 reference of the three losses: the specification the tests compare against.

Plain autograd over the FULL vocabulary, no tensor parallelism, no tricks; written to be read,
not to be fast. ``logits`` ``[..., v]``, ``target`` ``[...]``; results in float64.
"""

from __future__ import annotations

import torch

from megatron_mile.loss.vocab_parallel import IGNORE_INDEX

__all__ = ["token_losses", "paper_objective", "global_objective"]


def token_losses(
    logits: torch.Tensor, target: torch.Tensor, *, loss_type: str, gamma: float = 1.0,
    sigma: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(weighted_ce, weight)`` in float64, differentiable through the CE only.

    loss_type: ``"mile"`` weight (sigma + H) ** gamma; ``"focal"`` weight (1 - p_t) ** gamma;
    ``"cross_entropy"`` weight 1. ``IGNORE_INDEX`` targets get weight 0 and CE 0.
    """
    z = logits.double()
    log_p = torch.log_softmax(z, dim=-1)
    ignored = target == IGNORE_INDEX
    safe_target = torch.where(ignored, torch.zeros_like(target), target).long()
    ce = -log_p.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        p = log_p.exp()
        entropy = -(p * log_p).sum(-1)
        if loss_type == "mile":
            weight = (sigma + entropy) ** gamma
        elif loss_type == "focal":
            weight = (1.0 - torch.exp(-ce)) ** gamma
        elif loss_type == "cross_entropy":
            weight = torch.ones_like(ce)
        else:
            raise ValueError(f"unknown loss_type {loss_type!r}")
        weight = torch.where(ignored, torch.zeros_like(weight), weight)
    ce = torch.where(ignored, torch.zeros_like(ce), ce)
    return weight * ce, weight


def paper_objective(
    weighted_ce: list[torch.Tensor], weight: list[torch.Tensor], loss_mask: list[torch.Tensor]
) -> torch.Tensor:
    """The official code's normalisation over a set of (data-parallel rank, micro-batch) shards.

    All lists are indexed ``[dp_rank][micro_batch]`` flattened to one list per micro-batch step:
    ``weighted_ce[k]`` is ``[dp, tokens]`` for micro-batch ``k``. Per micro-batch, each rank's
    ``alpha_r = 1 / mean(w over its unmasked tokens)``, alpha is the mean of alpha_r over ranks
    with tokens, the rank's loss is ``alpha * sum(w * CE * mask) / sum(mask)``; the objective
    is the mean over ranks and micro-batches (gradient accumulation and DP averaging).
    """
    total = 0.0
    count = 0
    for wce_dt, w_dt, mask_dt in zip(weighted_ce, weight, loss_mask):
        mask_dt = mask_dt.double()
        n_d = mask_dt.sum(-1)
        has_tokens = n_d > 0
        alpha_d = torch.where(has_tokens, n_d / (w_dt.double() * mask_dt).sum(-1).clamp_min(1e-300),
                              torch.zeros_like(n_d))
        alpha = alpha_d.sum() / has_tokens.sum().clamp_min(1)
        per_rank = alpha * (wce_dt.double() * mask_dt).sum(-1) / n_d.clamp_min(1)
        total = total + per_rank.sum()
        count += wce_dt.shape[0]
    return total / count


def global_objective(
    weighted_ce: torch.Tensor, weight: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Exact weighted mean over the whole global batch: sum(w * CE * mask) / sum(w * mask)."""
    mask = loss_mask.double()
    return (weighted_ce.double() * mask).sum() / (weight.double() * mask).sum()
