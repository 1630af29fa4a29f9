"""megatron-core on CPU processes: parallel layouts give the dense loss curve; compat is explicit.

The layout tests run in one 2-process gloo launch (each process pays ~8 s of imports once):
every layout trains 3 steps on the same 4 micro-batches and is compared with the TP=1, PP=1
run. The reference runs at DP=2 with the same data on both ranks, which averages two equal
gradients: the same update as one process.

Tolerances: fp32 layouts agree to rtol 1e-5 on loss and grad norm (measured ~1e-7: only the
order of the TP/PP reductions differs). bf16 is compared with fp32 at rtol 2e-2 (8-bit
mantissa over a 2-layer model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from megatron_mile.testing import run_distributed

pytestmark = pytest.mark.slow

STEPS = 3
FP32_RTOL = 1e-5
BF16_RTOL = 2e-2


def _train(tp: int, pp: int, *, num_layers: int = 2, vp: int | None = None, bf16: bool = False,
           distopt: bool = False, full_state: dict | None = None, steps: int = STEPS):
    """Build, train ``steps`` steps, tear down. Returns (losses, grad_norms, schedule, state)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mile.testing import tiny_gpt as T

    parallel_state.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vp)
    try:
        T.seed_everything(1234)
        shape = T.TinyGPT(num_layers=num_layers)
        config = T.transformer_config(shape, bf16=bf16, vp_size=vp)
        chunks = T.build_model_chunks(shape, config)
        if full_state is not None:
            for chunk in chunks:
                T.load_from_full_model(chunk, full_state)
        state = ({k: v.detach().clone() for k, v in chunks[0].state_dict().items()
                  if not k.endswith("_extra_state")} if tp == pp == 1 else None)
        model = T.wrap_for_training(chunks, config, use_distributed_optimizer=distopt)
        optimizer = T.build_optimizer(model, config, use_distributed_optimizer=distopt)
        scheduler = T.build_scheduler(optimizer)
        batches = T.make_batches(shape, seed=7, count=4)
        results = [T.train_step(model, optimizer, scheduler, batches, shape)
                   for _ in range(steps)]
        schedule = get_forward_backward_func().__name__
        param_dtype = next(chunks[0].parameters()).dtype
        assert param_dtype == (torch.bfloat16 if bf16 else torch.float32), param_dtype
    finally:
        parallel_state.destroy_model_parallel()
    return [r[0] for r in results], [r[1] for r in results], schedule, state


def _layouts(rank: int, world_size: int) -> dict:
    from megatron_mile.cpu_compat import cpu_compat_installed
    from megatron_mile.launch import initialize_distributed

    device = initialize_distributed()
    out: dict = {"device": str(device), "compat": cpu_compat_installed()}
    out["ref2"] = _train(1, 1)
    out["ref4"] = _train(1, 1, num_layers=4)
    ref2_state, ref4_state = out["ref2"][3], out["ref4"][3]
    out["ref2"], out["ref4"] = out["ref2"][:3], out["ref4"][:3]
    out["tp2"] = _train(2, 1)[:3]
    out["pp2"] = _train(1, 2, full_state=ref2_state)[:3]
    out["pp2_vp2"] = _train(1, 2, num_layers=4, vp=2, full_state=ref4_state)[:3]
    out["bf16_tp2_distopt"] = _train(2, 1, bf16=True, distopt=True, steps=5)[:3]
    out["bf16_dp2_distopt"] = _train(1, 1, bf16=True, distopt=True, steps=5)[:3]
    return out


@pytest.fixture(scope="module")
def layouts() -> list[dict]:
    return run_distributed(_layouts, 2, timeout_s=400)


def _assert_close(actual: list[float], expected: list[float], rtol: float, what: str) -> None:
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert abs(a - e) <= rtol * abs(e), f"{what} step {step}: {a} vs reference {e}"


def test_runs_on_cpu_with_compat(layouts):
    for rank_out in layouts:
        assert rank_out["device"] == "cpu"
        assert rank_out["compat"] is True


def test_every_rank_reports_the_same_curve(layouts):
    for key in ("ref2", "tp2", "pp2", "pp2_vp2", "bf16_tp2_distopt"):
        assert layouts[0][key][:2] == layouts[1][key][:2], key


