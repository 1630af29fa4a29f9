"""Single-process tests of the loss: reference, gradcheck, dtypes, bad input, normalisation.

Tolerances: fp32 results within 1e-5 relative of the float64 reference (fp32 has 2^-24
~ 6e-8 per operation; a few dozen operations and a sum over v stay well inside 1e-5).
"""

import dataclasses
import math

import pytest
import torch

from megatron_mile.loss import (
    IGNORE_INDEX,
    LossConfig,
    reduce_global,
    reduce_paper,
    vocab_parallel_focal_loss,
    vocab_parallel_mile_loss,
    vocab_parallel_weighted_cross_entropy,
)
from megatron_mile.loss import reference

S, B, V = 7, 3, 61


def _inputs(seed=0, dtype=torch.float64, scale=3.0, s=S, b=B, v=V):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(s, b, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, v, (s, b), generator=g)
    return logits, target


def _assert_close_rel(actual, expected, rtol, what):
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max error {err:.3g} relative to max |ref|, allowed {rtol:g}"


def _fn(loss_type):
    return vocab_parallel_mile_loss if loss_type == "mile" else vocab_parallel_focal_loss


def _kwargs(loss_type, gamma, sigma):
    return {"gamma": gamma, "sigma": sigma} if loss_type == "mile" else {"gamma": gamma}


# ---------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("loss_type", ["mile", "focal", "cross_entropy"])
def test_reference_gradient_is_the_closed_form(loss_type):
    """Autograd of the reference equals alpha/N * w * (softmax - onehot): the MiLe gradient
    with the weight w and alpha detached (arXiv 2310.19531)."""
    logits, target = _inputs(1)
    x = logits.clone().requires_grad_()
    wce, w = reference.token_losses(x, target, loss_type=loss_type, gamma=1.5, sigma=1.0)
    alpha = 1.0 / w.mean()
    loss = alpha * wce.mean()
    loss.backward()
    p = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(target, V).double()
    closed = (alpha / target.numel()) * w.unsqueeze(-1) * (p - onehot)
    torch.testing.assert_close(x.grad, closed, rtol=1e-12, atol=1e-14)
    assert not w.requires_grad, "the weight must be detached"


def test_reference_entropy_and_weights_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)  # uniform over 4
    target = torch.tensor([[2]])
    wce, w = reference.token_losses(logits, target, loss_type="mile", gamma=2.0, sigma=1.0)
    assert w.item() == pytest.approx((1 + math.log(4)) ** 2)
    assert wce.item() == pytest.approx((1 + math.log(4)) ** 2 * math.log(4))
    _, wf = reference.token_losses(logits, target, loss_type="focal", gamma=2.0)
    assert wf.item() == pytest.approx(0.75 ** 2)


# ---------------------------------------------------------------- the fused Function, TP=1

