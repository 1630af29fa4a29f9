"""Estimate parameters and GPU memory per rank for the shipped LLaMA configurations.

    megatron-mile-estimate-memory                 # the runs of examples/slurm/submit.sh
    megatron-mile-estimate-memory --markdown      # the table in docs/launching.md
    megatron-mile-estimate-memory --config llama_6.7b --gpus 128 \
        parallel.tensor_model_parallel_size=2 training.micro_batch_size=4 \
        model.recompute_granularity=null            # another layout of a config

These are computed, not measured. What is counted, in bytes per rank of the busiest pipeline
stage (h hidden, f SwiGLU width, a heads, s sequence, b micro-batch, V padded vocabulary,
t tensor-parallel, d data-parallel size):
  * weights: bf16, 2 B/param; gradients: fp32 (megatron DDP with grad_reduce_in_fp32, as the
    trainer sets it), 4 B/param; fp32 master weights + Adam m and v: 12 B/param, divided by d
    (use_distributed_optimizer=true, the presets' setting: ZeRO-1 style sharding).
  * activations of one transformer layer, per token, bf16, sequence parallel when t > 1:
    (16h + 6f)/t bytes: norm inputs 2x2h, QKV and projection inputs 2x2h, q/k/v 6h, MLP input
    2h, SwiGLU gate+up 4f, its output 2f. Without fused (flash) attention, i.e.
    model.transformer_impl=local, the softmax output adds 2as/t; selective recompute drops it.
    With full recompute a layer keeps only its input (2h/t), plus one layer's full set while
    it is recomputed.
  * 1F1B pipelining keeps min(pp, micro-batches) micro-batches in flight on the first stage
    (x (1 + (pp-1)/(pp*vpp)) when interleaved); the last stage holds the logits and the loss
    buffer: bf16 logits + one fp32 exp/gradient buffer, 6V/t bytes per token.
Not counted: the CUDA context, NCCL and communication buffers, allocator fragmentation and
other transient tensors: leave 4-8 GiB of headroom on top of these numbers.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import yaml

from megatron_mile.config import CONFIG_DIR, load_config

GiB = 2**30


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a model configuration."""

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq: int
    vocab: int
    kv_heads: int | None = None
    divisible_by: int = 128


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    micro_batch: int = 1
    global_batch: int | None = None
    flash_attention: bool = True   # model.transformer_impl=transformer_engine

    @property
    def micro_batches(self) -> int:
        if self.global_batch is None:
            return self.pp
        return self.global_batch // (self.micro_batch * self.dp)


# The runs of examples/slurm/submit.sh: config and nodes of 8 GPUs (a test keeps them in
# step). Their layouts (TP, PP, batch sizes, recompute) are the configs' own.
GPUS_PER_NODE = 8
PRESETS = {"tiny": ("tiny", None), "468m": ("llama_468m", 2), "1.2b": ("llama_1.2b", 4),
           "6.7b": ("llama_6.7b", 16)}


@dataclass(frozen=True)
class Run:
    shape: Shape
    layout: Layout
    recompute: str             # none | selective | full, as configured


def load_run(name: str, world_size: int, overrides: Sequence[str] = ()) -> Run:
    """Shape, layout and recompute of a config at ``world_size`` ranks, through the project's
    own loader (which also checks that the layout divides)."""
    path = Path(name) if Path(name).is_file() else CONFIG_DIR / f"{name}.yaml"
    tree = yaml.safe_load(path.read_text()) or {}
    vocab = (tree.get("model") or {}).get("vocab_size") or (tree.get("data") or {}).get("vocab_size")
    impl = dict(o.split("=", 1) for o in overrides).get(
        "model.transformer_impl", (tree.get("model") or {}).get("transformer_impl", "local"))
    # Mock data with the model's vocabulary: no dataset or tokenizer file needed here; and the
    # local implementation, whose check does not need Transformer Engine on this machine.
    cfg = load_config(name, ["data.mock=true", f"data.vocab_size={vocab or 32000}", *overrides,
                             "model.transformer_impl=local", "precision.fp8=null"],
                      world_size=world_size)
    m, p, t = cfg.model, cfg.parallel, cfg.training
    ffn = m.ffn_hidden_size or 256 * math.ceil(int(8 * m.hidden_size / 3) / 256)
    shape = Shape(Path(name).stem, m.num_layers, m.hidden_size, m.num_attention_heads, ffn,
                  m.seq_length, m.vocab_size or vocab or 32000, m.num_query_groups,
                  m.make_vocab_size_divisible_by)
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    layout = Layout(tp, pp, p.virtual_pipeline_model_parallel_size or 1,
                    world_size // (tp * pp * p.context_parallel_size), t.micro_batch_size,
                    t.global_batch_size, impl == "transformer_engine")
    return Run(shape, layout, m.recompute_granularity or "none")


