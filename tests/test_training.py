"""The trainer on CPU processes (gloo): parallel layouts give the same loss curve, resume is
exact, a signal saves and stops every rank, gamma=0 MiLe is cross-entropy.

Every run uses the shipped tiny config on mock data in fp32. Two launches: one process (the
TP=1, PP=1, DP=1 reference) and two processes (every other layout, and the checkpoint
tests), so each process imports megatron-core once.

Layouts are compared with ``loss.normalization=global``: the exact weighted mean over the
global batch does not depend on how tokens are split over ranks. The default ``paper`` mode
averages per-rank alphas over data-parallel ranks by definition (the official code's
semantics), so DP=2 vs DP=1 differ in it on purpose; TP and PP do not, which is checked too.

Tolerance: 1e-5 relative per step on the reported LM loss. Layouts differ only in the order
of floating-point reductions (measured: ~1e-7 after 8 steps).
"""

from __future__ import annotations

import os
import signal

import pytest

from megatron_mile.testing import run_distributed
from trainer_runs import DROPOUT, curve, resume_curves, run_trainer

pytestmark = pytest.mark.slow  # multi-process trainer runs (gloo)

STEPS = 8
RTOL = 1e-5
BASE = [f"training.train_iters={STEPS}", "training.log_interval=4", "training.eval_interval=0",
        "model.num_layers=4", "optimizer.lr_decay_iters=16"]
LAYOUTS = {
    "dp2": [],
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "pp2_vp2": ["parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2"],
    "tp2_distopt": ["parallel.tensor_model_parallel_size=2",
                    "parallel.use_distributed_optimizer=true"],
    # Activation recomputation replays the forward inside backward: same numbers.
    "tp2_recompute_full": ["parallel.tensor_model_parallel_size=2",
                           "model.recompute_granularity=full"],
    "pp2_recompute_selective": ["parallel.pipeline_model_parallel_size=2",
                                "model.recompute_granularity=selective"],
}


def _run(overrides: list[str], world_size: int, **kwargs) -> dict:
    return run_trainer(BASE + overrides, world_size, **kwargs)


_curve = curve


def _single(rank: int, world_size: int, tmp: str) -> dict:
    runs = {
        "global": _run(["loss.normalization=global"], 1),
        "paper": _run([], 1),
        "ce": _run(["loss.type=cross_entropy"], 1),
        "mile_g0": _run(["loss.gamma=0"], 1),
    }
    out = {name: _curve(run) for name, run in runs.items()}
    out["grad_norm_1"] = {name: run["history"][0]["grad_norm"] for name, run in runs.items()}
    out["weight_range_1"] = [runs["paper"]["history"][0][k] for k in ("weight_min", "weight_max")]
    out["dropout"] = resume_curves(BASE + DROPOUT, 1, os.path.join(tmp, "dropout"))
    return out


def _pair(rank: int, world_size: int, tmp: str) -> dict:
    out: dict = {}
    for name, layout in LAYOUTS.items():
        out[name] = _curve(_run(layout + ["loss.normalization=global"], 2))
    for name in ("tp2", "pp2"):
        out[f"paper_{name}"] = _curve(_run(LAYOUTS[name], 2))

    # The CPU layer is what runs megatron-core here.
    from megatron_mile.cpu_compat import cpu_compat_installed

    out["compat"] = cpu_compat_installed()

    # A signal on ONE rank stops every rank after that iteration, with a checkpoint.
    def signal_at_3(trainer, metrics):
        if trainer.iteration == 3 and rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)

    sig = _run(LAYOUTS["pp2"] + [f"checkpoint.save={os.path.join(tmp, 'signal')}"], 2,
               step_callbacks=[signal_at_3])
    # Half precision through the trainer (Float16Module, fp32 master weights; fp16 with
    # dynamic loss scaling), TP=2 with the distributed optimizer.
    for dtype in ("bf16", "fp16"):
        out[dtype] = _curve(_run(LAYOUTS["tp2_distopt"] + [f"precision.dtype={dtype}"], 2))

    # A non-finite loss seen on ONE rank stops every rank with a clear error, no hang.
    def nan_at_2(trainer, metrics):
        if trainer.iteration == 2 and rank == 0:
            metrics["lm_loss"] = float("nan")

    try:
        _run(LAYOUTS["tp2"], 2, step_callbacks=[nan_at_2])
        out["nan"] = None
    except Exception as e:  # noqa: BLE001 - the message is the result
        out["nan"] = f"{type(e).__name__}: {e}"

    from megatron_mile.training import checkpoint

    out["signal"] = {"reason": sig["exit_reason"], "iteration": sig["iteration"],
                     "checkpoint": checkpoint.find(os.path.join(tmp, "signal"))}
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("single"))
    return run_distributed(_single, 1, args=(tmp,), timeout_s=300)[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("training"))
    # The last rank logs (it is on the last pipeline stage): its history has the losses.
    return run_distributed(_pair, 2, args=(tmp,), timeout_s=600)[-1]