@pytest.mark.parametrize("loss_type", ["mile", "focal"])
@pytest.mark.parametrize("gamma,sigma", [(0.0, 1.0), (0.5, 0.0), (1.0, 1.0), (2.0, 0.0)])
def test_matches_reference_fp32(loss_type, gamma, sigma):
    logits, target = _inputs(2)
    target[0, 0] = IGNORE_INDEX
    grad_out = torch.randn(S, B, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_ref = logits.clone().requires_grad_()
    wce_ref, w_ref = reference.token_losses(x_ref, target, loss_type=loss_type, gamma=gamma,
                                            sigma=sigma)
    (wce_ref * grad_out).sum().backward()

    leaf = logits.float().requires_grad_()
    wce, w = _fn(loss_type)(leaf.clone(), target, **_kwargs(loss_type, gamma, sigma))
    assert wce.dtype == w.dtype == torch.float32 and wce.shape == (S, B)
    assert not w.requires_grad
    (wce * grad_out.float()).sum().backward()
    _assert_close_rel(wce, wce_ref, 1e-5, "weighted_ce")
    _assert_close_rel(w, w_ref, 1e-5, "weight")
    _assert_close_rel(leaf.grad, x_ref.grad, 1e-5, "logits gradient")
    assert wce[0, 0] == 0 and w[0, 0] == 0 and leaf.grad[0, 0].abs().max() == 0



def test_statistics_keep_their_names_through_megatrons_float16_wrapper():
    """MileGPTModel returns the statistics through megatron-core's Float16Module, whose output
    conversion rebuilds any tuple as a plain tuple: the structure must pass it unchanged, and
    ``map`` (the model's [s, b] -> [b, s] transpose) must keep every field in its place."""
    from megatron.core.transformer.module import float16_to_fp32

    logits, target = _inputs(13)
    target[0, 0] = IGNORE_INDEX
    out_sb = vocab_parallel_weighted_cross_entropy(logits.float().requires_grad_().clone(), target)
    assert float16_to_fp32(out_sb) is out_sb
    out_bs = out_sb.map(lambda t_sb: t_sb.transpose(0, 1))
    for field in dataclasses.fields(out_sb):
        assert torch.equal(getattr(out_bs, field.name), getattr(out_sb, field.name).t())
    assert out_bs.weighted_ce.requires_grad and not out_bs.weight.requires_grad

class _FreshForwardPerBackward(torch.autograd.Function):
    """gradcheck calls backward many times on one graph, but the Function's backward consumes
    its saved buffer (once per forward, as megatron-core's CE). This wrapper re-runs the
    forward of the Function under test for each backward, so the gradient gradcheck sees is
    still computed by that Function's own backward."""

    @staticmethod
    def forward(ctx, x, target, weighting, weight0, valid_vocab_size=None):
        ctx.save_for_backward(x)
        ctx.args = (target, weighting, weight0, valid_vocab_size)
        return _fixed_weight_ce(x.detach(), target, weighting, weight0, valid_vocab_size)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            out = _fixed_weight_ce(leaf, *ctx.args)
            (grad,) = torch.autograd.grad(out, leaf, grad_out)
        return grad, None, None, None, None


def _fixed_weight_ce(x, target, weighting, weight0, valid_vocab_size=None):
    """``weight0 * CE(x)``: the weight is detached by definition, so finite differences must
    hold it at its value at the checked point. Computed as ``weighted_ce(x) * (w0 / w(x))``
    with the factor detached, which routes the gradient through the Function's backward."""
    out = vocab_parallel_weighted_cross_entropy(x.clone(), target, weighting=weighting,
                                                gamma=1.5, sigma=0.5,
                                                valid_vocab_size=valid_vocab_size)
    factor = torch.where(out.weight > 0, weight0 / out.weight, torch.zeros_like(weight0))
    return out.weighted_ce * factor.detach()


@pytest.mark.parametrize("weighting", ["mile", "focal"])
def test_gradcheck_float64(weighting):
    logits, target = _inputs(4, s=3, b=2, v=11)
    target[1, 1] = IGNORE_INDEX
    weight0 = vocab_parallel_weighted_cross_entropy(
        logits.clone(), target, weighting=weighting, gamma=1.5, sigma=0.5).weight
    assert weight0.dtype == torch.float64 and (weight0[target != IGNORE_INDEX] > 0).all()
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda inp: _FreshForwardPerBackward.apply(inp, target, weighting, weight0), (x,),
        eps=1e-6, atol=1e-8, rtol=1e-6,
    )


def test_second_backward_is_an_error_not_a_wrong_gradient():
    logits, target = _inputs(4)
    x = logits.float().requires_grad_()
    wce, _ = vocab_parallel_mile_loss(x.clone(), target)
    wce.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        wce.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["mile", "focal"])
def test_half_precision_logits(dtype, loss_type):
    """Loss computed in fp32 on the rounded logits: exact to fp32 against the reference
    evaluated on the same rounded values. The gradient is returned in the logits' dtype, so
    it carries that dtype's rounding: 2^-8 relative for bf16, 2^-11 for fp16."""
    logits, target = _inputs(5)
    rounded = logits.to(dtype)
    x_ref = rounded.double().requires_grad_()
    wce_ref, w_ref = reference.token_losses(x_ref, target, loss_type=loss_type, gamma=1.0)
    wce_ref.sum().backward()
    leaf = rounded.clone().requires_grad_()
    wce, w = _fn(loss_type)(leaf, target, **_kwargs(loss_type, 1.0, 1.0))
    wce.sum().backward()
    assert wce.dtype == torch.float32 and leaf.grad.dtype == dtype
    _assert_close_rel(wce, wce_ref, 1e-5, "weighted_ce")
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    _assert_close_rel(leaf.grad, x_ref.grad, eps, "logits gradient")
    assert torch.equal(leaf, rounded), "bf16/fp16 logits must not be modified"


def test_fp32_logits_are_consumed_in_place_as_documented():
    logits, target = _inputs(6)
    x = logits.float()
    before = x.clone()
    vocab_parallel_mile_loss(x, target)
    assert not torch.equal(x, before)


