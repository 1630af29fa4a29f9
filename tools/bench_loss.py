#!/usr/bin/env python
"""Forward+backward time and peak memory: MiLe vs megatron-core's vocab-parallel CE.

Same inputs, same process, variants interleaved rep by rep, so ratios are measured side by
side. For each (vocabulary, TP size, logits dtype) it times megatron-core's
``vocab_parallel_cross_entropy``, its fused variant where it runs, our MiLe and focal
losses, and prints the ratios to CE.

    python tools/bench_loss.py                       # the table in docs/benchmarks.md
    python tools/bench_loss.py --tokens 2048 --vocab 32000 --tp 1 --dtype bf16 --reps 3
    torchrun --nproc-per-node 2 tools/bench_loss.py      # GPU: TP = the number of processes

    # Output layer + loss, fused (linear_weighted_cross_entropy) vs unfused (megatron's
    # output-layer linear + vocab_parallel_weighted_cross_entropy), hidden size 256:
    python tools/bench_loss.py --fused --hidden 256 --dtype fp32 --reps 3

Peak memory is the peak of the whole forward+backward, the logits and their gradient
included (what a training step holds). With ``--fused`` it is also given above the memory
held when the call starts (the inputs and the weight): what the call itself adds.
On GPU: ``torch.cuda.max_memory_allocated``. On CPU: the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs before each variant); tensors this large are
mmap-backed, so RSS follows live tensor memory.
TP=2 runs two processes over gloo (CPU) or NCCL (GPU); rank 0 reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> float:
    """Reset the peak counter; return current usage in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return float(torch.cuda.memory_allocated())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024.0


def _peak(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    return _status_kib("VmHWM") * 1024.0


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _variants(tp_group):
    from megatron.core import tensor_parallel

    from megatron_mile.loss import vocab_parallel_weighted_cross_entropy

    def ce(logits, target):
        return tensor_parallel.vocab_parallel_cross_entropy(logits, target)

    def fused(logits, target):
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        return fused_vocab_parallel_cross_entropy(logits, target, tp_group)

    def mile(logits, target):
        return vocab_parallel_weighted_cross_entropy(logits, target, weighting="mile",
                                                     tp_group=tp_group).weighted_ce

    def focal(logits, target):
        return vocab_parallel_weighted_cross_entropy(logits, target, weighting="focal",
                                                     tp_group=tp_group).weighted_ce

    return {"megatron_ce": ce, "megatron_fused_ce": fused, "mile": mile, "focal": focal}


def _fused_variants(tp_group, sequence_parallel: bool = False):
    """Output layer + MiLe, each ``fn(hidden, weight, target) -> weighted_ce``."""
    from megatron.core.tensor_parallel.layers import (
        linear_with_grad_accumulation_and_async_allreduce,
    )

    from megatron_mile.loss import (
        linear_weighted_cross_entropy,
        vocab_parallel_weighted_cross_entropy,
    )

    tp = tp_group.size() if tp_group is not None else 1

    def unfused(hidden, weight, target):
        # megatron's ColumnParallelLinear without SP: the input gradient is all-reduced.
        logits = linear_with_grad_accumulation_and_async_allreduce(
            hidden, weight, None, gradient_accumulation_fusion=False,
            allreduce_dgrad=tp > 1 and not sequence_parallel,
            sequence_parallel=sequence_parallel, tp_group=tp_group)
        return vocab_parallel_weighted_cross_entropy(logits, target,
                                                     tp_group=tp_group).weighted_ce

    def fused_recompute(hidden, weight, target):
        return linear_weighted_cross_entropy(hidden, weight, target, tp_group=tp_group,
                                             sequence_parallel=sequence_parallel).weighted_ce

    def fused(hidden, weight, target):
        # grad_factor: the backward is on loss.sum(), a scalar times ones (the loss mask of a
        # training step): at TP = 1 the gradients are formed in forward (3 GEMMs); at TP > 1
        # this is fused_recompute.
        return linear_weighted_cross_entropy(
            hidden, weight, target, tp_group=tp_group, sequence_parallel=sequence_parallel,
            grad_factor=torch.ones(target.shape, device=target.device)).weighted_ce

    return {"unfused": unfused, "fused": fused, "fused_recompute": fused_recompute}


def _measure_fused_one(fn, hidden_base, weight_base, target, device):
    """One forward+backward of output layer + loss from fresh leaves; returns (seconds, peak
    bytes, peak bytes above the memory held at the start: inputs and weight excluded)."""
    hidden = hidden_base.clone().requires_grad_()
    weight = weight_base.clone().requires_grad_()
    _sync(device)
    before = _reset_peak(device)
    t0 = time.perf_counter()
    loss = fn(hidden, weight, target)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight))
    _sync(device)
    elapsed = time.perf_counter() - t0
    peak = _peak(device)
    del loss, grads, hidden, weight
    return elapsed, peak, peak - before


