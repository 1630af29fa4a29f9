#!/usr/bin/env python
"""Cost of checkpoint checksums: save and load time with and without, side by side, one run.

Builds the trainer of ``--config`` (mock data), then alternates, ``--reps`` times:
save with checksums / save without, load with verification / load without (each into its
own directory, the page cache as warm for all). Prints the median times and the ratios
with/without as JSON.

    python tools/bench_checkpoint.py --hidden 512 --layers 8 --reps 5      # docs/benchmarks.md
    torchrun --nproc-per-node 2 tools/bench_checkpoint.py ...              # hashing split 2 ways
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    from megatron_mile.launch import default_single_process_env

    default_single_process_env()
    from megatron_mile.log_filters import install_warning_filters
    from megatron_mile.cpu_compat import cuda_available

    install_warning_filters(cuda=cuda_available())
    import torch.distributed as dist

    from megatron_mile.config import load_config
    from megatron_mile.training import checkpoint
    from megatron_mile.training.trainer import Trainer

    cfg = load_config(args.config, [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
        f"model.ffn_hidden_size={args.hidden * 8 // 3 // 64 * 64}",
        "model.num_attention_heads=8", "data.mock=true", "data.vocab_size=32000",
        "training.eval_interval=0", "training.train_iters=1"])
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.train_step()  # Adam state exists
    root = args.dir or tempfile.mkdtemp(prefix="mile-bench-ckpt-")
    times: dict[str, list[float]] = {k: [] for k in
                                     ("save_checksums", "save_plain", "load_verify", "load_plain")}
    size = 0
    try:
        for rep in range(args.reps):
            order = (True, False) if rep % 2 == 0 else (False, True)  # rotate: no order bias
            for checksums in order:
                where = os.path.join(root, f"{rep}_{checksums}")
                dist.barrier()
                start = time.perf_counter()
                checkpoint.save(where, 1, trainer.model, trainer.optimizer,
                                trainer.scheduler, {"iteration": 1}, checksums=checksums)
                dist.barrier()
                times["save_checksums" if checksums else "save_plain"].append(
                    time.perf_counter() - start)
                path = checkpoint.checkpoint_path(where, 1)
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            where = os.path.join(root, f"{rep}_True")
            for verify in order:
                dist.barrier()
                start = time.perf_counter()
                checkpoint.load(where, trainer.model, trainer.optimizer,
                                trainer.scheduler, verify_checksums=verify)
                dist.barrier()
                times["load_verify" if verify else "load_plain"].append(
                    time.perf_counter() - start)
            if dist.get_rank() == 0:
                for name in os.listdir(root):
                    shutil.rmtree(os.path.join(root, name))
            dist.barrier()
    finally:
        trainer.shutdown()
        if dist.get_rank() == 0 and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if dist.get_rank() == 0:
        median = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "world_size": dist.get_world_size(), "checkpoint_mb": round(size / 2**20, 1),
            "reps": args.reps, "median_s": {k: round(v, 3) for k, v in median.items()},
            "save_ratio": round(median["save_checksums"] / median["save_plain"], 3),
            "load_ratio": round(median["load_verify"] / median["load_plain"], 3),
        }, indent=1))


if __name__ == "__main__":
    main()
