"""Multi-process (gloo) tests of the vocab-parallel loss against the dense float64 reference.

One launch of 4 processes runs every case (each process pays the megatron-core import once):
TP = 1, 2, 4 through explicit sub-groups; megatron-core's own groups (TP=2 x DP=2) for the
comparison with its cross-entropy and for the data-parallel normalisation. Each rank returns
its measured errors and the module's tests assert on them.

Tolerances: fp32 within 1e-5 relative to the largest reference value (see test_loss.py);
bf16 logits: the loss is computed in fp32 from the rounded logits (1e-5 against the reference
on the same rounded values) and the gradient is returned in bf16: 2^-8 relative.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from megatron_mile.loss import (
    IGNORE_INDEX,
    LossNormalizer,
    vocab_parallel_weighted_cross_entropy,
)
from megatron_mile.loss import reference
from megatron_mile.testing import CollectiveCounter, run_distributed, tp_groups

pytestmark = pytest.mark.slow  # the loss over 4 gloo processes

WORLD = 4
S, B, V = 6, 2, 96
FP32_RTOL = 1e-5
BF16_GRAD_RTOL = 2.0 ** -8

MILE_CASES = [("mile", g, s) for g, s in itertools.product([0.0, 0.5, 1.0, 2.0], [0.0, 1.0])]
FOCAL_CASES = [("focal", g, 1.0) for g in [0.0, 0.5, 1.0, 2.0]]
BF16_CASES = [("mile", 1.0, 1.0), ("focal", 1.0, 1.0)]
PADDED_VALID = (90, 40)  # real vocabulary sizes of V = 96 padded columns


def _global_inputs(seed: int, s: int = S, b: int = B, v: int = V):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, v, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, v, (s, b), generator=g)
    target[0, 1] = IGNORE_INDEX
    grad_out = torch.randn(s, b, generator=g, dtype=torch.float64)
    return logits, target, grad_out


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def _shard(full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    vp = full.shape[-1] // tp_size
    return full[..., tp_rank * vp:(tp_rank + 1) * vp]


def _case_errors(tp_group, tp_rank, tp_size, case, dtype, seed):
    loss_type, gamma, sigma = case
    logits, target, grad_out = _global_inputs(seed)
    if dtype != torch.float64:
        logits = logits.to(dtype).double()  # the reference sees the same rounded values
    x_ref = logits.clone().requires_grad_()
    wce_ref, w_ref = reference.token_losses(x_ref, target, loss_type=loss_type, gamma=gamma,
                                            sigma=sigma)
    (wce_ref * grad_out).sum().backward()

    leaf = _shard(logits, tp_rank, tp_size).to(dtype).contiguous().requires_grad_()
    out = vocab_parallel_weighted_cross_entropy(
        leaf.clone(), target, weighting=loss_type, gamma=gamma, sigma=sigma, tp_group=tp_group)
    (out.weighted_ce * grad_out.float()).sum().backward()
    return {
        "weighted_ce": _rel(out.weighted_ce, wce_ref),
        "weight": _rel(out.weight, w_ref),
        "grad": _rel(leaf.grad, _shard(x_ref.grad, tp_rank, tp_size)),
        "grad_dtype_ok": leaf.grad.dtype == dtype,
    }


def _padding_errors(tp_group, tp_rank, tp_size, valid, dtype):
    """The loss with padding columns [valid, V) (huge logits there) against the float64
    reference over the real columns only; and the padding's gradient (must be 0)."""
    logits, target, grad_out = _global_inputs(30 + valid)
    logits[..., valid:] = 40.0
    target = torch.where(target == IGNORE_INDEX, target, target % valid)
    x_ref = logits[..., :valid].clone().requires_grad_()
    wce_ref, w_ref = reference.token_losses(x_ref, target, loss_type="mile", gamma=1.0)
    (wce_ref * grad_out).sum().backward()
    p = torch.softmax(x_ref.detach(), -1)
    entropy_ref = -(p * p.log()).sum(-1)
    full_grad_ref = torch.nn.functional.pad(x_ref.grad, (0, V - valid))

    leaf = _shard(logits, tp_rank, tp_size).to(dtype).contiguous().requires_grad_()
    out = vocab_parallel_weighted_cross_entropy(leaf.clone(), target, weighting="mile",
                                                tp_group=tp_group, valid_vocab_size=valid)
    (out.weighted_ce * grad_out.to(out.weighted_ce.dtype)).sum().backward()
    shard_ref = _shard(full_grad_ref, tp_rank, tp_size)
    return {"weighted_ce": _rel(out.weighted_ce, wce_ref), "weight": _rel(out.weight, w_ref),
            "entropy": _rel(out.entropy, entropy_ref),
            "grad": _rel(leaf.grad, shard_ref) if shard_ref.abs().max() > 0
            else float(leaf.grad.abs().max()),
            "padding_grad_zero": bool((leaf.grad[shard_ref == 0] == 0).all())}


