#!/usr/bin/env python
"""Training throughput of MiLe vs cross-entropy (and focal) on the same config, same run.

The loss types alternate in one process group, round by round (order rotated), so load on
the machine falls on all of them alike; each round builds a fresh trainer, warms up, then
times ``--iters`` optimizer steps. Prints tokens/s per loss and the median of the per-round
ratios to the first loss.

    python tools/bench_train.py                                   # docs/benchmarks.md, CPU
    torchrun --nproc-per-node 1 tools/bench_train.py --config bench_125m --dtype bf16   # GPU
    # loss.fused_output_layer off vs on, MiLe, a 128000 vocabulary:
    python tools/bench_train.py --config tiny --losses mile --compare-fused \
        data.vocab_size=128000 model.seq_length=1024

Peak memory per round: the peak over the timed steps (after the warm-up), the process's peak
resident set on CPU (VmHWM, reset through /proc/self/clear_refs after the warm-up), the
allocator's peak on GPU; "added" is that peak minus the memory held when the timed steps
start (resident set / allocated bytes): what the steps themselves need beyond the model, its
optimizer state and the process. Medians over rounds are printed.

Mock data (vocabulary 4096, as the quickstart tokenizer, unless ``data.vocab_size=`` says
otherwise), so the data path costs the same for every loss. It also reports model TFLOP/s per
device (``megatron_mile.model.flops_per_token``: 6 x matmul parameters + attention) and, on a
GPU, MFU against the device's dense BF16 peak (``--peak-tflops``, else the table in
``megatron_mile/throughput.py``, which the trainer's progress line uses too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from megatron_mile.throughput import mfu, model_tflops_per_device, peak_tflops as known_peak


def _reset_peak(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _status_bytes(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_bytes(device) -> float:
    if device.type == "cuda":
        import torch

        return float(torch.cuda.max_memory_allocated())
    return _status_bytes("VmHWM")


def _current_bytes(device) -> float:
    if device.type == "cuda":
        import torch

        return float(torch.cuda.memory_allocated())
    return _status_bytes("VmRSS")


def _round(config: str, loss_overrides: list[str], overrides: list[str], warmup: int,
           iters: int, world_size: int) -> tuple[float, float, float, float]:
    """(tokens/s, peak bytes, peak bytes above the start of the timed steps, model FLOPs per
    token) of one fresh trainer."""
    from megatron_mile.config import load_config
    from megatron_mile.model import flops_per_token
    from megatron_mile.training.trainer import Trainer

    total = warmup + iters
    cfg = load_config(config, [*loss_overrides, "data.mock=true", "data.vocab_size=4096",
                               f"training.train_iters={total}",
                               "training.eval_interval=0", f"training.log_interval={total}",
                               *overrides], world_size=world_size)
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        for _ in range(warmup):
            trainer.train_step()
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        _reset_peak(trainer.device)
        base = _current_bytes(trainer.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            trainer.train_step()
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        peak = _peak_bytes(trainer.device)
    finally:
        trainer.shutdown()
    tokens_s = iters * cfg.training.global_batch_size * cfg.model.seq_length / elapsed
    return tokens_s, peak, peak - base, flops_per_token(cfg, trainer.vocab_size)


def _variants(args) -> list[tuple[str, list[str]]]:
    """(label, extra overrides) per variant: each loss, and with --compare-fused each loss
    with loss.fused_output_layer off and on."""
    out = []
    for loss in args.losses:
        if args.compare_fused:
            out.append((loss, [f"loss.type={loss}", "loss.fused_output_layer=false"]))
            out.append((f"{loss} fused", [f"loss.type={loss}", "loss.fused_output_layer=true"]))
        else:
            out.append((loss, [f"loss.type={loss}"]))
    return out


def _worker(rank: int, world_size: int, args) -> dict:
    variants = _variants(args)
    results: dict[str, dict[str, list[float]]] = {
        label: {"tokens_s": [], "peak": [], "added": []} for label, _ in variants}
    flops = 0.0
    for r in range(args.rounds):
        # Rotate the order each round, so no variant always runs first (or after another).
        k = r % len(variants)
        for label, extra in variants[k:] + variants[:k]:
            tokens_s, peak, added, flops = _round(args.config, extra, args.overrides,
                                                  args.warmup, args.iters, world_size)
            results[label]["tokens_s"].append(tokens_s)
            results[label]["peak"].append(peak)
            results[label]["added"].append(added)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"variants": results, "flops_per_token": flops, "world_size": world_size,
            "device": device}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--nproc", type=int, default=1, help="processes (CPU, gloo)")
    parser.add_argument("--losses", nargs="+", default=["cross_entropy", "mile", "focal"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compare-fused", action="store_true",
                        help="run each loss with loss.fused_output_layer off and on")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense BF16 peak per device for MFU (default: known GPUs)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    if "RANK" in __import__("os").environ:  # under torchrun: this process is one rank
        import torch.distributed as dist

        from megatron_mile.launch import initialize_distributed

        initialize_distributed()
        results = _worker(dist.get_rank(), dist.get_world_size(), args)
        if dist.get_rank() != dist.get_world_size() - 1:
            return 0
    else:
        from megatron_mile.testing import run_distributed

        results = run_distributed(_worker, args.nproc, args=(args,), timeout_s=3600)[0]
    variants = results["variants"]
    first = next(iter(variants))
    base = variants[first]["tokens_s"]
    base_peak = variants[first]["peak"]
    base_added = variants[first]["added"]
    device = results["device"]
    peak_tflops = args.peak_tflops or known_peak(device)
    print(f"{device}; config {args.config} {' '.join(args.overrides)}; {args.rounds} rounds x "
          f"{args.iters} steps; ratio = median over rounds of (tokens/s / {first}'s "
          "tokens/s in the same round), robust to drift of the machine's speed"
          + (f"; MFU against {peak_tflops:g} TFLOP/s" if peak_tflops else ""))
    print("| variant | tokens/s (median) | all rounds | ratio | peak GiB (median) | "
          "peak ratio | added GiB (median) | added ratio | model TFLOP/s per device | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in variants.items():
        vals, peaks = r["tokens_s"], r["peak"]
        ratio = statistics.median(v / b for v, b in zip(vals, base))
        peak_ratio = statistics.median(p / b for p, b in zip(peaks, base_peak))
        added = r["added"]
        added_ratio = statistics.median(a / max(b, 1.0) for a, b in zip(added, base_added))
        tflops = model_tflops_per_device(results["flops_per_token"], statistics.median(vals),
                                         results["world_size"])
        utilisation = mfu(tflops, peak_tflops)
        utilisation = "n/a" if utilisation is None else f"{utilisation:.1%}"
        print(f"| {label} | {statistics.median(vals):,.0f} | "
              f"{', '.join(f'{v:,.0f}' for v in vals)} | {ratio:.3f} | "
              f"{statistics.median(peaks) / 2**30:.3f} | {peak_ratio:.3f} | "
              f"{statistics.median(added) / 2**30:.3f} | {added_ratio:.3f} | {tflops:.3f} | "
              f"{utilisation} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
