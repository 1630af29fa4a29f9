#!/usr/bin/env python
"""What the metrics sinks and the profiler cost (docs/benchmarks.md, docs/observability.md).

    python tools/bench_observability.py              # CPU, the tiny config
    python tools/bench_observability.py --writes 500 --iters 12

1. Sinks: the median time of one ``write_train`` per sink (the product's sink classes, a
   record of the 18 metrics a MiLe run logs), over ``--writes`` writes; wandb (offline) only
   where it is installed, with its ``wandb.init`` + ``finish`` time. A sink is called at the
   log interval only, so its cost per iteration is this / training.log_interval.
2. Profiler: one trainer run (tiny config, mock data, log_interval=1) with a profile window
   in the middle; the median iteration time inside the window vs outside it (the first two
   iterations, warm-up, left out), read from the run's own metrics_jsonl, and the trace's
   size per profiled iteration.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time


def _record():
    from megatron_mile.training.sinks import TrainRecord

    keys = ["lm_loss", "objective", "entropy", "weight", "alpha", "weight_min", "weight_max",
            "lr", "grad_norm", "skipped", "iteration_time", "tokens_per_s",
            "tflops_per_device", "mfu", "memory_gib", "loss_scale", "consumed", "extra"]
    return TrainRecord(10, 1000, 80, {k: 1.0 + i / 7 for i, k in enumerate(keys)}, 12.0, 99.0)


def _time_writes(sink, writes: int) -> tuple[float, float]:
    """(median seconds of one write_train, seconds of close())."""
    import dataclasses

    record = _record()
    times = []
    for i in range(writes):
        r = dataclasses.replace(record, iteration=i + 1)
        start = time.perf_counter()
        sink.write_train(r)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    sink.close()
    return statistics.median(times), time.perf_counter() - start


def bench_sinks(writes: int, tmp: str) -> None:
    from megatron_mile.config import load_config
    from megatron_mile.training import sinks

    handler = logging.StreamHandler(open(os.devnull, "w"))
    logger = logging.getLogger("megatron_mile")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    cfg = load_config("tiny", [f"logging.tensorboard_dir={tmp}/tb", "logging.wandb_mode=offline",
                               "logging.wandb_project=bench", f"logging.wandb_dir={tmp}/wb"])
    rows = []
    for name, make in [("console (to /dev/null)", sinks.ConsoleSink),
                       ("metrics_jsonl", lambda: sinks.JsonlSink(f"{tmp}/m.jsonl")),
                       ("tensorboard", lambda: sinks.TensorBoardSink(cfg)),
                       ("wandb (offline)", lambda: sinks.WandbSink(cfg))]:
        if name.startswith("wandb") and not importlib.util.find_spec("wandb"):
            print(f"{name}: not installed, skipped")
            continue
        start = time.perf_counter()
        sink = make()
        opened = time.perf_counter() - start
        rows.append((name, opened, *_time_writes(sink, writes)))
    print(f"| sink | open (s) | median write_train (ms), {writes} writes | close (s) |")
    print("|---|---|---|---|")
    for name, opened, per_write, closed in rows:
        print(f"| {name} | {opened:.3f} | {per_write * 1e3:.3f} | {closed:.3f} |")


def bench_profiler(iters: int, tmp: str) -> None:
    from megatron_mile.launch import default_single_process_env
    from megatron_mile.config import load_config
    from megatron_mile.training.sinks import read_jsonl
    from megatron_mile.training.trainer import Trainer

    default_single_process_env()
    start_step, end_step = iters // 2 - 1, iters // 2 + 2
    cfg = load_config("tiny", [f"training.train_iters={iters}", "training.log_interval=1",
                               "training.eval_interval=0", f"logging.metrics_jsonl={tmp}/p.jsonl",
                               "profile.enabled=true", f"profile.start_step={start_step}",
                               f"profile.end_step={end_step}", f"profile.dir={tmp}/prof"])
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.shutdown()
    times = {r["iteration"]: r["iteration_time"] for r in read_jsonl(f"{tmp}/p.jsonl")}
    inside = [t for i, t in times.items() if start_step <= i < end_step]
    outside = [t for i, t in times.items() if i > 2 and not start_step <= i < end_step]
    size = sum(os.path.getsize(os.path.join(f"{tmp}/prof", f))
               for f in os.listdir(f"{tmp}/prof"))
    print(f"\nprofiler, tiny config, {iters} iterations, window {start_step}..{end_step - 1}:")
    print("| iterations | median iteration time (s) | n |")
    print("|---|---|---|")
    print(f"| outside the window | {statistics.median(outside):.3f} | {len(outside)} |")
    print(f"| inside the window | {statistics.median(inside):.3f} | {len(inside)} |")
    print(f"trace: {size / 2**20:.1f} MiB for {len(inside)} iterations "
          f"({size / 2**20 / len(inside):.1f} MiB per iteration)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--iters", type=int, default=12)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mile-bench-obs-") as tmp:
        bench_sinks(args.writes, tmp)
        bench_profiler(args.iters, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