def _count_collectives(tp_group, tp_rank, tp_size, validate):
    logits, target, _ = _global_inputs(99)
    leaf = _shard(logits, tp_rank, tp_size).float().contiguous().requires_grad_()
    with CollectiveCounter() as fwd:
        out = vocab_parallel_weighted_cross_entropy(leaf.clone(), target, tp_group=tp_group,
                                                    validate=validate)
    with CollectiveCounter() as bwd:
        out.weighted_ce.sum().backward()
    return fwd.calls, bwd.calls


def _megatron_comparison(tp_rank, tp_size):
    from megatron.core import tensor_parallel

    logits, target, grad_out = _global_inputs(7)
    target[0, 1] = 5  # megatron's CE has no ignore index
    shard = _shard(logits, tp_rank, tp_size).float().contiguous()
    a = shard.clone().requires_grad_()
    with CollectiveCounter() as mcount:
        ce = tensor_parallel.vocab_parallel_cross_entropy(a.clone(), target)
    (ce * grad_out.float()).sum().backward()
    b = shard.clone().requires_grad_()
    out = vocab_parallel_weighted_cross_entropy(b.clone(), target, weighting="mile", gamma=0.0)
    (out.weighted_ce * grad_out.float()).sum().backward()
    return {
        "loss": _rel(out.weighted_ce, ce), "grad": _rel(b.grad, a.grad),
        "megatron_collectives": len(mcount.calls), "weight_is_one": bool((out.weight == 1).all()),
    }


def _micro_batches(dp_rank: int, dp_size: int, num_mb: int):
    """Global data: [micro-batch][dp rank] -> (logits [s,b,v], target, loss_mask)."""
    data = []
    for k in range(num_mb):
        per_rank = []
        for r in range(dp_size):
            logits, target, _ = _global_inputs(1000 + 10 * k + r)
            mask = (torch.rand(S, B, generator=torch.Generator().manual_seed(50 + 10 * k + r))
                    > 0.25).float()
            if (k, r) == (1, 1):
                mask.zero_()  # one rank with an all-masked micro-batch
            per_rank.append((logits, target, mask))
        data.append(per_rank)
    return data