def test_reference_trains(layouts):
    losses, norms, schedule, = layouts[0]["ref2"]
    assert schedule == "forward_backward_no_pipelining"
    assert all(n > 0 for n in norms)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_tp2_matches_tp1(layouts):
    ref_losses, ref_norms, _ = layouts[0]["ref2"]
    losses, norms, _ = layouts[0]["tp2"]
    _assert_close(losses, ref_losses, FP32_RTOL, "TP=2 loss")
    _assert_close(norms, ref_norms, FP32_RTOL, "TP=2 grad norm")


def test_pp2_1f1b_matches_pp1(layouts):
    ref_losses, ref_norms, _ = layouts[0]["ref2"]
    losses, norms, schedule = layouts[0]["pp2"]
    assert schedule == "forward_backward_pipelining_without_interleaving"
    _assert_close(losses, ref_losses, FP32_RTOL, "PP=2 loss")
    _assert_close(norms, ref_norms, FP32_RTOL, "PP=2 grad norm")


def test_pp2_interleaved_matches_pp1(layouts):
    ref_losses, ref_norms, _ = layouts[0]["ref4"]
    losses, norms, schedule = layouts[0]["pp2_vp2"]
    assert schedule == "forward_backward_pipelining_with_interleaving"
    _assert_close(losses, ref_losses, FP32_RTOL, "PP=2 VP=2 loss")
    _assert_close(norms, ref_norms, FP32_RTOL, "PP=2 VP=2 grad norm")


@pytest.mark.parametrize("key", ["bf16_tp2_distopt", "bf16_dp2_distopt"])
def test_bf16_distributed_optimizer_trains(layouts, key):
    losses, norms, _ = layouts[0][key]
    ref_losses, _, _ = layouts[0]["ref2"]
    assert all(map(lambda x: x == x and abs(x) < 1e6, losses + norms)), (losses, norms)
    # Same batches each step: Adam must bring the loss down monotonically.
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    _assert_close(losses[:STEPS], ref_losses, BF16_RTOL, f"{key} vs fp32")


# --- install_cpu_compat in a fresh interpreter (it patches process-wide) -----------------------

