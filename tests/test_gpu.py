"""GPU tier: skipped where no CUDA device is visible (CI); run by tools/gpu_checks.sh on a
GPU machine. The CPU tiers already check every layout; these check the CUDA paths: the loss
kernel on the device, the compat layer staying off, and BF16 training on megatron-core
with Transformer Engine layers when TE is installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_mile.loss import (
    linear_weighted_cross_entropy,
    reference,
    vocab_parallel_weighted_cross_entropy,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype,grad_rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2.0 ** -8)])
@pytest.mark.parametrize("weighting", ["mile", "focal"])
def test_loss_on_cuda_matches_dense_reference(dtype, grad_rtol, weighting):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 4, 32000, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, 32000, (64, 4), generator=g)
    ref_x = logits.double().requires_grad_()
    ref_wce, ref_w = reference.token_losses(ref_x, target, loss_type=weighting)
    ref_wce.sum().backward()
    x = logits.cuda().requires_grad_()
    out = vocab_parallel_weighted_cross_entropy(x.clone(), target.cuda(), weighting=weighting)
    out.weighted_ce.sum().backward()
    scale = ref_wce.abs().max()
    assert ((out.weighted_ce.cpu().double() - ref_wce).abs().max() / scale) < 1e-5
    assert ((out.weight.cpu().double() - ref_w).abs().max() / ref_w.abs().max()) < 1e-5
    gscale = ref_x.grad.abs().max()
    assert ((x.grad.cpu().double() - ref_x.grad).abs().max() / gscale) < grad_rtol


@pytest.mark.parametrize("precompute", [False, True], ids=["recompute", "3gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_output_layer_on_cuda_matches_the_unfused_path(dtype, precompute):
    """linear_weighted_cross_entropy on the device vs hidden @ weight.T + the unfused loss, in
    chunks that do not divide n: fp32 within 1e-5; bf16 within twice the unfused path's own
    error against float64 (as tests/test_fused_linear.py on CPU). ``3gemm``: with
    grad_factor (ones: the backward is on a sum), the gradients formed in forward."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(256, 4, 512, generator=g, dtype=torch.float64)
    weight = torch.randn(32000, 512, generator=g, dtype=torch.float64) * (3 / 512 ** 0.5)
    target = torch.randint(0, 32000, (256, 4), generator=g)
    x_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_wce, _ = reference.token_losses(x_ref @ w_ref.t(), target, loss_type="mile")
    ref_wce.sum().backward()

    def run(fused: bool):
        x = hidden.to(dtype).cuda().requires_grad_()
        w = weight.to(dtype).cuda().requires_grad_()
        if fused:
            factor = torch.ones(target.shape, device="cuda") if precompute else None
            out = linear_weighted_cross_entropy(x, w, target.cuda(), chunk_size=300,
                                                grad_factor=factor)
        else:
            out = vocab_parallel_weighted_cross_entropy(x @ w.t(), target.cuda())
        out.weighted_ce.sum().backward()
        return [t.detach().cpu().double() for t in (out.weighted_ce, x.grad, w.grad)]

    def rel(a, e):
        return ((a - e).abs().max() / e.abs().max()).item()

    refs = [ref_wce.detach(), x_ref.grad, w_ref.grad]
    fused, unfused = run(True), run(False)
    for f, u, r in zip(fused, unfused, refs):
        if dtype == torch.float32:
            assert rel(f, u) < 1e-5
        else:
            assert rel(f, r) <= 2 * rel(u, r)


def test_cpu_compat_layer_stays_off_with_cuda():
    from megatron_mile.cpu_compat import cpu_compat_installed, install_cpu_compat

    install_cpu_compat()
    assert not cpu_compat_installed()
    # The CPU patch returns torch.device("cpu"); CUDA's own function returns the device index.
    assert isinstance(torch.cuda.current_device(), int)


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_bf16_training_on_gpu(impl, tmp_path):
    if impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("Transformer Engine is not installed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "megatron_mile.train", "--config", "tiny", "precision.dtype=bf16",
           f"model.transformer_impl={impl}", "training.train_iters=20",
           f"checkpoint.save={tmp_path / 'ckpt'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device cuda" in proc.stdout and "iteration 20/20" in proc.stdout
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
