#!/usr/bin/env python
"""The fused output layer + loss against its peers, side by side on one device, one process.

Forward + backward of ``hidden [n, h] @ weight[v, h]^T`` -> a token-mean loss, gradients to
hidden and weight, for:

- ``unfused``: the logits materialised (``torch.mm``) + :func:`vocab_parallel_weighted_cross_entropy`
  (MiLe), the baseline;
- ``mile_fused`` / ``ce_fused``: :func:`megatron_mile.loss.linear_weighted_cross_entropy`,
  MiLe and plain CE (``weighting="none"``), with ``grad_factor`` as in a training step: in
  fp32 the gradients are formed in forward (3 GEMMs), in bf16 the logits are recomputed in
  backward (4 GEMMs; ``fused_linear.PRECOMPUTE_DTYPES`` says why);
- ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (CE, mean);
- ``cce``: Cut-Cross-Entropy's ``linear_cross_entropy`` (CE, mean).

A peer that is not installed (or fails to import / run) gets a row saying why; the others
still run. Variants are interleaved rep by rep (order rotated) so load falls on all alike.
Time: median over ``--reps`` after one warm-up; memory: the allocator's peak above what is
allocated before the call (inputs and weight excluded) on CUDA, the process's peak resident
set (VmHWM) above its resident set at the start on CPU (slow: for smoke runs only).

    python tools/bench_peers.py                      # h = 4096, v = 128256, 8192 tokens, bf16
    python tools/bench_peers.py --tokens 512 --vocab 4000 --hidden 64 --dtype fp32 --reps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Optional

import torch

Variant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _variants() -> tuple[dict[str, Variant], dict[str, str]]:
    """(name -> fn(hidden [n, h], weight [v, h], target [n]) -> scalar loss, name -> why it is
    missing)."""
    from megatron_mile.loss import (
        linear_weighted_cross_entropy,
        vocab_parallel_weighted_cross_entropy,
    )

    def unfused(hidden, weight, target):
        logits = torch.mm(hidden, weight.t()).unsqueeze(1)  # [n, 1, v]
        return vocab_parallel_weighted_cross_entropy(
            logits, target.unsqueeze(1), weighting="mile", validate=False).weighted_ce.mean()

    def ours(weighting: str) -> Variant:
        def fn(hidden, weight, target):
            ones = torch.ones(target.shape[0], 1, device=target.device)
            return linear_weighted_cross_entropy(
                hidden.unsqueeze(1), weight, target.unsqueeze(1), weighting=weighting,
                validate=False, grad_factor=ones).weighted_ce.mean()
        return fn

    variants: dict[str, Variant] = {"unfused": unfused, "mile_fused": ours("mile"),
                                    "ce_fused": ours("none")}
    missing: dict[str, str] = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        variants["liger"] = lambda hidden, weight, target: liger_loss(weight, hidden, target)
    except Exception as e:  # noqa: BLE001  (a peer that does not import is reported)
        missing["liger"] = f"{type(e).__name__}: {e}"
    try:
        from cut_cross_entropy import linear_cross_entropy

        variants["cce"] = lambda hidden, weight, target: linear_cross_entropy(
            hidden, weight, target, reduction="mean")
    except Exception as e:  # noqa: BLE001
        missing["cce"] = f"{type(e).__name__}: {e}"
    return variants, missing


def _status_bytes(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(fn: Variant, hidden_base: torch.Tensor, weight_base: torch.Tensor,
             target: torch.Tensor) -> tuple[float, float]:
    """(seconds, peak bytes above the memory held at the start) of one forward + backward."""
    hidden = hidden_base.clone().requires_grad_()
    weight = weight_base.clone().requires_grad_()
    cuda = hidden.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = float(torch.cuda.memory_allocated())
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    loss = fn(hidden, weight, target)
    grads = torch.autograd.grad(loss, (hidden, weight))
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = float(torch.cuda.max_memory_allocated()) if cuda else _status_bytes("VmHWM")
    del loss, grads, hidden, weight
    return elapsed, peak - before


def bench(tokens: int, vocab: int, hidden_size: int, dtype: torch.dtype, reps: int,
          device: torch.device) -> dict:
    """Every variant, interleaved rep by rep; rep 0 warms up (Triton compiles there)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(dtype).to(device)
    weight = (torch.randn(vocab, hidden_size, generator=g) * (2.0 / hidden_size ** 0.5)
              ).to(dtype).to(device)
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    variants, missing = _variants()
    times: dict[str, list[float]] = {k: [] for k in variants}
    added: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(reps + 1):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            if name in missing:
                continue
            try:
                elapsed, extra = _measure(variants[name], hidden, weight, target)
            except Exception as e:  # noqa: BLE001  (a peer that fails here is reported)
                missing[name] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            if rep > 0:
                times[name].append(elapsed)
                added[name].append(extra)
    results = {name: {"time_s": statistics.median(times[name]),
                      "added_gib": max(added[name]) / 2**30, "all_time_s": times[name]}
               for name in names if name not in missing and times[name]}
    return {"tokens": tokens, "vocab": vocab, "hidden": hidden_size,
            "dtype": str(dtype).split(".")[-1], "device": _device_name(device),
            "results": results, "failed": missing}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def table(row: dict) -> str:
    """Markdown: one line per variant, ratios to ``unfused``."""
    base: Optional[dict] = row["results"].get("unfused")
    lines = [f"{row['device']}: n = {row['tokens']}, h = {row['hidden']}, v = {row['vocab']}, "
             f"{row['dtype']}", "",
             "| variant | ms | time / unfused | added GiB | added / unfused |",
             "|---|---|---|---|---|"]
    for name, r in row["results"].items():
        t_ratio = f"{r['time_s'] / base['time_s']:.3f}" if base else "-"
        m_ratio = f"{r['added_gib'] / base['added_gib']:.3f}" if base and base["added_gib"] else "-"
        lines.append(f"| {name} | {r['time_s'] * 1e3:.1f} | {t_ratio} | "
                     f"{r['added_gib']:.3f} | {m_ratio} |")
    for name, why in row["failed"].items():
        lines.append(f"| {name} | does not run: {why} | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the row here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    row = bench(args.tokens, args.vocab, args.hidden, dtype, args.reps, device)
    print(table(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