def padded_vocab(shape: Shape, tp: int) -> int:
    multiple = shape.divisible_by * tp
    return multiple * math.ceil(shape.vocab / multiple)


def layer_params(shape: Shape) -> int:
    h, kv = shape.hidden, shape.kv_heads or shape.heads
    attention = h * h + 2 * h * (h * kv // shape.heads) + h * h  # q, k, v, output projection
    mlp = 3 * h * shape.ffn                                       # gate, up, down
    return attention + mlp + 2 * h                                # + two RMSNorm weights


def total_params(shape: Shape, tp: int = 1) -> int:
    """Untied input embedding and output layer, final norm: the paper's sizes."""
    return shape.layers * layer_params(shape) + 2 * padded_vocab(shape, tp) * shape.hidden \
        + shape.hidden


def activation_bytes_per_token(shape: Shape, layout: Layout, recompute: str) -> tuple[float, float]:
    """(bytes kept per layer, bytes of one layer's full set) per token of a micro-batch."""
    h, t = shape.hidden, layout.tp
    full = (16 * h + 6 * shape.ffn) / t
    if not layout.flash_attention and recompute == "none":
        full += 2 * shape.heads * shape.seq / t
    if recompute == "full":
        return 2 * h / t, full
    return full, 0.0


def estimate(shape: Shape, layout: Layout, recompute: str = "none") -> dict[str, float]:
    """Memory in GiB per rank of the busiest pipeline stage."""
    t, p = layout.tp, layout.pp
    v = padded_vocab(shape, t)
    stage_layers = shape.layers / p
    embedding_params = v * shape.hidden / t
    params = stage_layers * layer_params(shape) / t + embedding_params * (2 if p == 1 else 1)
    weights = params * (2 + 4)                     # bf16 weights + fp32 gradients
    optimizer = params * 12 / layout.dp            # fp32 master + Adam m, v: sharded over DP
    tokens = layout.micro_batch * shape.seq
    kept, transient = activation_bytes_per_token(shape, layout, recompute)
    in_flight = min(p, layout.micro_batches) if p > 1 else 1
    interleave = 1 + (p - 1) / (p * layout.vpp) if layout.vpp > 1 else 1
    first_stage = tokens * (stage_layers * kept * in_flight * interleave + transient)
    logits = tokens * 6 * v / t
    last_stage = tokens * (stage_layers * kept + transient) + logits
    activations = max(first_stage, last_stage) if p > 1 else first_stage + logits
    return {
        "params_per_rank": params,
        "weights_grads": weights / GiB,
        "optimizer": optimizer / GiB,
        "activations": activations / GiB,
        "total": (weights + optimizer + activations) / GiB,
    }


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def table(runs: list[tuple[str, int | None, Run]]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "params", "GPUs", "TP/PP/DP", "micro-batch x seq", "accumulation",
              "recompute", "weights+grads", "optimizer", "activations", "total",
              "total, no recompute", "total, full recompute"]
    rows = []
    for label, nodes, run in runs:
        lay, shape = run.layout, run.shape
        ranks = lay.tp * lay.pp * lay.dp
        gpus = f"{nodes} x {GPUS_PER_NODE}" if nodes else str(ranks)
        est = estimate(shape, lay, run.recompute)
        rows.append([
            label, _fmt_params(total_params(shape)), gpus, f"{lay.tp}/{lay.pp}/{lay.dp}",
            f"{lay.micro_batch} x {shape.seq}", str(lay.micro_batches), run.recompute,
            f"{est['weights_grads']:.1f}", f"{est['optimizer']:.2f}",
            f"{est['activations']:.1f}", f"{est['total']:.1f}",
            f"{estimate(shape, lay, 'none')['total']:.1f}",
            f"{estimate(shape, lay, 'full')['total']:.1f}",
        ])
    return header, rows


def main(argv: list[str] | None = None) -> int:
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

    if args.config:
        runs = [(args.config, None, load_run(args.config, args.gpus, args.overrides))]
    else:
        runs = [(f"{size}: {config}", nodes,
                 load_run(config, (nodes or 1) * (GPUS_PER_NODE if nodes else 1)))
                for size, (config, nodes) in PRESETS.items()]
    if args.local_attention:
        runs = [(label, nodes, replace(run, layout=replace(run.layout, flash_attention=False)))
                for label, nodes, run in runs]
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
