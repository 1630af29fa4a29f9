"""Estimate parameters and GPU memory per rank for the shipped LLaMA configurations.

    megatron-mile-estimate-memory                 # the runs of examples/slurm/submit.sh
    megatron-mile-estimate-memory --markdown      # the table in docs/launching.md
    megatron-mile-estimate-memory --config llama_6.7b --gpus 128 \\
        parallel.tensor_model_parallel_size=2 training.micro_batch_size=4 \\
        model.recompute_granularity=null          # another layout of a config

Computed, not measured: megatron_mile/memory.py says what is counted. Also
``python -m megatron_mile.cli.estimate_memory`` and ``python tools/estimate_memory.py``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from megatron_mile.errors import ConfigError, cli_error
from megatron_mile.memory import Run, estimate, load_run

# The runs of examples/slurm/submit.sh: config and nodes of 8 GPUs (tests/test_estimate_memory.py
# keeps them in step). Their layouts (TP, PP, batch sizes, recompute) are the configs' own.
GPUS_PER_NODE = 8
PRESETS: dict[str, tuple[str, int | None]] = {
    "tiny": ("tiny", None), "468m": ("llama_468m", 2), "1.2b": ("llama_1.2b", 4),
    "6.7b": ("llama_6.7b", 16)}


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def table(runs: list[tuple[str, int | None, Run]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for (label, nodes or None, run) triples."""
    header = ["run", "params", "GPUs", "TP/PP/DP", "micro-batch x seq", "accumulation",
              "recompute", "weights+grads", "optimizer", "activations", "total",
              "total, no recompute", "total, full recompute"]
    rows = []
    for label, nodes, run in runs:
        gpus = f"{nodes} x {GPUS_PER_NODE}" if nodes else str(run.world_size)
        est = estimate(run)
        rows.append([
            label, _fmt_params(run.parameters()), gpus, f"{run.tp}/{run.pp}/{run.dp}",
            f"{run.cfg.training.micro_batch_size} x {run.cfg.model.seq_length}",
            str(run.micro_batches), run.recompute,
            f"{est.weights_grads_gib:.1f}", f"{est.optimizer_gib:.2f}",
            f"{est.activations_gib:.1f}", f"{est.total_gib:.1f}",
            f"{estimate(run, 'none').total_gib:.1f}",
            f"{estimate(run, 'full').total_gib:.1f}",
        ])
    return header, rows


def main(argv: list[str] | None = None) -> int:
    """Run ``megatron-mile-estimate-memory``; returns 0, or 2 for a bad config or layout."""
    parser = argparse.ArgumentParser(prog="megatron-mile-estimate-memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a shipped config name or YAML path (default: the "
                        "submit.sh runs)")
    parser.add_argument("--gpus", type=int, default=GPUS_PER_NODE, help="world size for --config")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="trainer overrides for --config, e.g. "
                        "parallel.tensor_model_parallel_size=2 training.micro_batch_size=4")
    parser.add_argument("--local-attention", action="store_true",
                        help="as with model.transformer_impl=local: no fused attention kernel")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)

    try:
        if args.config:
            runs = [(args.config, None, load_run(args.config, args.gpus, args.overrides))]
        else:
            runs = [(f"{size}: {config}", nodes,
                     load_run(config, (nodes or 1) * (GPUS_PER_NODE if nodes else 1)))
                    for size, (config, nodes) in PRESETS.items()]
    except ConfigError as err:
        return cli_error(parser.prog, err, "configuration error")
    if args.local_attention:
        runs = [(label, nodes, replace(run, flash_attention=False)) for label, nodes, run in runs]
    header, rows = table(runs)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for r in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("\nGiB per GPU, computed (not measured); add 4-8 GiB for the CUDA context, NCCL "
          "buffers and fragmentation. Attention: fused (transformer_engine) where configured"
          + (", here forced unfused (local)." if args.local_attention else "."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