def test_extreme_logits_stay_finite():
    logits, target = _inputs(7)
    logits[0, 0] = -1e4
    logits[0, 0, 5] = 1e4  # a one-hot softmax: entropy 0, CE either 0 or 2e4
    target[0, 0] = 5
    logits[1, 1] = 0.0  # uniform
    wce, w = vocab_parallel_mile_loss(logits.float(), target, gamma=1.0, sigma=0.0)
    assert torch.isfinite(wce).all() and torch.isfinite(w).all()
    assert w[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert w[1, 1].item() == pytest.approx(math.log(V), rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_give_nan_not_a_finite_loss(bad):
    logits, target = _inputs(8)
    logits[2, 1, 3] = bad
    wce, _ = vocab_parallel_mile_loss(logits.float(), target)
    assert torch.isnan(wce[2, 1]), "a non-finite logit must surface as NaN"


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": -0.5}, r"gamma=-0.5 must be a finite number >= 0"),
    ({"gamma": float("nan")}, r"gamma=nan"),
    ({"sigma": -1.0, "gamma": 0.5}, r"sigma=-1.0 < 0 needs an integer gamma \(got 0.5\)"),
    ({"sigma": float("inf")}, r"sigma=inf must be finite"),
])
def test_bad_parameters(kwargs, match):
    logits, target = _inputs(9)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_mile_loss(logits.float(), target, **kwargs)


def test_negative_sigma_with_integer_gamma_is_allowed():
    logits, target = _inputs(9)
    wce, w = vocab_parallel_mile_loss(logits.float(), target, gamma=2.0, sigma=-0.5)
    assert torch.isfinite(wce).all()


@pytest.mark.parametrize("bad_id,match", [(V, rf"target id {V} is outside the vocabulary \[0, {V}\)"),
                                          (-1, r"target id -1 is outside the vocabulary")])
def test_target_outside_vocabulary(bad_id, match):
    logits, target = _inputs(10)
    target[3, 2] = bad_id
    with pytest.raises(ValueError, match=match):
        vocab_parallel_mile_loss(logits.float(), target)


@pytest.mark.parametrize("make,match", [
    (lambda l, t: (l, t[:-1]), r"logits shape \(7, 3, 61\) does not match target shape \(6, 3\)"),
    (lambda l, t: (l.long(), t), r"logits dtype torch.int64 is not one of"),
    (lambda l, t: (l, t.float()), r"target dtype torch.float32 must be int64 or int32"),
    (lambda l, t: (l[0, 0], t[0, 0]), r"expected logits \[s, b, v/tp\]"),
])
def test_shape_and_dtype_mismatches(make, match):
    logits, target = _inputs(11)
    x, t = make(logits.float(), target)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_mile_loss(x, t)


# ---------------------------------------------------------------- normalisation (DP=1)

def test_paper_normalisation_single_rank():
    logits, target = _inputs(12)
    mask = torch.ones(S, B)
    mask[0] = 0
    wce, w = reference.token_losses(logits, target, loss_type="mile")
    red = reduce_paper(wce.float(), w.float(), mask, dp_cp_group=None)
    expected = reference.paper_objective([wce.reshape(1, -1)], [w.reshape(1, -1)],
                                         [mask.reshape(1, -1)])
    assert red.num_tokens.item() == (S - 1) * B
    got = red.loss_sum / red.num_tokens
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # alpha = 1 / mean of the weight over unmasked tokens only
    assert red.alpha.item() == pytest.approx(1.0 / w[1:].mean().item(), rel=1e-6)


