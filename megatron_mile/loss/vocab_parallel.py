"""Token-weighted cross-entropy over vocabulary-parallel logits: MiLe and focal loss.

Shape legend (tensor names carry their shapes):
    s: sequence length          b: micro-batch size          n = s * b tokens
    v: full vocabulary size     v/tp (written ``vp``): the columns held by one TP rank

Both losses are ``w_i * CE_i`` with a per-token weight ``w_i`` that is detached:

    MiLe  (arXiv 2310.19531):  w_i = (sigma + H_i) ** gamma,  H_i the softmax entropy over ALL of v
    focal (its baseline):      w_i = (1 - p_i[target]) ** gamma

With ``m = max_v z``, ``e_v = exp(z_v - m)``, ``S = sum_v e_v`` and ``T = sum_v e_v (z_v - m)``:

    CE = log S - (z_target - m)        H = log S - T / S        p_target = exp(-CE)

so the entropy needs no second pass over the vocabulary. Over a vocabulary sharded across TP
ranks, ``m`` is a MAX all-reduce and ``(S, T, z_target - m)`` are additive once every rank
uses the same global ``m``: one SUM all-reduce of a concatenated ``[3, n]`` buffer. That is
two collectives in forward (Megatron's unfused CE issues three) and none in backward, since
``dCE/dz = softmax - onehot`` is local to each shard once ``S`` is known.

Padded vocabulary: megatron pads the embedding/output rows to a multiple of the TP padding
unit; with ``valid_vocab_size`` the padding columns (global ids >= it, at the end of the last
shard) are sliced off each shard before any arithmetic, so they count nowhere (not in m, S, T
or the CE) and get zero gradient. Slicing, not masking with -inf: ``e (z - m)`` would be
``0 * -inf = NaN`` there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_mile.config import check_weight_params

__all__ = [
    "IGNORE_INDEX",
    "WeightedCrossEntropy",
    "vocab_parallel_weighted_cross_entropy",
    "vocab_parallel_mile_loss",
    "vocab_parallel_focal_loss",
]

IGNORE_INDEX = -100
"""Target id whose token counts nowhere: weighted CE 0, weight 0, zero gradient (HF convention).
Megatron pipelines normally keep every target in range and use a loss mask instead."""

# float64 is accepted (computed in float64) so the Function can be gradchecked.
_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Elements of the fp32 temporary used per chunk of rows while exponentiating. Small on CPU so
# the chunk stays in cache; large on GPU so the Python loop issues few kernels.
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 25}

# Header of the MAX all-reduce when validating: [error flag, shard size, -shard size].
_HEADER = 3


@dataclass(frozen=True)
class WeightedCrossEntropy:
    """Per-token results, each fp32 and of the target's shape: ``[s, b]`` from the loss
    functions, ``[b, s]`` (megatron's label layout) from ``MileGPTModel``. Only
    ``weighted_ce`` carries a gradient.

    A dataclass, not a NamedTuple, because the model returns it through megatron-core's
    ``Float16Module.forward`` (megatron/core/transformer/module.py), whose
    ``float16_to_fp32`` rebuilds every tuple as a plain ``tuple`` and would drop the names;
    any other object passes through it unchanged.
    """

    weighted_ce: torch.Tensor
    """``weight * ce``: differentiable w.r.t. the logits (through ce only)."""
    weight: torch.Tensor
    """The detached per-token weight (1 for unweighted CE, 0 for IGNORE_INDEX targets)."""
    ce: torch.Tensor
    """Plain cross-entropy ``-log p[target]``, detached (0 for IGNORE_INDEX targets)."""
    entropy: torch.Tensor
    """Softmax entropy over the full vocabulary, detached (NaN-free; computed for every token)."""

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> WeightedCrossEntropy:
        """The same statistics with ``fn`` applied to each (e.g. a transpose)."""
        return WeightedCrossEntropy(weighted_ce=fn(self.weighted_ce), weight=fn(self.weight),
                                    ce=fn(self.ce), entropy=fn(self.entropy))


def _local_tensor_error(logits: torch.Tensor, target: torch.Tensor) -> Optional[str]:
    """Host-side checks of this rank's tensors (no device sync); the verdict is shared
    through the MAX all-reduce."""
    if logits.dtype not in _LOGITS_DTYPES:
        return f"logits dtype {logits.dtype} is not one of fp32, bf16, fp16 (or fp64)"
    if logits.dim() < 2 or logits.shape[:-1] != target.shape:
        return (
            f"logits shape {tuple(logits.shape)} does not match target shape "
            f"{tuple(target.shape)}: expected logits [s, b, v/tp] and target [s, b]"
        )
    if target.dtype not in (torch.int64, torch.int32):
        return f"target dtype {target.dtype} must be int64 or int32 (vocabulary ids)"
    if target.device != logits.device:
        return f"target is on {target.device} but logits are on {logits.device}"
    return None


def _out_of_vocab(target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mask of target ids outside [0, vocab_size) other than IGNORE_INDEX (on the device)."""
    return ((target < 0) & (target != IGNORE_INDEX)) | (target >= vocab_size)


def _target_error(target: torch.Tensor, bad: torch.Tensor, vocab_size: int) -> str:
    first = target[bad].flatten()[0].item()
    return (
        f"target id {first} is outside the vocabulary [0, {vocab_size}) "
        f"({int(bad.sum())} such tokens); use loss_mask (or {IGNORE_INDEX}) for positions "
        "without a target, and check that the tokenizer's vocab_size matches the model's"
    )


def _valid_vocab_error(valid_vocab_size: Optional[int], vp: int, tp_size: int) -> Optional[str]:
    """The error for a ``valid_vocab_size`` outside the padded vocabulary ``vp x tp_size``."""
    if valid_vocab_size is None or 0 < valid_vocab_size <= vp * tp_size:
        return None
    return (f"valid_vocab_size={valid_vocab_size} must be in (0, {vp * tp_size}] "
            f"(the padded vocabulary, {tp_size} x {vp} columns)")


def _valid_columns(vp: int, tp_rank: int, valid_vocab_size: int) -> int:
    """How many of the ``vp`` columns of TP rank ``tp_rank`` are real vocabulary: all but the
    padding at the end of the last shard(s), which sits at global ids >= valid_vocab_size."""
    return min(vp, max(0, valid_vocab_size - tp_rank * vp))


class _TPGroup(NamedTuple):
    """The group the vocabulary is split over and this rank's place in it."""

    group: Optional[dist.ProcessGroup]
    rank: int
    size: int


def _tp_info(tp_group: Optional[dist.ProcessGroup]) -> _TPGroup:
    """``tp_group`` resolved; a single process without torch.distributed is TP=1."""
    if tp_group is None:
        if not dist.is_available() or not dist.is_initialized():
            return _TPGroup(None, 0, 1)
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise ValueError(
                "tp_group=None means megatron-core's tensor-parallel group, but "
                "parallel_state.initialize_model_parallel() has not been called: call it, "
                "or pass tp_group explicitly"
            )
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return _TPGroup(tp_group, dist.get_rank(tp_group), dist.get_world_size(tp_group))


def _max_all_reduce_with_verdict(
    rowmax_n: torch.Tensor,
    error: Optional[str],
    target_sb: torch.Tensor,
    bad_target_sb: Optional[torch.Tensor],
    vp: int,
    tp: _TPGroup,
    vocab_size: int,
) -> tuple[torch.Tensor, Optional[str]]:
    """Collective 1 when validating: MAX all-reduce of ``[3 + n]`` =
    ``[error flag, v/tp, -v/tp] + rowmax_n`` (skipped at TP=1). ``vocab_size``: the valid
    vocabulary the target ids must fall in.

    Returns the global row max ``[n]`` and the error every rank raises (None when the input is
    valid on all of them). Reading the header is the call's one host sync; the target ids are
    read again only on the error path, to name the offending one.
    """
    header = torch.tensor([float(error is not None), vp, -vp], dtype=rowmax_n.dtype,
                          device=rowmax_n.device)
    if bad_target_sb is not None:
        header[0] = torch.maximum(header[0], bad_target_sb.any().to(rowmax_n.dtype))
    max_buf = torch.cat([header, rowmax_n])
    if tp.size > 1:
        dist.all_reduce(max_buf, op=dist.ReduceOp.MAX, group=tp.group)
    any_error, vp_max, vp_min = max_buf[:_HEADER].tolist()
    if error is None and any_error:
        if bad_target_sb is not None and bool(bad_target_sb.any()):
            error = _target_error(target_sb, bad_target_sb, vocab_size)
        else:
            error = "another tensor-parallel rank reported invalid input (see its error)"
    if vp_max != -vp_min:  # the root cause of any vocabulary-range error too
        error = (
            f"vocabulary shard sizes differ across tensor-parallel ranks "
            f"(min {int(-vp_min)}, max {int(vp_max)}): every rank must hold v/tp "
            "columns; pad the vocabulary to a multiple of the TP size"
        )
    return max_buf[_HEADER:], error


class VocabParallelWeightedCE:
    """The steps of :class:`_VocabParallelWeightedCE`, one static method each, in the layout of
    megatron-core's ``VocabParallelCrossEntropy`` (megatron/core/tensor_parallel/
    cross_entropy.py). Rows are tokens: ``n = s * b`` rows of ``v/tp`` (``vp``) columns.

    forward:  :meth:`global_row_max` (collective 1), :meth:`local_sums` (none), the SUM
              all-reduce of their ``[3, n]`` result (collective 2, in the Function), then
              :meth:`token_statistics` (none).
    backward: :meth:`gradient` (none).
    """

    @staticmethod
    def global_row_max(
        logits_sbvp: torch.Tensor, target_sb: torch.Tensor, tp: _TPGroup, validate: bool,
        valid_vocab_size: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the input and all-reduce the row maxima: ``(exp_nvp, rowmax_n)``.

        With ``valid_vocab_size``, ``exp_nvp`` holds only this shard's valid columns
        ``[n, valid]`` (:func:`_valid_columns`; a strided view of the logits when they are
        fp32): padding columns are never read, so they count nowhere. A shard without valid
        columns contributes ``-inf`` to the max and nothing to the sums.

        ``exp_nvp`` ``[n, v/tp]`` is the one working buffer, still holding the logits: the
        caller's tensor when it already has the compute dtype (fp32 logits are overwritten
        later, as in megatron-core's CE), else one fp32 copy (bf16/fp16 logits); every later
        pass reads fp32, which is also faster than bf16 reductions on CPU. ``rowmax_n`` ``[n]``
        is the maximum over the full vocabulary.

        Collectives on ``tp.group`` (none at TP=1): one MAX all-reduce, of ``[3 + n]`` when
        validating (the verdict rides in its header, see :func:`_max_all_reduce_with_verdict`)
        or of ``[n]``. The tensor checks happen on every rank before it, so a bad input on
        one rank makes every rank raise instead of leaving the others blocked.
        """
        vp = logits_sbvp.shape[-1] if logits_sbvp.dim() > 0 else 0
        error = (_local_tensor_error(logits_sbvp, target_sb)
                 or _valid_vocab_error(valid_vocab_size, vp, tp.size))
        vocab = vp * tp.size if valid_vocab_size is None else valid_vocab_size
        n = target_sb.numel() if error is None else logits_sbvp.numel() // max(vp, 1)
        # The target-range verdict stays on the device until the header is read.
        bad_target_sb = (_out_of_vocab(target_sb, vocab)
                         if validate and error is None and n > 0 else None)
        # fp32 arithmetic for fp32/bf16/fp16 logits; fp64 only for fp64 (gradcheck).
        cdtype = torch.float64 if logits_sbvp.dtype == torch.float64 else torch.float32
        valid = _valid_columns(vp, tp.rank, vocab)
        exp_nvp = (logits_sbvp.reshape(n, vp)[:, :valid].to(cdtype) if error is None
                   else None)
        if exp_nvp is not None and valid > 0:
            rowmax_n = exp_nvp.amax(dim=-1)
        elif exp_nvp is not None and vp > 0:  # only padding here: no say in the max
            rowmax_n = torch.full((n,), -math.inf, dtype=cdtype, device=logits_sbvp.device)
        else:  # still joins the collective, so no rank is left waiting
            rowmax_n = torch.zeros(n, dtype=cdtype, device=logits_sbvp.device)
        if validate:
            rowmax_n, error = _max_all_reduce_with_verdict(rowmax_n, error, target_sb,
                                                           bad_target_sb, vp, tp, vocab)
        elif tp.size > 1:
            dist.all_reduce(rowmax_n, op=dist.ReduceOp.MAX, group=tp.group)
        if error is not None:
            raise ValueError(error)
        if vp == 0:
            raise ValueError("logits have an empty vocabulary dimension")
        assert exp_nvp is not None  # set whenever error is None
        return exp_nvp, rowmax_n

    @staticmethod
    def local_sums(
        exp_nvp: torch.Tensor, rowmax_n: torch.Tensor, target_n: torch.Tensor, vocab_start: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This shard's additive terms relative to the global max m; no collective.

        Overwrites ``exp_nvp`` with ``e = exp(z - m)``. Returns ``(sums_3n, local_t_n,
        owned_n)``: ``sums_3n`` ``[3, n]`` = (sum_v e, sum_v e (z - m), z_target - m), the last
        0 where another rank holds the target; ``local_t_n`` ``[n]`` the target's column in
        this shard (0 where not owned) and ``owned_n`` ``[n]`` whether this shard holds it.
        """
        n, vp = exp_nvp.shape
        local_t_n = target_n - vocab_start
        owned_n = (local_t_n >= 0) & (local_t_n < vp)
        local_t_n = torch.where(owned_n, local_t_n, torch.zeros_like(local_t_n))
        if vp == 0:  # a shard of padding only: nothing to add (and no column to gather)
            return (torch.zeros(3, n, dtype=exp_nvp.dtype, device=exp_nvp.device), local_t_n,
                    owned_n)
        sums_3n = torch.empty(3, n, dtype=exp_nvp.dtype, device=exp_nvp.device)
        sum_exp_n, sum_exp_z_n = sums_3n[0], sums_3n[1]
        # Gather the target logit before the buffer is overwritten with exponentials.
        z_target_n = exp_nvp.gather(1, local_t_n.unsqueeze(1)).squeeze(1) - rowmax_n
        sums_3n[2] = torch.where(owned_n, z_target_n, torch.zeros_like(z_target_n))
        rows = max(1, _CHUNK_ELEMENTS["cuda" if exp_nvp.device.type == "cuda" else "cpu"] // vp)
        # Row chunks small enough that the buffer slice and the temporary stay in cache: the
        # buffer is read and written once from memory, where an unchunked sub/exp/sum/mul
        # sequence would stream it four times.
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            e_cvp = exp_nvp[r0:r1]
            z_cvp = torch.sub(e_cvp, rowmax_n[r0:r1, None])  # temporary [c, v/tp]
            torch.exp(z_cvp, out=e_cvp)  # e overwrites the logits it came from
            torch.sum(e_cvp, dim=-1, out=sum_exp_n[r0:r1])
            # sum_v e_v * z_v, multiplied into the temporary (no further [c, v/tp] tensor; a
            # batched-GEMV bmm measured 6x slower on CPU). Computed for every weighting: the
            # trainer reports the entropy.
            torch.sum(z_cvp.mul_(e_cvp), dim=-1, out=sum_exp_z_n[r0:r1])
        return sums_3n, local_t_n, owned_n

    @staticmethod
    def token_statistics(
        sums_3n: torch.Tensor, ignored_n: torch.Tensor, weighting: str, gamma: float,
        sigma: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weighted_ce_n, weight_n, ce_n, entropy_n)`` from the globally summed ``sums_3n``
        ``[3, n]`` (every rank computes the same values); no collective.

        ``CE = log S - (z_target - m)`` and ``H = log S - T / S``; the weight is detached by
        construction (the Function's backward treats it as a constant). Tokens with
        ``ignored_n`` get CE 0 and weight 0.
        """
        sum_exp_n, sum_exp_z_n, z_target_n = sums_3n.unbind(0)
        log_sum_exp_n = torch.log(sum_exp_n)
        ce_n = log_sum_exp_n - z_target_n
        # H >= 0 mathematically; rounding can leave -1e-7, which a negative base would turn
        # into NaN under a fractional gamma.
        entropy_n = (log_sum_exp_n - sum_exp_z_n / sum_exp_n).clamp_min(0.0)
        if weighting == "mile":
            weight_n = (sigma + entropy_n).pow(gamma)
        elif weighting == "focal":
            weight_n = (-torch.expm1(-ce_n)).clamp_min(0.0).pow(gamma)  # (1 - p_target)**gamma
        else:
            weight_n = torch.ones_like(ce_n)
        zero = torch.zeros_like(ce_n)
        ce_n = torch.where(ignored_n, zero, ce_n)
        weight_n = torch.where(ignored_n, zero, weight_n)
        return weight_n * ce_n, weight_n, ce_n, entropy_n

    @staticmethod
    def gradient(
        exp_nvp: torch.Tensor, sum_exp_n: torch.Tensor, weight_n: torch.Tensor,
        local_t_n: torch.Tensor, counted_n: torch.Tensor, grad_wce_n: torch.Tensor,
    ) -> torch.Tensor:
        """``d(w * CE)/dz = grad * w * (softmax - onehot)`` for this shard, w detached; no
        collective (``S`` is already global). Turned out of ``exp_nvp`` in place, which it
        returns. ``counted_n``: this shard holds the target and it is not IGNORE_INDEX."""
        grad_n = grad_wce_n.to(weight_n.dtype) * weight_n
        if exp_nvp.shape[1] == 0:  # a shard of padding only
            return exp_nvp
        exp_nvp.mul_((grad_n / sum_exp_n).unsqueeze(1))  # softmax * grad
        rows_n = torch.arange(exp_nvp.shape[0], device=exp_nvp.device)
        exp_nvp[rows_n, local_t_n] -= torch.where(counted_n, grad_n, torch.zeros_like(grad_n))
        return exp_nvp


class _VocabParallelWeightedCE(torch.autograd.Function):
    """forward -> (weighted_ce_sb, weight_sb, ce_sb, entropy_sb); backward is local to each shard.

    Collectives on ``tp_group`` (none when its size is 1):
      forward  1. all-reduce MAX of ``[header(3) +] rowmax_n``   (header only if validating)
               2. all-reduce SUM of ``[3, n]`` = (sum exp, sum exp * (z - m), z_target - m)
      backward none.
    Memory: one fp32 ``[n, v/tp]`` buffer holding exp(z - m), turned into the gradient in
    place. For fp32 logits that buffer IS the caller's logits tensor (overwritten, as
    megatron-core's CE does); for bf16/fp16 it is a new fp32 tensor.
    """

    @staticmethod
    def forward(ctx, logits_sbvp, target_sb, weighting, gamma, sigma, tp_group, validate,
                valid_vocab_size):
        steps = VocabParallelWeightedCE
        tp = _tp_info(tp_group)
        exp_nvp, rowmax_n = steps.global_row_max(logits_sbvp, target_sb, tp, validate,
                                                 valid_vocab_size)
        vp = logits_sbvp.shape[-1]  # exp_nvp may hold fewer: this shard's valid columns
        target_n = target_sb.reshape(-1).long()
        sums_3n, local_t_n, owned_n = steps.local_sums(exp_nvp, rowmax_n, target_n,
                                                       tp.rank * vp)
        if tp.size > 1:
            # Collective 2: (S, T, z_target - m) are additive now that every rank uses the
            # same global m.
            dist.all_reduce(sums_3n, op=dist.ReduceOp.SUM, group=tp.group)
        ignored_n = target_n == IGNORE_INDEX
        weighted_ce_n, weight_n, ce_n, entropy_n = steps.token_statistics(
            sums_3n, ignored_n, weighting, gamma, sigma)

        # Save the caller's tensor itself, not a view of it: autograd forbids saving a view
        # made here of a tensor that is later modified in place.
        aliases_input = exp_nvp.data_ptr() == logits_sbvp.data_ptr() and logits_sbvp.is_contiguous()
        saved_exp = logits_sbvp if aliases_input else exp_nvp
        ctx.save_for_backward(saved_exp, sums_3n[0], weight_n, local_t_n, owned_n & ~ignored_n)
        ctx.logits_shape = logits_sbvp.shape
        ctx.valid_columns = exp_nvp.shape[1]
        shape = target_sb.shape
        outputs = tuple(t.view(shape) for t in (weighted_ce_n, weight_n, ce_n, entropy_n))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_wce_sb, *_grads_of_detached_outputs):
        exp_saved, sum_exp_n, weight_n, local_t_n, counted_n = ctx.saved_tensors
        vp, valid = ctx.logits_shape[-1], ctx.valid_columns
        n = grad_wce_sb.numel()
        buffer_nv = exp_saved.view(n, exp_saved.shape[-1])  # [n, v/tp] or [n, valid]
        VocabParallelWeightedCE.gradient(
            buffer_nv[:, :valid], sum_exp_n, weight_n, local_t_n, counted_n,
            grad_wce_sb.reshape(-1))
        if valid < vp:  # padding columns get zero gradient
            if buffer_nv.shape[1] == vp:  # the caller's logits: zero their padding in place
                buffer_nv[:, valid:] = 0
            else:  # a compact [n, valid] buffer (bf16/fp16 logits)
                buffer_nv = torch.nn.functional.pad(buffer_nv, (0, vp - valid))
        return buffer_nv.view(ctx.logits_shape), None, None, None, None, None, None, None


def vocab_parallel_weighted_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weighting: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    validate: bool = True,
    valid_vocab_size: Optional[int] = None,
) -> WeightedCrossEntropy:
    """Weighted CE with every per-token statistic; see :func:`vocab_parallel_mile_loss`.

    Args:
        weighting: ``"mile"``, ``"focal"`` or ``"none"`` (plain CE with weight 1).
        validate: check target ids, shapes and shard sizes collectively (the check rides on
            the MAX all-reduce; on GPU it costs one host sync per call). Set False only
            for benchmarking trusted inputs.
        valid_vocab_size: the real (unpadded) vocabulary size; columns at global index
            >= valid_vocab_size (padding, at the end of the last TP shard) count nowhere: not
            in the softmax, CE or entropy, and get zero gradient. Targets >= it are an error
            (validated like any out-of-vocabulary id). None: every column is real.

    Returns:
        The four ``[s, b]`` fp32 statistics of :class:`WeightedCrossEntropy`.
    """
    check_weight_params(weighting, float(gamma), float(sigma))
    weighted_ce, weight, ce, entropy = _VocabParallelWeightedCE.apply(
        vocab_parallel_logits, target, weighting, float(gamma), float(sigma), tp_group, validate,
        None if valid_vocab_size is None else int(valid_vocab_size),
    )
    return WeightedCrossEntropy(weighted_ce=weighted_ce, weight=weight, ce=ce, entropy=entropy)


def vocab_parallel_mile_loss(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 1.0,
    sigma: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    valid_vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MiLe loss per token over vocabulary-parallel logits.

    Args:
        vocab_parallel_logits: ``[s, b, v/tp]`` fp32, bf16 or fp16; this rank's vocabulary
            columns ``[rank * v/tp, (rank + 1) * v/tp)``. fp32 logits are OVERWRITTEN
            (the buffer becomes exp(z - max), then the gradient), as in megatron-core's CE:
            pass a clone if you still need them.
        target: ``[s, b]`` global vocabulary ids; ``IGNORE_INDEX`` (-100) marks a token that
            counts nowhere.
        gamma: exponent of the weight, >= 0; ``gamma=0`` is plain cross-entropy.
        sigma: offset added to the entropy before the power.
        tp_group: the tensor-parallel group the vocabulary is split over; ``None`` means
            megatron-core's tensor-parallel group (or a single process when
            torch.distributed is not initialised).
        valid_vocab_size: the real (unpadded) vocabulary size; the padding columns behind it
            count nowhere (see :func:`vocab_parallel_weighted_cross_entropy`).

    Returns:
        ``(weighted_ce, weight)``, both ``[s, b]`` fp32: ``weight = (sigma + H) ** gamma`` with
        H the entropy of the softmax over the FULL vocabulary, detached, and
        ``weighted_ce = weight * CE``. The gradient w.r.t. the logits is
        ``grad_out * weight * (softmax - onehot)``, computed in fp32 and returned in the
        logits' dtype.

    Collectives on ``tp_group``: forward one MAX all-reduce of ``[3 + n]`` and one SUM
    all-reduce of ``[3, n]`` fp32 (n = s * b); backward none.

    Raises:
        ValueError: gamma < 0, sigma < 0 with a fractional gamma, target ids outside the
            vocabulary, shape or dtype mismatches, or shard sizes that differ across TP ranks.
            Tensor checks are agreed through the MAX all-reduce, so every TP rank raises
            together and none is left blocked. Non-finite logits give a NaN loss, never a
            finite one.
    """
    out = vocab_parallel_weighted_cross_entropy(
        vocab_parallel_logits, target, weighting="mile", gamma=gamma, sigma=sigma,
        tp_group=tp_group, valid_vocab_size=valid_vocab_size,
    )
    return out.weighted_ce, out.weight


def vocab_parallel_focal_loss(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    valid_vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal loss per token (the paper's baseline): ``weight = (1 - p_target) ** gamma``.

    Same interface, collectives, memory use and errors as :func:`vocab_parallel_mile_loss`.
    """
    out = vocab_parallel_weighted_cross_entropy(
        vocab_parallel_logits, target, weighting="focal", gamma=gamma, tp_group=tp_group,
        valid_vocab_size=valid_vocab_size,
    )
    return out.weighted_ce, out.weight
