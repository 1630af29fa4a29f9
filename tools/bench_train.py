#!/usr/bin/env python
"""Training throughput of MiLe vs cross-entropy (and focal) on the same config, same run.

The loss types alternate in one process group, round by round (order rotated), so load on
the machine falls on all of them alike; each round builds a fresh trainer, warms up, then
times ``--iters`` optimizer steps. Prints tokens/s per loss and the median of the per-round
ratios to the first loss.

    python tools/bench_train.py                                   # docs/benchmarks.md, CPU
    torchrun --nproc-per-node 1 tools/bench_train.py --config bench_125m --dtype bf16   # GPU

Mock data (vocabulary 4096, as the quickstart tokenizer), so the data path costs the same
for every loss. On a GPU it also reports model TFLOP/s per GPU (``megatron_mile.model.
flops_per_token``: 6 x matmul parameters + attention) and MFU against the device's dense BF16
peak (``--peak-tflops``; known for A100, H100 and H200).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


# Dense BF16 peak TFLOP/s of SXM parts (NVIDIA's data sheets), by a substring of the name.
_PEAK_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0}


def _round(config: str, loss: str, overrides: list[str], warmup: int, iters: int,
           world_size: int) -> tuple[float, float]:
    """(tokens/s, model FLOPs per token) of one fresh trainer."""
    from megatron_mile.model import flops_per_token
    from megatron_mile.config import load_config
    from megatron_mile.training.trainer import Trainer

    total = warmup + iters
    cfg = load_config(config, [f"loss.type={loss}", "data.mock=true", "data.vocab_size=4096",
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
        t0 = time.perf_counter()
        for _ in range(iters):
            trainer.train_step()
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    finally:
        trainer.shutdown()
    tokens_per_s = iters * cfg.training.global_batch_size * cfg.model.seq_length / elapsed
    return tokens_per_s, flops_per_token(cfg, trainer.vocab_size)


def _worker(rank: int, world_size: int, args) -> dict:
    results: dict[str, list[float]] = {loss: [] for loss in args.losses}
    flops = 0.0
    for r in range(args.rounds):
        # Rotate the order each round, so no loss always runs first (or after another).
        k = r % len(args.losses)
        for loss in args.losses[k:] + args.losses[:k]:
            tokens_per_s, flops = _round(args.config, loss, args.overrides, args.warmup,
                                         args.iters, world_size)
            results[loss].append(tokens_per_s)
    return {"tokens_per_s": results, "flops_per_token": flops, "world_size": world_size,
            "device": _device_name()}


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--nproc", type=int, default=1, help="processes (CPU, gloo)")
    parser.add_argument("--losses", nargs="+", default=["cross_entropy", "mile", "focal"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
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
    per_loss = results["tokens_per_s"]
    base = per_loss[args.losses[0]]
    device = results["device"]
    peak = args.peak_tflops or next((v for k, v in _PEAK_TFLOPS.items() if k in device), None)
    print(f"{device}; config {args.config} {' '.join(args.overrides)}; {args.rounds} rounds x "
          f"{args.iters} steps; ratio = median over rounds of (tokens/s / {args.losses[0]}'s "
          "tokens/s in the same round), robust to drift of the machine's speed"
          + (f"; MFU against {peak:g} TFLOP/s" if peak else ""))
    print("| loss | tokens/s (median) | all rounds | ratio | model TFLOP/s per device | MFU |")
    print("|---|---|---|---|---|---|")
    for loss, vals in per_loss.items():
        ratio = statistics.median(v / b for v, b in zip(vals, base))
        tflops = statistics.median(vals) * results["flops_per_token"] / results["world_size"] / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a"
        print(f"| {loss} | {statistics.median(vals):,.0f} | "
              f"{', '.join(f'{v:,.0f}' for v in vals)} | {ratio:.3f} | {tflops:.2f} | {mfu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