def _normalisation(mode, tp_group, tp_rank, tp_size, dp_group, dp_rank, dp_size):
    num_mb = 2
    data = _micro_batches(dp_rank, dp_size, num_mb)
    # Dense reference over the global batch, with gradients w.r.t. every micro-batch's logits.
    ref_leaves, wces, ws, masks = [], [], [], []
    for k in range(num_mb):
        row_wce, row_w, row_m = [], [], []
        for r in range(dp_size):
            logits, target, mask = data[k][r]
            leaf = logits.clone().requires_grad_()
            ref_leaves.append(leaf)
            wce, w = reference.token_losses(leaf, target, loss_type="mile", gamma=1.0)
            row_wce.append(wce.reshape(-1)); row_w.append(w.reshape(-1))
            row_m.append(mask.reshape(-1))
        wces.append(torch.stack(row_wce)); ws.append(torch.stack(row_w)); masks.append(torch.stack(row_m))
    if mode == "paper":
        ref_obj = reference.paper_objective(wces, ws, masks)
    else:
        ref_obj = reference.global_objective(torch.stack(wces), torch.stack(ws), torch.stack(masks))
    ref_obj.backward()

    # This rank's share through the trainer's normaliser; megatron's parts are spelled out:
    # the schedule's scaling of (loss_sum, num_tokens) and finalize_model_grads' all-reduce.
    normalizer = LossNormalizer(mode, dp_group)
    normalizer.start_step(torch.device("cpu"))
    leaves, local_obj = [], 0.0
    for k in range(num_mb):
        logits, target, mask = data[k][dp_rank]
        leaf = _shard(logits, tp_rank, tp_size).float().contiguous().requires_grad_()
        leaves.append(leaf)
        out = vocab_parallel_weighted_cross_entropy(leaf.clone(), target, weighting="mile",
                                                    gamma=1.0, tp_group=tp_group)
        red = normalizer.micro_batch(out.weighted_ce, out.weight, mask)
        if normalizer.per_token_loss:  # megatron's schedule: the raw sum
            local_obj = local_obj + red.loss_sum
        else:  # megatron's schedule: / clamp(num_tokens, 1) / num_microbatches
            local_obj = local_obj + red.loss_sum / red.num_tokens.clamp_min(1) / num_mb
    denominator = normalizer.grad_denominator(None)
    if denominator is not None:
        denominator = denominator.clone()
        dist.all_reduce(denominator, group=dp_group)  # as finalize_model_grads does
        local_obj = local_obj / denominator
    normalizer.end_step()
    local_obj.backward()
    value = local_obj.detach().clone()
    dist.all_reduce(value, group=dp_group)
    if mode == "paper":
        value /= dp_size  # DDP averages gradients (and the reported loss) over DP
        grad_scale = 1.0 / dp_size
    else:
        grad_scale = 1.0  # per-token mode: DDP sums, the finaliser already divided
    grad_err = max(
        _rel(leaves[k].grad * grad_scale,
             _shard(ref_leaves[k * dp_size + dp_rank].grad, tp_rank, tp_size))
        for k in range(num_mb)
    )
    return {"value": _rel(value, ref_obj.detach()), "grad": grad_err}


def _collective_errors(tp_group, tp_rank):
    """Bad input on ONE rank: every rank must raise, none may hang."""
    messages = {}
    logits, target, _ = _global_inputs(3)
    shard = _shard(logits, tp_rank, 2).float().contiguous()
    bad_target = target.clone()
    if tp_rank == 1:
        bad_target[2, 0] = V + 7
    try:
        vocab_parallel_weighted_cross_entropy(shard.clone(), bad_target, tp_group=tp_group)
        messages["target"] = None
    except ValueError as e:
        messages["target"] = str(e)
    uneven = shard[..., :-1].contiguous() if tp_rank == 1 else shard.clone()
    try:
        vocab_parallel_weighted_cross_entropy(uneven, target, tp_group=tp_group)
        messages["shard"] = None
    except ValueError as e:
        messages["shard"] = str(e)
    return messages


def _body(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    results: dict = {"cases": {}, "collectives": {}}
    for tp_size in (1, 2, 4):
        tp_group, tp_rank = tp_groups(rank, world_size, tp_size)
        for dtype, cases in ((torch.float32, MILE_CASES + FOCAL_CASES),
                             (torch.bfloat16, BF16_CASES)):
            for i, case in enumerate(cases):
                key = (tp_size, str(dtype).split(".")[-1]) + case
                results["cases"][key] = _case_errors(tp_group, tp_rank, tp_size, case, dtype,
                                                     seed=10 + i)
        # 90: padding inside the last shard; 40: at TP=4, shards 2 and 3 are all padding.
        for valid, dtype in itertools.product(PADDED_VALID, (torch.float64, torch.float32)):
            results.setdefault("padding", {})[(tp_size, valid, str(dtype))] = \
                _padding_errors(tp_group, tp_rank, tp_size, valid, dtype)
        for validate in (True, False):
            results["collectives"][(tp_size, validate)] = _count_collectives(
                tp_group, tp_rank, tp_size, validate)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_group = parallel_state.get_tensor_model_parallel_group()
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dp_rank = parallel_state.get_data_parallel_rank()
        results["megatron"] = _megatron_comparison(tp_rank, 2)
        for mode in ("paper", "global"):
            results[("normalisation", mode)] = _normalisation(
                mode, tp_group, tp_rank, 2, dp_group, dp_rank, 2)
        results["errors"] = _collective_errors(tp_group, tp_rank)
    finally:
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, WORLD, timeout_s=400)


