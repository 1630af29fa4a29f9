"""From per-token ``(weighted_ce, weight, loss_mask)`` to the scalar a micro-batch contributes.

Megatron's pipeline schedules call ``loss_func`` once per micro-batch on the last pipeline
stage, and take ``(loss_sum, num_tokens, report)``:

- ``"paper"`` (default, the official code's semantics, arXiv 2310.19531): on each rank
  ``alpha_r = 1 / mean(weight over this micro-batch's unmasked tokens)``; alpha is the mean
  of ``alpha_r`` over the data-parallel (x context-parallel) ranks that have tokens; the
  micro-batch loss is ``alpha * sum(weighted_ce * mask) / sum(mask)``. The schedule divides
  ``loss_sum`` by ``num_tokens`` and by the number of micro-batches, and DDP averages over
  DP: the objective is the mean over micro-steps and ranks, as with HF gradient accumulation
  + DeepSpeed. One deliberate difference from the official code: masked tokens count nowhere
  (the official code averages over all positions, ignored ones included).
- ``"global"``: the exact weighted mean ``sum(w * CE * mask) / sum(w * mask)`` over the global
  batch. ``loss_sum = sum(weighted_ce * mask)``; the trainer runs with
  ``calculate_per_token_loss=True`` and divides the gradients by the weight total summed over
  micro-batches and all-reduced over DP x CP (see ``megatron_mile.training``).

alpha is never reduced over tensor-parallel ranks: after the loss's all-reduces every TP
rank holds the same entropy, hence the same weights and alpha.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_mile.config import NORMALIZATIONS

__all__ = ["NORMALIZATIONS", "LossNormalizer", "ReducedLoss", "reduce_paper", "reduce_global",
           "reduce_token_losses"]



class ReducedLoss(NamedTuple):
    """One micro-batch's contribution; scalars."""

    loss_sum: torch.Tensor
    """Differentiable numerator handed to the schedule."""
    num_tokens: torch.Tensor
    """Unmasked tokens, int: the schedule divides ``loss_sum`` by it unless per-token mode."""
    weight_sum: torch.Tensor
    """sum(weight * mask), detached fp32: the ``"global"`` mode's denominator term."""
    alpha: torch.Tensor
    """The detached normaliser applied (1 in ``"global"`` mode, which has none)."""


def _masked_sums(weighted_ce: torch.Tensor, weight: torch.Tensor, loss_mask: torch.Tensor):
    if loss_mask.shape != weighted_ce.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} does not match the per-token loss shape "
            f"{tuple(weighted_ce.shape)}"
        )
    mask = loss_mask.to(torch.float32)
    return (weighted_ce * mask).sum(), (weight * mask).sum(), mask.sum()


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def reduce_paper(
    weighted_ce: torch.Tensor,
    weight: torch.Tensor,
    loss_mask: torch.Tensor,
    dp_cp_group: Optional[dist.ProcessGroup],
    cp_group: Optional[dist.ProcessGroup] = None,
) -> ReducedLoss:
    """``"paper"`` normalisation of one micro-batch: ``[b, s/cp]`` per-token inputs.

    With context parallelism (``cp_group`` of size cp > 1) each rank holds ``s/cp`` tokens
    of the micro-batch; alpha_r and the token mean are the whole micro-batch's, as at CP=1:
    the CP ranks first sum (weight, tokens), then ``num_tokens`` is the micro-batch's count
    and ``loss_sum = cp * alpha * sum(local weighted_ce * mask)``. megatron's schedule divides
    by ``num_tokens`` and DDP averages the gradients over DP x CP, so each DP rank's gradient
    is that of ``alpha * sum(weighted_ce * mask) / sum(mask)`` over its whole micro-batch.

    Collectives: with cp > 1, one SUM all-reduce of 2 fp32 values (weight sum, tokens) on
    ``cp_group``; then one SUM all-reduce of 2 fp32 values (alpha_r, has_tokens) on
    ``dp_cp_group`` (skipped when it is None or of size 1; the CP ranks of one micro-batch
    bring the same alpha_r, so the mean over DP x CP is the mean over DP).
    An all-masked micro-batch gives loss 0 and alpha 0 on that rank, never a NaN.
    """
    wce_sum, w_sum, n = _masked_sums(weighted_ce, weight, loss_mask)
    cp = _group_size(cp_group)
    w_seq, n_seq = w_sum.detach(), n
    if cp > 1:
        sums = torch.stack([w_seq, n_seq])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=cp_group)
        w_seq, n_seq = sums[0], sums[1]
    has_tokens = (w_seq > 0).to(torch.float32)
    alpha_r = torch.where(w_seq > 0, n_seq / w_seq.clamp_min(torch.finfo(torch.float32).tiny),
                          torch.zeros_like(w_seq))
    buf = torch.stack([alpha_r.detach(), has_tokens])
    if _group_size(dp_cp_group) > 1:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=dp_cp_group)
    alpha = buf[0] / buf[1].clamp_min(1.0)
    loss_sum = alpha * wce_sum * cp if cp > 1 else alpha * wce_sum
    return ReducedLoss(loss_sum, n_seq.round().to(torch.int), w_sum.detach(), alpha)


