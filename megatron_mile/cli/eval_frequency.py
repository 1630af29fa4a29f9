"""Validation loss by training-corpus token frequency, for one checkpoint or a comparison.

Evaluate a checkpoint (any training layout; here one process, TP=1, PP=1):
    megatron-mile-eval-frequency eval --load runs/mile --output runs/mile/freq.json
The same under torchrun, TP=2 x PP=2 (x DP = the rest):
    torchrun --nproc-per-node 4 -m megatron_mile.cli.eval_frequency eval --load runs/mile \\
        --tensor-parallel 2 --pipeline-parallel 2 --output runs/mile/freq.json
Compare runs (a markdown table on stdout, a PNG bar chart):
    megatron-mile-eval-frequency compare runs/*/freq.json --plot freq.png

Buckets (default: the paper's): the token ids making up the most frequent 80% of training
occurrences, the next 15%, the rarest 5%; ``--edges 0.5,0.8,0.95`` for more. Validation and
training data default to the checkpoint's data.valid_data_path and data.data_path.
See docs/evaluation.md. Also ``python tools/eval_token_frequency.py`` (the former name).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _edges(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``megatron-mile-eval-frequency``."""
    parser = argparse.ArgumentParser(prog="megatron-mile-eval-frequency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="evaluate one checkpoint into a JSON file")
    ev.add_argument("--load", required=True, help="checkpoint.save directory of a run")
    ev.add_argument("--output", required=True, help="result JSON (written by rank 0)")
    ev.add_argument("--iteration", type=int, default=None, help="default: the latest")
    ev.add_argument("--valid-data", nargs="+", default=None, metavar="PREFIX",
                    help="validation .bin/.idx prefixes (default: the run's valid_data_path)")
    ev.add_argument("--train-data", nargs="+", default=None, metavar="PREFIX",
                    help="corpus whose frequencies define the buckets (default: data_path)")
    ev.add_argument("--edges", type=_edges, default=[0.8, 0.95],
                    help="cumulative occurrence shares between buckets (default 0.8,0.95)")
    ev.add_argument("--tensor-parallel", type=int, default=1)
    ev.add_argument("--pipeline-parallel", type=int, default=1)
    ev.add_argument("--micro-batch-size", type=int, default=4)
    ev.add_argument("--max-samples", type=int, default=None,
                    help="evaluate at most this many windows of seq_length tokens")
    ev.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="parameter dtype (default: the training dtype)")
    ev.add_argument("--label", default=None, help="name of the run in comparisons")
    ev.add_argument("overrides", nargs="*", metavar="section.field=value",
                    help="config overrides, e.g. data.tokenizer_model=/new/path/tok.model")
    cmp_ = sub.add_parser("compare", help="table and bar chart of several result JSONs")
    cmp_.add_argument("results", nargs="+")
    cmp_.add_argument("--plot", default=None, help="PNG path (needs matplotlib)")
    cmp_.add_argument("--markdown", default=None, help="also write the table to this file")
    cmp_.add_argument("--mean-over-seeds", action="store_true",
                      help="also average runs of the same loss (type, gamma, sigma) over seeds;"
                           " the plot then shows the means")
    return parser.parse_args(argv)