ALL_KEYS = [(tp, "float32") + c for tp in (1, 2, 4) for c in MILE_CASES + FOCAL_CASES]
BF16_KEYS = [(tp, "bfloat16") + c for tp in (1, 2, 4) for c in BF16_CASES]


@pytest.mark.parametrize("key", ALL_KEYS, ids=lambda k: "tp{}-{}-{}-g{}-s{}".format(*k))
def test_fp32_matches_dense_reference(results, key):
    for rank, res in enumerate(results):
        err = res["cases"][key]
        for what in ("weighted_ce", "weight", "grad"):
            assert err[what] <= FP32_RTOL, f"rank {rank} {key} {what}: {err[what]:.3g}"


@pytest.mark.parametrize("key", BF16_KEYS, ids=lambda k: "tp{}-{}-{}-g{}-s{}".format(*k))
def test_bf16_matches_dense_reference(results, key):
    for rank, res in enumerate(results):
        err = res["cases"][key]
        assert err["weighted_ce"] <= FP32_RTOL and err["weight"] <= FP32_RTOL, (rank, err)
        assert err["grad"] <= BF16_GRAD_RTOL, (rank, err)
        assert err["grad_dtype_ok"], "the gradient must come back in the logits' dtype"


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("valid", PADDED_VALID)
@pytest.mark.parametrize("dtype", ["torch.float64", "torch.float32"])
def test_padded_columns_count_nowhere_on_any_tp(results, tp_size, valid, dtype):
    """The padded run equals the analytically unpadded float64 reference: CE, weight,
    entropy and gradient; the padding columns' gradient is zero on every shard."""
    rtol = 1e-12 if dtype == "torch.float64" else FP32_RTOL
    for rank, res in enumerate(results):
        err = res["padding"][(tp_size, valid, dtype)]
        for what in ("weighted_ce", "weight", "entropy", "grad"):
            assert err[what] <= rtol, f"rank {rank} tp{tp_size} valid {valid}: {what} {err}"
        assert err["padding_grad_zero"], (rank, err)


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("validate", [True, False])
def test_two_collectives_forward_none_backward(results, tp_size, validate):
    for res in results:
        fwd, bwd = res["collectives"][(tp_size, validate)]
        assert fwd == ["all_reduce", "all_reduce"], fwd
        assert bwd == [], bwd


def test_tp1_issues_no_collective(results):
    for res in results:
        assert res["collectives"][(1, True)] == ([], [])


def test_gamma_zero_equals_megatron_cross_entropy(results):
    for res in results:
        m = res["megatron"]
        assert m["loss"] <= 1e-6 and m["grad"] <= 1e-6, m
        assert m["weight_is_one"]
        # Megatron's unfused CE issues 3 all-reduces; ours 2 (asserted above).
        assert m["megatron_collectives"] == 3


@pytest.mark.parametrize("mode", ["paper", "global"])
def test_dp2_tp2_normalisation_equals_dense_global_batch(results, mode):
    for rank, res in enumerate(results):
        err = res[("normalisation", mode)]
        assert err["value"] <= FP32_RTOL, (rank, mode, err)
        assert err["grad"] <= FP32_RTOL, (rank, mode, err)


def test_bad_input_on_one_rank_raises_on_every_rank(results):
    for tp_rank_results in results:
        errs = tp_rank_results["errors"]
        assert errs["target"] is not None and errs["shard"] is not None
    # megatron's TP groups are (0, 1) and (2, 3): rank 1 and 3 saw the bad target.
    assert "target id 103 is outside the vocabulary [0, 96)" in results[1]["errors"]["target"]
    assert "another tensor-parallel rank reported invalid input" in results[0]["errors"]["target"]
    assert "shard sizes differ across tensor-parallel ranks (min 47, max 48)" in \
        results[0]["errors"]["shard"]
