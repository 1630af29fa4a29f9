"""``loss.fused_output_layer`` through the trainer: the same curves as the unfused path.

One 2-process gloo launch runs every layout twice (fused off, then on) on the shipped tiny
config with mock data, and counts the fused loss's calls so a run that silently fell back to
the unfused path cannot pass, and its backward paths: in fp32 and bf16 at the TP sizes of
``PRECOMPUTE_TP_SIZES`` (PP 1F1B, interleaved, DP, TP + SP, activation recomputation) every
backward must scale the gradients formed in forward (3 GEMMs); fp16 (and other TP sizes)
recompute. fp32 layouts: LM loss and grad norm within 1e-5 relative per step (the tolerance
of test_training.py's layout comparisons: only the order of floating-point sums differs).
fp16: both paths round the logits and their gradient alike, the weight gradient's partial
sums differently (per chunk vs one GEMM): within 5e-5 relative per step over 6 steps
(measured: at most 7e-6), and the step-1 gradient norm's error against an fp32 run within
2x of the unfused path's. bf16 (3 GEMMs): the fused path rounds the gradient without the
schedule's scalar, the unfused path with it, so at initialisation (softmax almost uniform,
a row's roundings correlated) their step-1 gradient norms differ by about 1e-3 (unfused
0.2e-4 to 3e-4 from fp32 over six seeds, set by the scalar's mantissa; fused about 1e-3:
``fused_linear.PRECOMPUTE_DTYPES``; tests/test_fused_linear.py compares the two over a sweep
of scalars). Here: per step within bf16's unit roundoff (2^-8) of the unfused path and of
the fp32 run at step 1; a wiring error (mask, scalar, main_grad) is far larger.
"""

from __future__ import annotations

import pytest

from megatron_mile.loss.fused_linear import PRECOMPUTE_TP_SIZES
from megatron_mile.testing import run_distributed
from trainer_runs import curve, run_trainer

pytestmark = pytest.mark.slow

STEPS = 6
RTOL = 1e-5
HALF_RTOL = 5e-5
BASE = [f"training.train_iters={STEPS}", "training.log_interval=1", "training.eval_interval=0",
        "optimizer.lr_decay_iters=16"]
TP2 = ["parallel.tensor_model_parallel_size=2"]
PP2 = ["parallel.pipeline_model_parallel_size=2"]
DISTOPT = ["parallel.use_distributed_optimizer=true"]
TIED = ["model.untie_embeddings=false"]
LAYOUTS = {
    "tp2_sp": [*TP2, "parallel.sequence_parallel=true"],
    "tp2_sp_tied_recompute": [*TP2, "parallel.sequence_parallel=true", *TIED,
                              "model.recompute_granularity=full"],
    "pp2": PP2,
    "pp2_tied": [*PP2, *TIED],
    "pp2_vp2_distopt": [*PP2, "parallel.virtual_pipeline_model_parallel_size=2", *DISTOPT,
                        "model.num_layers=4"],
    "dp2_distopt_tied": [*DISTOPT, *TIED],
    "tp2_distopt_bf16": [*TP2, *DISTOPT, "precision.dtype=bf16"],
    "tp2_fp16": [*TP2, "precision.dtype=fp16"],
    "pp2_fp16_recompute": [*PP2, "precision.dtype=fp16", "model.recompute_granularity=full"],
}
HALF = {"tp2_distopt_bf16", "tp2_fp16", "pp2_fp16_recompute"}
BF16 = {"tp2_distopt_bf16"}  # the half-precision layouts on the 3-GEMM path
BF16_RTOL = 2.0 ** -8
_HALF_SLACK = 2.0
# The loss forms its gradients in forward (grad_factor = the loss mask) at the TP sizes of
# PRECOMPUTE_TP_SIZES, so every backward of the fused loss takes the precomputed path there;
# other TP sizes recompute.
TP_SIZE = {name: 2 if any(o in layout for o in TP2) else 1 for name, layout in LAYOUTS.items()}