def reduce_global(
    weighted_ce: torch.Tensor, weight: torch.Tensor, loss_mask: torch.Tensor
) -> ReducedLoss:
    """``"global"`` normalisation: no collective here; the denominator is reduced by the trainer."""
    wce_sum, w_sum, n = _masked_sums(weighted_ce, weight, loss_mask)
    return ReducedLoss(wce_sum, n.round().to(torch.int), w_sum.detach(), torch.ones_like(w_sum))


def reduce_token_losses(
    normalization: str,
    weighted_ce: torch.Tensor,
    weight: torch.Tensor,
    loss_mask: torch.Tensor,
    dp_cp_group: Optional[dist.ProcessGroup],
    cp_group: Optional[dist.ProcessGroup] = None,
) -> ReducedLoss:
    """Dispatch on ``normalization`` (``"paper"`` or ``"global"``; the latter needs no
    ``cp_group``: its sums are exact over any split of the tokens)."""
    if normalization == "paper":
        return reduce_paper(weighted_ce, weight, loss_mask, dp_cp_group, cp_group)
    if normalization == "global":
        return reduce_global(weighted_ce, weight, loss_mask)
    raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")


class LossNormalizer:
    """MiLe's normalisation of one optimizer step, both modes, in one place.

    megatron's schedule hands each micro-batch's ``(loss_sum, num_tokens)`` to
    ``finalize_model_grads``, which (with ``calculate_per_token_loss``) divides the gradients by
    the token count summed over micro-batches and all-reduced over DP x CP. ``"paper"`` mode
    uses megatron as it is (per-micro-batch means, DDP averaging); ``"global"`` mode replaces
    the token count by the summed MiLe weights, so the objective is the exact weighted mean.

        normalizer = LossNormalizer(cfg.loss.normalization, dp_cp_group, cp_group)
        TransformerConfig(..., calculate_per_token_loss=normalizer.per_token_loss)
        normalizer.start_step(device)                           # before the schedule runs
        reduced = normalizer.micro_batch(wce_bs, weight_bs, loss_mask_bs)   # in loss_func
        num_tokens = normalizer.grad_denominator(num_tokens)    # in finalize_model_grads
        normalizer.end_step()

    Collectives: ``micro_batch`` in ``"paper"`` mode, one SUM all-reduce of 2 values on
    ``dp_cp_group``, and with CP > 1 one before it on ``cp_group`` (see
    :func:`reduce_paper`); none otherwise. The weight total that
    ``grad_denominator`` returns is all-reduced by megatron's ``finalize_model_grads``.
    """

    def __init__(self, mode: str, dp_cp_group: Optional[dist.ProcessGroup],
                 cp_group: Optional[dist.ProcessGroup] = None) -> None:
        """``cp_group``: the context-parallel group (None or size 1: no CP)."""
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization={mode!r} is not one of {NORMALIZATIONS}")
        self.mode = mode
        self.dp_cp_group = dp_cp_group
        self.cp_group = cp_group
        self._weight_total: Optional[torch.Tensor] = None

    @staticmethod
    def uses_per_token_loss(mode: str) -> bool:
        """megatron's ``calculate_per_token_loss`` for ``mode``: True for ``"global"``."""
        return mode == "global"

    @property
    def per_token_loss(self) -> bool:
        """megatron's ``calculate_per_token_loss`` for this mode."""
        return self.uses_per_token_loss(self.mode)

    def start_step(self, device: torch.device) -> None:
        """Reset the step's weight total (``"global"`` mode)."""
        if self.mode == "global":
            self._weight_total = torch.zeros((), dtype=torch.float32, device=device)

    def micro_batch(self, weighted_ce: torch.Tensor, weight: torch.Tensor,
                    loss_mask: torch.Tensor) -> ReducedLoss:
        """One micro-batch's ``ReducedLoss``; in ``"global"`` mode adds its weights to the total.
        ``weight`` is used detached (MiLe's weights are constants of the gradient)."""
        reduced = reduce_token_losses(self.mode, weighted_ce, weight.detach(), loss_mask,
                                      self.dp_cp_group, self.cp_group)
        if self._weight_total is not None:
            self._weight_total += reduced.weight_sum
        return reduced

    def reported_objective(self, reduced: ReducedLoss) -> torch.Tensor:
        """``[numerator, denominator]`` of the logged objective, summed over micro-batches and
        DP x CP ranks: the mean of per-micro-batch means (paper; with CP each of a micro-batch's
        cp ranks brings ``[cp x its share of the mean, 1]``, see :func:`reduce_paper`), the
        weighted mean (global)."""
        if self.mode == "paper":
            n = reduced.num_tokens.to(torch.float32)
            return torch.stack([reduced.loss_sum.detach() / n.clamp_min(1), (n > 0).float()])
        return torch.stack([reduced.loss_sum.detach(), reduced.weight_sum])

    def grad_denominator(self, num_tokens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """What ``finalize_model_grads`` divides the gradients by: this rank's weight total in
        ``"global"`` mode (megatron all-reduces it), megatron's own ``num_tokens`` otherwise."""
        return self._weight_total if self._weight_total is not None else num_tokens

    def end_step(self) -> None:
        self._weight_total = None
