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

_PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    if sys.argv[1] == "cuda":
        torch.cuda.is_available = lambda: True       # pretend: the layer must not touch anything
    from megatron.core.tensor_parallel import random as mcore_random
    originals = {
        "current_device": torch.cuda.current_device, "manual_seed": torch.cuda.manual_seed,
        "get_rng_state": torch.cuda.get_rng_state, "synchronize": torch.cuda.synchronize,
        "_get_cuda_rng_state": mcore_random._get_cuda_rng_state,
        "_set_cuda_rng_state": mcore_random._set_cuda_rng_state,
    }
    from megatron_mile import cpu_compat, launch
    cpu_compat.install_cpu_compat()
    cpu_compat.install_cpu_compat()                  # idempotent
    now = {
        "current_device": torch.cuda.current_device, "manual_seed": torch.cuda.manual_seed,
        "get_rng_state": torch.cuda.get_rng_state, "synchronize": torch.cuda.synchronize,
        "_get_cuda_rng_state": mcore_random._get_cuda_rng_state,
        "_set_cuda_rng_state": mcore_random._set_cuda_rng_state,
    }
    out = {
        "changed": sorted(k for k in originals if originals[k] is not now[k]),
        "mode_stack": torch._C._len_torch_function_stack(),
        "installed": cpu_compat.cpu_compat_installed(),
    }
    if sys.argv[1] == "cpu":
        t = torch.zeros(3, device="cuda")
        out["zeros_device"] = str(t.device)
        out["to_cuda"] = str(torch.ones(2).to("cuda:0").device)
        x = torch.ones(2)
        out["cuda_is_self"] = x.cuda() is x
        out["types"] = [torch.ones(1, dtype=d).type()
                        for d in (torch.float32, torch.bfloat16, torch.float16, torch.int64)]
        out["type_cast"] = torch.ones(1).type(torch.float64).dtype == torch.float64
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
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out["init_device"] = str(launch.initialize_distributed(timeout_minutes=1))
        out["backend"] = str(torch.distributed.get_backend())
        torch.distributed.destroy_process_group()
    print("RESULT" + json.dumps(out))
""")


def _run_probe(mode: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_install_is_a_strict_noop_when_cuda_is_available():
    out = _run_probe("cuda")
    assert out == {"changed": [], "mode_stack": 0, "installed": False}


def test_install_on_cpu_patches_once_and_maps_cuda_to_cpu():
    out = _run_probe("cpu")
    assert out["changed"] == sorted(["current_device", "manual_seed", "get_rng_state",
                                     "synchronize", "_get_cuda_rng_state",
                                     "_set_cuda_rng_state"])
    assert out["mode_stack"] == 1 and out["installed"] is True
    assert out["zeros_device"] == "cpu" and out["to_cuda"] == "cpu" and out["cuda_is_self"]
    assert out["types"] == ["torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor",
                            "torch.cuda.HalfTensor", "torch.LongTensor"]
    assert out["type_cast"] is True
    assert out["fork_restores_default"] and out["default_reseeded"] and out["fork_differs"]
    assert out["init_device"] == "cpu" and out["backend"] == "gloo"