def test_global_normalisation_single_rank():
    logits, target = _inputs(13)
    mask = (torch.rand(S, B, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    wce, w = reference.token_losses(logits, target, loss_type="focal")
    red = reduce_global(wce.float(), w.float(), mask)
    got = red.loss_sum / red.weight_sum
    assert got.item() == pytest.approx(reference.global_objective(wce, w, mask).item(), rel=1e-6)


@pytest.mark.parametrize("reduce", ["paper", "global"])
def test_all_masked_micro_batch_gives_zero_not_nan(reduce):
    logits, target = _inputs(14)
    x = logits.float().requires_grad_()
    wce, w = vocab_parallel_mile_loss(x.clone(), target)
    mask = torch.zeros(S, B)
    red = (reduce_paper(wce, w, mask, None) if reduce == "paper" else reduce_global(wce, w, mask))
    # What the schedule does with it: divide by clamp(num_tokens, 1).
    loss = red.loss_sum / red.num_tokens.clamp_min(1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all() and x.grad.abs().max() == 0


def test_loss_mask_shape_mismatch():
    wce = torch.zeros(S, B)
    with pytest.raises(ValueError, match=r"loss_mask shape \(3, 7\) does not match"):
        reduce_paper(wce, wce, torch.ones(B, S), None)


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs,match", [
    ({"type": "mle"}, r"loss.type='mle' is not one of"),
    ({"gamma": -1.0}, r"loss.gamma=-1.0 must be"),
    ({"sigma": -1.0, "gamma": 0.5}, r"loss.sigma=-1.0 < 0 needs an integer loss.gamma"),
    ({"normalization": "mean"}, r"loss.normalization='mean' is not one of"),
])
def test_loss_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


# ---------------------------------------------------------------- padded vocabulary

PAD_VALID = 53  # the real vocabulary; columns 53..60 of V = 61 are padding


def _padded_inputs(seed, dtype=torch.float64):
    """Logits whose padding columns are huge (they would dominate the softmax if counted) and
    targets in the real vocabulary."""
    logits, target = _inputs(seed, dtype=torch.float64)
    logits[..., PAD_VALID:] = 50.0
    target = target % PAD_VALID
    target[2, 1] = IGNORE_INDEX
    return logits.to(dtype), target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighting", ["mile", "focal", "none"])
def test_padded_columns_count_nowhere(weighting, dtype):
    """A run with padding equals the same run with the padding removed analytically (the
    float64 reference over the real columns): CE, entropy, weight, and the gradient, which is
    zero on the padding."""
    logits, target = _padded_inputs(7, dtype)
    ref_type = "cross_entropy" if weighting == "none" else weighting
    x_ref = logits[..., :PAD_VALID].double().requires_grad_()
    wce_ref, w_ref = reference.token_losses(x_ref, target, loss_type=ref_type, gamma=1.5,
                                            sigma=0.5)
    wce_ref.sum().backward()
    p = torch.softmax(x_ref.detach(), -1)
    entropy_ref = -(p * p.log()).sum(-1)

    leaf = logits.clone().requires_grad_()
    out = vocab_parallel_weighted_cross_entropy(leaf.clone(), target, weighting=weighting,
                                                gamma=1.5, sigma=0.5, valid_vocab_size=PAD_VALID)
    out.weighted_ce.sum().backward()
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    _assert_close_rel(out.weighted_ce, wce_ref, rtol, "weighted_ce")
    _assert_close_rel(out.weight, w_ref, rtol, "weight")
    _assert_close_rel(out.entropy, entropy_ref, rtol, "entropy")
    grad_rtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8}[dtype]
    _assert_close_rel(leaf.grad[..., :PAD_VALID], x_ref.grad, grad_rtol, "gradient")
    assert torch.count_nonzero(leaf.grad[..., PAD_VALID:]) == 0
    assert leaf.grad.dtype == dtype


def test_padded_fp32_logits_in_place_path():
    """fp32 logits are worked on in place through a strided view of the real columns: the
    gradient (the same buffer) still has zeros in the padding."""
    logits, target = _padded_inputs(8, torch.float32)
    leaf = logits.clone().requires_grad_()
    buffer = leaf * 1.0  # a non-leaf the Function may overwrite
    wce, _ = vocab_parallel_mile_loss(buffer, target, valid_vocab_size=PAD_VALID)
    wce.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert torch.count_nonzero(leaf.grad[..., PAD_VALID:]) == 0
    assert leaf.grad[..., :PAD_VALID].abs().sum() > 0


@pytest.mark.parametrize("weighting", ["mile", "none"])
def test_gradcheck_float64_with_padding(weighting):
    logits, target = _inputs(4, s=3, b=2, v=11)
    target = target % 8
    weight0 = vocab_parallel_weighted_cross_entropy(
        logits.clone(), target, weighting=weighting, gamma=1.5, sigma=0.5,
        valid_vocab_size=8).weight
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda inp: _FreshForwardPerBackward.apply(inp, target, weighting, weight0, 8), (x,),
        eps=1e-6, atol=1e-8, rtol=1e-6,
    )


def test_target_in_the_padding_is_an_error():
    logits, target = _padded_inputs(9, torch.float32)
    target[0, 0] = PAD_VALID
    with pytest.raises(ValueError, match=rf"target id {PAD_VALID} is outside the vocabulary "
                                         rf"\[0, {PAD_VALID}\)"):
        vocab_parallel_mile_loss(logits, target, valid_vocab_size=PAD_VALID)
    with pytest.raises(ValueError, match="valid_vocab_size=62 must be in"):
        vocab_parallel_mile_loss(logits, target % 5, valid_vocab_size=62)


def test_token_losses_cross_entropy_ignores_padding():
    """loss.type=cross_entropy with padding goes through the same Function (megatron's CE
    would count the padding in its softmax)."""
    from megatron_mile.loss import token_losses

    logits, target = _padded_inputs(10, torch.float32)
    ref, _ = reference.token_losses(logits[..., :PAD_VALID].double(), target,
                                    loss_type="cross_entropy")
    out = token_losses(logits.clone(), target, LossConfig(type="cross_entropy"),
                       valid_vocab_size=PAD_VALID)
    _assert_close_rel(out.ce, ref, 1e-5, "ce")
    assert torch.equal(out.weight, torch.where(target == IGNORE_INDEX, 0.0, 1.0))