# Every change PATCHES lists, as (module, attribute; None = a logging filter on that logger).
EXPECTED_TARGETS = [
    ("torch.cuda", "current_device"), ("torch.cuda", "synchronize"),
    ("torch.cuda", "manual_seed"), ("torch.cuda.random", "manual_seed"),
    ("torch.cuda", "get_rng_state"), ("torch.cuda.random", "get_rng_state"),
    ("torch.cuda", "set_rng_state"), ("torch.cuda.random", "set_rng_state"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", None),
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
]

# argv: "cpu" | "cuda" (pretend CUDA is there), then a megatron-core version to pretend, or "".
_PROBE = textwrap.dedent("""
    import importlib, json, logging, os, sys
    import torch
    if sys.argv[1] == "cuda":
        torch.cuda.is_available = lambda: True       # pretend: the layer must not touch anything
    if sys.argv[2]:
        from megatron.core import package_info
        package_info.__version__ = sys.argv[2]
    from megatron_mile import cpu_compat, launch

    def target(patch):
        # What the patch's target holds now: the attribute, or whether the filter is on.
        if patch.attr is None:
            return patch.replacement in logging.getLogger(patch.module).filters
        return getattr(importlib.import_module(patch.module), patch.attr)

    def holds_replacement(patch):
        now = target(patch)
        return now is True if patch.attr is None else now is patch.replacement

    originals = [target(p) for p in cpu_compat.PATCHES]
    out = {"targets": [[p.module, p.attr] for p in cpu_compat.PATCHES],
           "why": [p.why for p in cpu_compat.PATCHES],
           "replaced_before": [i for i, p in enumerate(cpu_compat.PATCHES) if holds_replacement(p)]}
    try:
        cpu_compat.install_cpu_compat()
        cpu_compat.install_cpu_compat()                  # idempotent
    except RuntimeError as err:
        out["error"] = str(err)
    out.update(
        replaced=[i for i, p in enumerate(cpu_compat.PATCHES) if holds_replacement(p)],
        unchanged=[i for i, (p, o) in enumerate(zip(cpu_compat.PATCHES, originals))
                   if target(p) is o],
        filters=len(logging.getLogger("megatron.core.tensor_parallel.random").filters),
        mode_stack=torch._C._len_torch_function_stack(),
        installed=cpu_compat.cpu_compat_installed(),
    )
    if sys.argv[1] == "cpu" and "error" not in out:
        t = torch.zeros(3, device="cuda")
        out["zeros_device"] = str(t.device)
        out["to_cuda"] = str(torch.ones(2).to("cuda:0").device)
        x = torch.ones(2)
        out["cuda_is_self"] = x.cuda() is x
        out["types"] = [torch.ones(1, dtype=d).type()
                        for d in (torch.float32, torch.bfloat16, torch.float16, torch.int64)]
        out["type_cast"] = torch.ones(1).type(torch.float64).dtype == torch.float64
        out["current_device"] = str(torch.cuda.current_device())
        out["synchronize"] = torch.cuda.synchronize() is None
        from megatron.core.transformer.utils import get_default_causal_mask
        out["mask"] = get_default_causal_mask(3).tolist()
        # RNG tracker: forked streams differ from the default one and are reproducible.
        from megatron.core import tensor_parallel
        tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
        before = torch.get_rng_state()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        out["fork_restores_default"] = bool(torch.equal(before, torch.get_rng_state()))
        default = torch.rand(4)
        torch.cuda.manual_seed(5)
        out["default_reseeded"] = bool(torch.equal(torch.rand(4), default))
        out["fork_differs"] = not torch.equal(forked, default)
        # initialize_distributed from a torchrun-like environment.
        os.environ.pop("RANK", None)
        launch.default_single_process_env()
        out["init_device"] = str(launch.initialize_distributed(timeout_minutes=1))
        out["backend"] = str(torch.distributed.get_backend())
        torch.distributed.destroy_process_group()
    print("RESULT" + json.dumps(out))
""")


def _run_probe(mode: str, version: str = "") -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode, version], capture_output=True,
                          text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _assert_table_is_the_expected_one(out: dict) -> None:
    assert [tuple(t) for t in out["targets"]] == EXPECTED_TARGETS
    assert all(out["why"]), "every patch says why"
    assert out["replaced_before"] == []


def test_install_is_a_strict_noop_when_cuda_is_available():
    # A megatron-core version the patches were not written for changes nothing with CUDA either.
    for version in ("", "0.17.0"):
        out = _run_probe("cuda", version)
        _assert_table_is_the_expected_one(out)
        assert "error" not in out
        assert out["replaced"] == [] and out["unchanged"] == list(range(len(EXPECTED_TARGETS)))
        assert out["filters"] == 0 and out["mode_stack"] == 0 and out["installed"] is False


def test_install_on_cpu_applies_every_patch_once_and_maps_cuda_to_cpu():
    out = _run_probe("cpu")
    _assert_table_is_the_expected_one(out)
    assert "error" not in out
    assert out["replaced"] == list(range(len(EXPECTED_TARGETS))) and out["unchanged"] == []
    assert out["filters"] == 1 and out["mode_stack"] == 1 and out["installed"] is True
    assert out["zeros_device"] == "cpu" and out["to_cuda"] == "cpu" and out["cuda_is_self"]
    assert out["types"] == ["torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor",
                            "torch.cuda.HalfTensor", "torch.LongTensor"]
    assert out["type_cast"] is True
    assert out["current_device"] == "cpu" and out["synchronize"] is True
    assert out["mask"] == [[False, True, True], [False, False, True], [False, False, False]]
    assert out["fork_restores_default"] and out["default_reseeded"] and out["fork_differs"]
    assert out["init_device"] == "cpu" and out["backend"] == "gloo"


def test_install_on_cpu_refuses_another_megatron_core_release():
    out = _run_probe("cpu", "0.17.0")
    assert out["error"] == ("megatron_mile.cpu_compat patches megatron-core 0.16.1 internals but "
                            "megatron-core 0.17.0 is installed: pip install megatron-core==0.16.1")
    assert out["replaced"] == [] and out["unchanged"] == list(range(len(EXPECTED_TARGETS)))
    assert out["mode_stack"] == 0 and out["installed"] is False