def bench_fused_case(tokens: int, vocab: int, hidden_size: int, dtype: torch.dtype, reps: int,
                     tp_group, tp_rank: int, tp_size: int, device) -> dict:
    """Unfused vs fused output layer + MiLe (3 GEMMs where it applies, and the recompute),
    interleaved rep by rep (order rotated)."""
    s, b = tokens // 4, 4
    vp = vocab // tp_size
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(s, b, hidden_size, generator=g).to(dtype).to(device)
    weight_full = torch.randn(vocab, hidden_size, generator=g) * (2.0 / hidden_size ** 0.5)
    weight = weight_full[tp_rank * vp:(tp_rank + 1) * vp].to(dtype).to(device)
    del weight_full
    target = torch.randint(0, vocab, (s, b), generator=g).to(device)
    variants = _fused_variants(tp_group)
    rows = {k: {"time": [], "peak": [], "added": []} for k in variants}
    names = list(variants)
    for rep in range(reps + 1):  # rep 0 warms up
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            elapsed, peak, added = _measure_fused_one(variants[name], hidden, weight, target,
                                                      device)
            if rep > 0:
                for key, val in (("time", elapsed), ("peak", peak), ("added", added)):
                    rows[name][key].append(val)
    out = {"tokens": tokens, "vocab": vocab, "hidden": hidden_size, "tp": tp_size,
           "dtype": str(dtype).split(".")[-1], "device": str(device), "results": {},
           "failed": {}}
    for name, r in rows.items():
        out["results"][name] = {"time_s": statistics.median(r["time"]),
                                "peak_gib": max(r["peak"]) / 2**30,
                                "added_gib": max(r["added"]) / 2**30,
                                "all_time_s": r["time"]}
    return out


def _measure_one(fn, base, target, device):
    """One forward+backward from a fresh leaf; returns (seconds, peak bytes)."""
    leaf = base.clone().requires_grad_()
    _sync(device)
    before = _reset_peak(device)
    del before
    t0 = time.perf_counter()
    loss = fn(leaf, target)
    # autograd.grad, not backward(): the gradient is handed back as in a training step, where
    # it flows into the output layer's matmul; backward() on a leaf would add AccumulateGrad's
    # copy into .grad for the variants whose gradient does not alias their input.
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    _sync(device)
    elapsed = time.perf_counter() - t0
    peak = _peak(device)
    del loss, leaf, grad
    return elapsed, peak


def bench_case(tokens: int, vocab: int, dtype: torch.dtype, reps: int, tp_group, tp_rank: int,
               tp_size: int, device) -> dict:
    s, b = tokens // 4, 4
    vp = vocab // tp_size
    g = torch.Generator(device="cpu").manual_seed(0)
    base = (torch.randn(s, b, vp, generator=g) * 2).to(dtype).to(device)
    target = torch.randint(0, vocab, (s, b), generator=g).to(device)
    variants = _variants(tp_group)
    times = {k: [] for k in variants}
    peaks = {k: [] for k in variants}
    failed = {}
    names = list(variants)
    for rep in range(reps + 1):  # rep 0 warms up
        k = rep % len(names)  # rotate the order so no variant always runs first
        for name in names[k:] + names[:k]:
            fn = variants[name]
            if name in failed:
                continue
            try:
                elapsed, peak = _measure_one(fn, base, target, device)
            except Exception as e:  # noqa: BLE001 - a variant that does not run is reported
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                continue
            if rep > 0:
                times[name].append(elapsed)
                peaks[name].append(peak)
    out = {"tokens": tokens, "vocab": vocab, "tp": tp_size, "dtype": str(dtype).split(".")[-1],
           "device": str(device), "results": {}, "failed": failed}
    for name in variants:
        if name in failed:
            continue
        out["results"][name] = {"time_s": statistics.median(times[name]),
                                "peak_gib": max(peaks[name]) / 2**30}
    return out