def _fused_vs_unfused(rank: int, world_size: int) -> dict:
    import megatron_mile.model as model_module
    from megatron_mile.loss.fused_linear import BACKWARD_PATHS

    calls = {"n": 0}
    fused = model_module.fused_token_losses

    def counting(*args, **kwargs):
        calls["n"] += 1
        return fused(*args, **kwargs)

    model_module.fused_token_losses = counting
    out: dict = {"no_labels": _forward_without_labels(world_size)}
    for name, layout in LAYOUTS.items():
        if name in HALF:  # the fp32 reference of the half-precision runs: step 1 only
            fp32 = [o for o in layout if not o.startswith("precision.dtype=")]
            run = run_trainer(BASE + fp32 + ["training.train_iters=1"], world_size)
            out[(name, "fp32")] = {"grad_norm": curve(run, "grad_norm")}
        for on in (False, True):
            calls["n"] = 0
            BACKWARD_PATHS.clear()
            run = run_trainer(BASE + layout + [f"loss.fused_output_layer={str(on).lower()}"],
                              world_size)
            out[(name, on)] = {"loss": curve(run), "grad_norm": curve(run, "grad_norm"),
                               "fused_calls": calls["n"], "paths": dict(BACKWARD_PATHS)}
    return out


def _forward_without_labels(world_size: int) -> dict:
    """The fused loss is on by default in fp32; with it on, a forward without labels
    (evaluation, generation) still gets the logits ``[b, s, v/tp]``; with labels, the
    per-token statistics."""
    import torch

    from megatron_mile.config import load_config
    from megatron_mile.loss import WeightedCrossEntropy
    from megatron_mile.training.trainer import Trainer

    # The default (null): on in fp32 (the tiny config's dtype).
    cfg = load_config("tiny", BASE + LAYOUTS["tp2_sp"], world_size=world_size)
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        (model,) = trainer.model
        tokens_bs = torch.randint(0, 500, (2, cfg.model.seq_length))
        position_ids_bs = torch.arange(cfg.model.seq_length).expand(2, -1)
        with torch.no_grad():
            logits = model(tokens_bs, position_ids_bs, None)
            stats = model(tokens_bs, position_ids_bs, None, labels=tokens_bs)
    finally:
        trainer.shutdown()
    return {"fused_by_default": model.module.fused_output_layer
            if hasattr(model, "module") else model.fused_output_layer,
            "logits_shape": tuple(logits.shape) if isinstance(logits, torch.Tensor) else None,
            "stats": isinstance(stats, WeightedCrossEntropy),
            "output_layer_restored": "forward" not in vars(model.module.output_layer)
            if hasattr(model, "module") else "forward" not in vars(model.output_layer)}


@pytest.fixture(scope="module")
def runs() -> dict:
    # The last rank is on the last pipeline stage: its history has the losses.
    return run_distributed(_fused_vs_unfused, 2, timeout_s=600)[-1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_output_layer_trains_like_the_unfused_one(runs, layout):
    off, on = runs[(layout, False)], runs[(layout, True)]
    assert off["fused_calls"] == 0 and on["fused_calls"] >= STEPS, (off, on)
    rtol = BF16_RTOL if layout in BF16 else HALF_RTOL if layout in HALF else RTOL
    if layout in HALF:
        # Step 1 (same weights): the fused gradient norm's error against the fp32 run. fp16:
        # within _HALF_SLACK of the unfused one's (the check that keeps fp16 off the
        # precomputed path: PRECOMPUTE_DTYPES); bf16: within its unit roundoff (docstring).
        ref = runs[(layout, "fp32")]["grad_norm"][0]
        bound = (BF16_RTOL * ref if layout in BF16
                 else _HALF_SLACK * abs(off["grad_norm"][0] - ref))
        assert abs(on["grad_norm"][0] - ref) <= bound, (
            on["grad_norm"][0], off["grad_norm"][0], ref)
    for key in ("loss", "grad_norm"):
        assert len(on[key]) == len(off[key]) == STEPS, (key, on, off)
        for step, (a, e) in enumerate(zip(on[key], off[key])):
            assert abs(a - e) <= rtol * abs(e), f"{layout} {key} step {step + 1}: {a!r} vs {e!r}"
    assert on["loss"][-1] < on["loss"][0], on["loss"]  # it did train
    paths = on["paths"]
    if TP_SIZE[layout] in PRECOMPUTE_TP_SIZES and (layout not in HALF or layout in BF16):
        # every backward scaled the forward's gradients (fp16: see PRECOMPUTE_DTYPES)
        assert paths.get("precomputed", 0) >= STEPS and "recomputed" not in paths, paths
    else:
        assert paths.get("recomputed", 0) >= STEPS and "precomputed" not in paths, paths


def test_forward_without_labels_still_returns_logits(runs):
    out = runs["no_labels"]
    assert out["fused_by_default"] is True, out
    assert out["logits_shape"] == (2, 64, 256), out  # [b, s, v/tp]: 512 / TP=2
    assert out["stats"] and out["output_layer_restored"], out
