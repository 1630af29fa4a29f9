#!/usr/bin/env python
"""Training throughput of MiLe vs cross-entropy (and focal) on the same config, same run.

The loss types alternate in one process group, round by round (order rotated), so load on
the machine falls on all of them alike; each round builds a fresh trainer, warms up, then
times ``--iters`` optimizer steps. Prints tokens/s per loss and the median of the per-round
ratios to the first loss.

    python tools/bench_train.py                                   # docs/benchmarks.md, CPU
    torchrun --nproc-per-node 1 tools/bench_train.py --config bench_125m --dtype bf16   # GPU

Mock data (vocabulary 4096, as the quickstart tokenizer), so the data path costs the same
for every loss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _round(config: str, loss: str, overrides: list[str], warmup: int, iters: int,
           world_size: int) -> float:
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
    return iters * cfg.training.global_batch_size * cfg.model.seq_length / elapsed


def _worker(rank: int, world_size: int, args) -> dict:
    results: dict[str, list[float]] = {loss: [] for loss in args.losses}
    for r in range(args.rounds):
        # Rotate the order each round, so no loss always runs first (or after another).
        k = r % len(args.losses)
        for loss in args.losses[k:] + args.losses[:k]:
            results[loss].append(_round(args.config, loss, args.overrides, args.warmup,
                                        args.iters, world_size))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--nproc", type=int, default=1, help="processes (CPU, gloo)")
    parser.add_argument("--losses", nargs="+", default=["cross_entropy", "mile", "focal"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
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
    base = results[args.losses[0]]
    print(f"config {args.config} {' '.join(args.overrides)}; {args.rounds} rounds x "
          f"{args.iters} steps; ratio = median over rounds of (tokens/s / {args.losses[0]}'s "
          "tokens/s in the same round), robust to drift of the machine's speed")
    print("| loss | tokens/s (median) | all rounds | ratio |")
    print("|---|---|---|---|")
    for loss, vals in results.items():
        ratio = statistics.median(v / b for v, b in zip(vals, base))
        print(f"| {loss} | {statistics.median(vals):,.0f} | "
              f"{', '.join(f'{v:,.0f}' for v in vals)} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
