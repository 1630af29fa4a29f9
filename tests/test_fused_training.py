"""``loss.fused_output_layer`` through the trainer: the same curves as the unfused path.

One 2-process gloo launch runs every layout twice (fused off, then on) on the shipped tiny
config with mock data, and counts the fused loss's calls so a run that silently fell back to
the unfused path cannot pass. fp32 layouts: LM loss and grad norm within 1e-5 relative per
step (the tolerance of test_training.py's layout comparisons: only the order of
floating-point sums differs). bf16/fp16: both paths round the logits and their gradient to
the same dtype, but the weight gradient's partial sums differently (per chunk vs one GEMM);
within 5e-5 relative per step over 6 steps (measured: at most 6e-6 for bf16 and 7e-6 for
fp16, on the loss and the grad norm).
"""

from __future__ import annotations

import pytest

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
}
HALF = {"tp2_distopt_bf16", "tp2_fp16"}


def _fused_vs_unfused(rank: int, world_size: int) -> dict:
    import megatron_mile.model as model_module

    calls = {"n": 0}
    fused = model_module.fused_token_losses

    def counting(*args, **kwargs):
        calls["n"] += 1
        return fused(*args, **kwargs)

    model_module.fused_token_losses = counting
    out: dict = {}
    for name, layout in LAYOUTS.items():
        for on in (False, True):
            calls["n"] = 0
            run = run_trainer(BASE + layout + [f"loss.fused_output_layer={str(on).lower()}"],
                              world_size)
            out[(name, on)] = {"loss": curve(run), "grad_norm": curve(run, "grad_norm"),
                               "fused_calls": calls["n"]}
    return out


@pytest.fixture(scope="module")
def runs() -> dict:
    # The last rank is on the last pipeline stage: its history has the losses.
    return run_distributed(_fused_vs_unfused, 2, timeout_s=600)[-1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_output_layer_trains_like_the_unfused_one(runs, layout):
    off, on = runs[(layout, False)], runs[(layout, True)]
    assert off["fused_calls"] == 0 and on["fused_calls"] >= STEPS, (off, on)
    rtol = HALF_RTOL if layout in HALF else RTOL
    for key in ("loss", "grad_norm"):
        assert len(on[key]) == len(off[key]) == STEPS, (key, on, off)
        for step, (a, e) in enumerate(zip(on[key], off[key])):
            assert abs(a - e) <= rtol * abs(e), f"{layout} {key} step {step + 1}: {a!r} vs {e!r}"
    assert on["loss"][-1] < on["loss"][0], on["loss"]  # it did train
