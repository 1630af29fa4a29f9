#!/usr/bin/env python
"""The training stall of a checkpoint save, synchronous vs ``checkpoint.async_save``, one run.

Builds the trainer of ``--config`` (mock data, fp32, torch Adam) with a ``--hidden`` x
``--layers`` model, trains a few steps (Adam state exists), measures the step time without a
save, then alternates, ``--reps`` times, one synchronous and one asynchronous save of the same
state (each into its own directory, removed afterwards outside the timings):

- sync: the stall is ``Trainer.save()``: the whole write, hashing and publish.
- async: the stall is ``Trainer.save()`` (staging to host memory) + every step-boundary
  finalize until the save is published (the done-flag all-reduce; the last one publishes) +
  what the training steps run while the background thread writes lose against the median
  of the 3 steps before that save (on a CPU the writer thread competes with the step for the
  cores; on a loaded machine this term is noisy and can come out negative).

Prints the medians as JSON, with the checkpoint's size and the time until the async save was
published.

    python tools/bench_save.py --hidden 1024 --layers 12 --seq 16 --reps 3   # docs/benchmarks.md
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
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=16, help="short: the state is what counts")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    from megatron_mile.launch import default_single_process_env

    default_single_process_env()
    from megatron_mile.cpu_compat import cuda_available
    from megatron_mile.log_filters import install_warning_filters

    install_warning_filters(cuda=cuda_available())
    import torch.distributed as dist

    from megatron_mile.config import load_config
    from megatron_mile.training.trainer import Trainer

    root = args.dir or tempfile.mkdtemp(prefix="mile-bench-save-")
    cfg = load_config(args.config, [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
        f"model.ffn_hidden_size={args.hidden * 8 // 3 // 64 * 64}",
        "model.num_attention_heads=8", f"model.seq_length={args.seq}", "data.mock=true",
        "data.vocab_size=32000", "training.micro_batch_size=1",
        "training.global_batch_size=1", "training.eval_interval=0",
        "training.train_iters=1000000", f"checkpoint.save={root}", "checkpoint.auto_resume=false"])
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.train_step()  # Adam state exists

    def step() -> float:
        start = time.perf_counter()
        trainer.train_step()
        return time.perf_counter() - start

    results: dict[str, list[float]] = {k: [] for k in (
        "baseline_step_s", "sync_stall_s", "async_stall_s", "async_staging_s",
        "async_finalize_s", "async_step_slowdown_s", "async_steps_during_write",
        "async_published_after_s")}
    size = 0
    try:
        for rep in range(args.reps):
            for mode in (("sync", "async") if rep % 2 == 0 else ("async", "sync")):
                trainer.cfg.checkpoint.async_save = mode == "async"
                # this save's own baseline: the machine's load drifts between saves
                baseline = statistics.median(step() for _ in range(3))
                results["baseline_step_s"].append(baseline)
                saved = trainer.iteration
                dist.barrier()
                start = time.perf_counter()
                trainer.save()
                staged = time.perf_counter() - start
                if mode == "sync":
                    results["sync_stall_s"].append(staged)
                else:
                    finalize = slowdown = 0.0
                    steps = 0
                    while trainer.saver.in_flight is not None:
                        slowdown += step() - baseline
                        steps += 1
                        t0 = time.perf_counter()
                        trainer._finalize_save(blocking=False)
                        finalize += time.perf_counter() - t0
                    results["async_staging_s"].append(staged)
                    results["async_finalize_s"].append(finalize)
                    results["async_step_slowdown_s"].append(slowdown)
                    results["async_steps_during_write"].append(steps)
                    results["async_stall_s"].append(staged + finalize + slowdown)
                    results["async_published_after_s"].append(time.perf_counter() - start)
                path = os.path.join(root, f"iter_{saved:07d}")
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                shutil.rmtree(path)  # outside the timings: room for the next save
                step()  # the next save is of another iteration
    finally:
        trainer.shutdown()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report = {k: round(statistics.median(v), 3) for k, v in results.items()}
    report.update({"checkpoint_gb": round(size / 1e9, 3),
                   "params_m": round(sum(p.numel() for p in trainer.model[0].parameters())
                                     / 1e6, 1),
                   "reps": args.reps, "load_average": os.getloadavg()})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
