"""Estimate parameters and GPU memory per rank for the shipped LLaMA configurations.

    python tools/estimate_memory.py                       # the examples/slurm/submit.sh presets
    python tools/estimate_memory.py --config llama_6.7b --tp 2 --pp 1 --dp 64 --micro-batch 4
    python tools/estimate_memory.py --markdown            # the table in docs/launching.md

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
from dataclasses import dataclass
from pathlib import Path

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
    source: str = "config"


# The paper's models (MILE.md, arXiv 2310.19531): used when a shipped config is not found.
PAPER_SHAPES = {
    "llama_468m": Shape("llama_468m", 24, 1024, 16, 4096, 1024, 32000, source="paper"),
    "llama_1.2b": Shape("llama_1.2b", 16, 2048, 8, 8192, 1024, 32000, source="paper"),
    "llama_6.7b": Shape("llama_6.7b", 32, 4096, 32, 11008, 2048, 32000, source="paper"),
}


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


# The layouts of examples/slurm/submit.sh (8 GPUs a node); a test keeps the two in step.
PRESETS = {
    "tiny": ("tiny", None, Layout(tp=1, pp=1, dp=1, micro_batch=4, global_batch=8)),
    "468m": ("llama_468m", 2, Layout(tp=1, pp=1, dp=16, micro_batch=32, global_batch=1024)),
    "1.2b": ("llama_1.2b", 4, Layout(tp=1, pp=1, dp=32, micro_batch=16, global_batch=1024)),
    "6.7b": ("llama_6.7b", 16, Layout(tp=2, pp=1, dp=64, micro_batch=4, global_batch=2048)),
}


def load_shape(name: str) -> Shape:
    """The shape of a shipped config (or YAML path); the paper's table if it is not shipped."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_mile.config import ConfigError, load_config

    try:
        cfg = load_config(name)
    except (ConfigError, FileNotFoundError):
        if name in PAPER_SHAPES:
            return PAPER_SHAPES[name]
        raise
    m = cfg.model
    ffn = m.ffn_hidden_size or 256 * math.ceil(int(8 * m.hidden_size / 3) / 256)
    vocab = m.vocab_size or getattr(cfg.data, "vocab_size", None) or 32000
    return Shape(name, m.num_layers, m.hidden_size, m.num_attention_heads, ffn, m.seq_length,
                 vocab, m.num_query_groups, m.make_vocab_size_divisible_by)


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


def _rows(selected):
    for label, (config, nodes, layout) in selected:
        shape = load_shape(config)
        none = estimate(shape, layout, "none")
        full = estimate(shape, layout, "full")
        yield label, shape, nodes, layout, none, full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a shipped config name or YAML path (default: presets)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int)
    parser.add_argument("--local-attention", action="store_true",
                        help="model.transformer_impl=local: no fused attention kernel")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)

    if args.config:
        layout = Layout(args.tp, args.pp, args.vpp, args.dp, args.micro_batch,
                        args.global_batch, not args.local_attention)
        selected = [(args.config, (args.config, None, layout))]
    else:
        selected = [(k, v) for k, v in PRESETS.items()
                    if not args.local_attention or k != "tiny"]
        if args.local_attention:
            selected = [(k, (c, n, Layout(**{**lay.__dict__, "flash_attention": False})))
                        for k, (c, n, lay) in selected]

    header = ["preset", "config", "params", "nodes x GPUs", "TP/PP/DP", "micro-batch",
              "weights+grads", "optimizer", "activations", "total",
              "activations, full recompute", "total, full recompute"]
    rows = []
    for label, shape, nodes, lay, none, full in _rows(selected):
        ranks = lay.tp * lay.pp * lay.dp
        gpus = f"{nodes} x 8" if nodes else f"{ranks} rank{'s' if ranks > 1 else ''}"
        n = total_params(shape)
        size = f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
        rows.append([
            label, shape.name + (" (paper)" if shape.source == "paper" else ""),
            size, gpus, f"{lay.tp}/{lay.pp}/{lay.dp}",
            f"{lay.micro_batch} x {shape.seq}", f"{none['weights_grads']:.1f}",
            f"{none['optimizer']:.2f}", f"{none['activations']:.1f}", f"{none['total']:.1f}",
            f"{full['activations']:.1f}", f"{full['total']:.1f}",
        ])
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
          "buffers and fragmentation. Attention: "
          + ("unfused (local)." if args.local_attention else "fused/flash (transformer_engine)."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