def _worker(rank: int, world_size: int, args) -> list[dict]:
    from megatron.core import parallel_state

    from megatron_mile.launch import initialize_distributed

    device = initialize_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    group = parallel_state.get_tensor_model_parallel_group()
    rows = []
    for vocab in args.vocab:
        for dtype in args.dtype:
            if args.fused:
                rows.append(bench_fused_case(
                    args.tokens, vocab, args.hidden, _DTYPES[dtype], args.reps, group,
                    parallel_state.get_tensor_model_parallel_rank(), world_size, device))
                continue
            rows.append(bench_case(args.tokens, vocab, getattr(torch, {"fp32": "float32",
                                   "bf16": "bfloat16"}[dtype]), args.reps, group,
                                   parallel_state.get_tensor_model_parallel_rank(), world_size,
                                   device))
    parallel_state.destroy_model_parallel()
    return rows


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _fused_table(rows: list[dict]) -> str:
    """One line per (case, variant), ratios to the unfused variant of the same case."""
    lines = ["| vocab | TP | h | dtype | variant | ms | **time / unfused** | peak GiB | "
             "**peak / unfused** | added GiB | added / unfused |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        u = row["results"]["unfused"]
        for name, f in row["results"].items():
            lines.append(
                f"| {row['vocab']} | {row['tp']} | {row['hidden']} | {row['dtype']} | {name} | "
                f"{f['time_s'] * 1e3:.0f} | **{f['time_s'] / u['time_s']:.3f}** | "
                f"{f['peak_gib']:.3f} | **{f['peak_gib'] / u['peak_gib']:.3f}** | "
                f"{f['added_gib']:.3f} | {f['added_gib'] / max(u['added_gib'], 1e-9):.3f} |")
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    lines = ["| vocab | TP | dtype | variant | fwd+bwd ms | peak GiB | time / CE | peak / CE |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ce = row["results"]["megatron_ce"]
        for name, r in row["results"].items():
            lines.append(
                f"| {row['vocab']} | {row['tp']} | {row['dtype']} | {name} | "
                f"{r['time_s'] * 1e3:.1f} | {r['peak_gib']:.3f} | "
                f"{r['time_s'] / ce['time_s']:.3f} | {r['peak_gib'] / ce['peak_gib']:.3f} |")
        for name, why in row["failed"].items():
            lines.append(f"| {row['vocab']} | {row['tp']} | {row['dtype']} | {name} | "
                         f"does not run: {why} | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="s * b tokens (b = 4)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--fused", action="store_true",
                        help="output layer + MiLe: fused (linear_weighted_cross_entropy) vs "
                             "unfused (megatron's linear + vocab_parallel_weighted_cross_entropy)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size h (--fused)")
    args = parser.parse_args(argv)
    if args.tokens % 4:
        parser.error(f"--tokens={args.tokens} must be a multiple of 4")
    for v in args.vocab:
        for tp in args.tp:
            if v % tp:
                parser.error(f"--vocab {v} is not divisible by --tp {tp}")

    if "RANK" in os.environ:  # under torchrun (GPU): this process is one rank, TP = world
        import torch.distributed as dist

        rows = _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        if dist.get_rank() != 0:
            return 0
    else:
        from megatron_mile.testing import run_distributed

        rows = []
        for tp in args.tp:
            rows += run_distributed(_worker, tp, args=(args,), timeout_s=3600)[0]
    print(_fused_table(rows) if args.fused else _table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