def markdown_table(results: list[dict], with_range: bool = False) -> str:
    """Perplexity and entropy per bucket, one row per result; ``with_range``: the per-seed
    ppl range of :func:`mean_over_seeds` results too."""
    names = [b["name"] for b in results[0]["buckets"]]
    head = ["run", "overall ppl"] + [f"ppl {n}" for n in names] + \
        ["overall entropy"] + [f"entropy {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        def ppl(e: dict) -> str:
            if with_range:
                return f"{e['ppl']:.3f} [{e['ppl_min']:.3f}, {e['ppl_max']:.3f}]"
            return f"{e['ppl']:.3f}"

        row = [r["label"], ppl(r["overall"])] + [ppl(b) for b in r["buckets"]]
        row += [f"{r['overall']['entropy']:.3f}"] + [f"{b['entropy']:.3f}" for b in r["buckets"]]
        lines.append("| " + " | ".join(row) + " |")
    counts = ", ".join(f"{b['name']}: {b['tokens']}" for b in results[0]["buckets"])
    lines.append("")
    lines.append(f"Validation target tokens per bucket: {counts} "
                 f"(total {results[0]['overall']['tokens']}).")
    return "\n".join(lines)


def mean_over_seeds(results: list[dict]) -> list[dict]:
    """One result per loss setting: mean CE and entropy over its runs (seeds), ppl =
    exp(mean CE), and the per-seed ppl range in ``ppl_min``/``ppl_max``."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["loss"]["type"], r["loss"]["gamma"], r["loss"]["sigma"])
        groups.setdefault(key, []).append(r)
    out = []
    for (loss, gamma, sigma), runs in groups.items():
        def mean(entries: list[dict]) -> dict:
            ce = sum(e["ce"] for e in entries) / len(entries)
            return {"tokens": entries[0]["tokens"], "ce": ce, "ppl": math.exp(ce),
                    "entropy": sum(e["entropy"] for e in entries) / len(entries),
                    "ppl_min": min(e["ppl"] for e in entries),
                    "ppl_max": max(e["ppl"] for e in entries)}

        label = loss if loss == "cross_entropy" else f"{loss} (gamma {gamma:g}" + (
            f", sigma {sigma:g})" if loss == "mile" else ")")
        out.append({
            "label": f"{label}, mean of {len(runs)} seed(s)", "loss": runs[0]["loss"],
            "seeds": [r["seed"] for r in runs],
            "overall": mean([r["overall"] for r in runs]),
            "buckets": [{"name": b["name"], **mean([r["buckets"][i] for r in runs])}
                        for i, b in enumerate(runs[0]["buckets"])],
        })
    return out


def main(argv: list[str] | None = None) -> int:
    """Run ``megatron-mile-eval-frequency``; returns the exit status."""
    from megatron_mile.cpu_compat import cuda_available
    from megatron_mile.log_filters import install_warning_filters

    install_warning_filters(cuda=cuda_available())  # before megatron-core is imported
    args = parse_args(argv)
    if args.command == "compare":
        from megatron_mile.evaluation.token_frequency import plot_runs

        results = []
        for path in args.results:
            with open(path, encoding="utf-8") as f:
                results.append(json.load(f))
        table = markdown_table(results)
        if args.mean_over_seeds:
            results = mean_over_seeds(results)
            table += "\n\nMean over seeds (ppl = exp(mean CE); [min, max] over seeds):\n\n"
            table += markdown_table(results, with_range=True)
        print(table)
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as f:
                f.write(table + "\n")
        if args.plot:
            plot_runs(results, [r["label"] for r in results], args.plot)
            print(f"wrote {args.plot}")
        return 0

    import torch.distributed as dist

    from megatron_mile.launch import default_single_process_env
    from megatron_mile.evaluation.token_frequency import evaluate_checkpoint

    default_single_process_env()
    result = evaluate_checkpoint(
        args.load, valid_data=args.valid_data, train_data=args.train_data, edges=args.edges,
        tp=args.tensor_parallel, pp=args.pipeline_parallel,
        micro_batch_size=args.micro_batch_size, max_samples=args.max_samples,
        dtype=args.dtype, iteration=args.iteration, overrides=args.overrides)
    result["label"] = args.label or f"{result['loss']['type']} ({os.path.basename(os.path.normpath(args.load))})"
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        o = result["overall"]
        print(f"{result['label']}: {o['tokens']} tokens, ce {o['ce']:.4f}, ppl {o['ppl']:.3f}, "
              f"entropy {o['entropy']:.4f} -> {args.output}")
        for b in result["buckets"]:
            print(f"  {b['name']:>10}: {b['tokens']:7d} tokens, ce {b['ce']:.4f}, "
                  f"ppl {b['ppl']:.3f}, entropy {b['entropy']:.4f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