def _assert_same_curve(actual, expected, what, rtol=RTOL):
    assert len(actual) == len(expected) == STEPS, (what, actual, expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert abs(a - e) <= rtol * abs(e), f"{what} step {step + 1}: {a!r} vs {e!r}"


def test_reference_curve_goes_down(single):
    curve = single["global"]
    assert len(curve) == STEPS and curve[-1] < curve[0] - 0.5, curve


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(single, pair, layout):
    _assert_same_curve(pair[layout], single["global"], layout)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_paper_normalisation_is_tp_and_pp_invariant(single, pair, layout):
    # Both at DP=1 in a world of 2: alpha never crosses TP or PP.
    _assert_same_curve(pair[f"paper_{layout}"], single["paper"], layout)


@pytest.mark.parametrize("mode", ["global", "paper"])
def test_normalised_mile_has_the_scale_of_cross_entropy(single, mode):
    """At initialisation the prediction is near uniform, so every token's MiLe weight is the
    same (measured range below) and the normalised objective's gradient equals CE's: this
    guards the trainer's use of alpha (paper) and of the summed weights (global), which
    would otherwise scale the gradient by the mean weight (~7 here)."""
    w_min, w_max = single["weight_range_1"]
    assert w_max / w_min < 1.001, single["weight_range_1"]
    norms = single["grad_norm_1"]
    assert norms[mode] == pytest.approx(norms["ce"], rel=2e-3), norms


def test_mile_gamma_zero_is_cross_entropy(single):
    _assert_same_curve(single["mile_g0"], single["ce"], "MiLe gamma=0 vs CE", rtol=1e-6)


def test_resume_is_bit_exact_with_dropout_in_one_process(single):
    """The layouts' resumes (dropout on at TP=2+SP and PP=2) are in test_checkpointing.py."""
    curves = single["dropout"]
    assert curves["resumed_start"] == 5
    assert curves["first"] == curves["straight"][:4]
    assert curves["resumed"] == curves["straight"][4:]  # bitwise: same masks, same ops
    # Dropout is on: the curve leaves the dropout-free one.
    assert max(abs(a - b) for a, b in zip(curves["straight"], single["paper"])) > 1e-3


def test_megatron_runs_on_the_cpu_compat_layer(pair):
    assert pair["compat"] is True


def test_signal_on_one_rank_saves_and_stops_all(pair):
    assert pair["signal"] == {"reason": "signal", "iteration": 3, "checkpoint": 3}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_trains_like_fp32(pair, dtype):
    """bf16 has an 8-bit mantissa: over 8 steps of a 4-layer model the curve stays within 2e-2
    of fp32 (measured ~2e-3); fp16 has 11 bits and dynamic loss scaling."""
    curve = pair[dtype]
    _assert_same_curve(curve, pair["tp2_distopt"], dtype, rtol=2e-2)
    assert curve[-1] < curve[0] - 0.5


def test_non_finite_loss_on_one_rank_stops_every_rank(pair):
    # Every rank raises, each naming its own values (the NaN was injected on rank 0 only).
    assert pair["nan"] is not None and pair["nan"].startswith(
        "NonFiniteLossError: non-finite loss or gradient at iteration 2 (lm_loss "), pair["nan"]
    assert "the update was not applied" in pair["nan"], pair["nan"]


def test_check_pipeline_config_rejects_batched_p2p_with_interleaved_pp2():
    from types import SimpleNamespace

    from megatron_mile.config import load_config
    from megatron_mile.model import check_pipeline_config, transformer_config

    def cfg(vp, pp, batch):
        return SimpleNamespace(virtual_pipeline_model_parallel_size=vp,
                               pipeline_model_parallel_size=pp, batch_p2p_comm=batch)

    with pytest.raises(ValueError, match="batch_p2p_comm=False"):
        check_pipeline_config(cfg(2, 2, True))
    for ok in (cfg(2, 2, False), cfg(None, 2, True), cfg(2, 4, True)):
        check_pipeline_config(ok)
    # The model's own TransformerConfig for that layout passes.
    interleaved = load_config("tiny", ["model.num_layers=4", *LAYOUTS["pp2_vp2"]], world_size=2)
    check_pipeline_config(transformer_config(interleaved, use_cpu_initialization=True))
