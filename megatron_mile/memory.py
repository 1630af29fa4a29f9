"""Parameters and GPU memory per rank of a configuration at a world size (computed, not measured).

The parameter counts are the model's own (:func:`megatron_mile.model.num_parameters`, with the
vocabulary padded as the trainer pads it, :func:`megatron_mile.model.padded_vocab_size`); the
SwiGLU width is ``ModelConfig.ffn_size``. What is counted, in bytes per rank of the busiest
pipeline stage (h hidden, f SwiGLU width, a heads, s sequence, b micro-batch, V padded
vocabulary, t tensor-parallel, d data-parallel size):

* weights: bf16, 2 B/param; gradients: fp32 (megatron DDP with grad_reduce_in_fp32, as the
  trainer sets it), 4 B/param; fp32 master weights + Adam m and v: 12 B/param, divided by d
  (use_distributed_optimizer=true, the presets' setting: ZeRO-1 style sharding).
* activations of one transformer layer, per token, bf16, sequence parallel when t > 1:
  (16h + 6f)/t bytes: norm inputs 2x2h, QKV and projection inputs 2x2h, q/k/v 6h, MLP input
  2h, SwiGLU gate+up 4f, its output 2f. Without fused (flash) attention, i.e.
  model.transformer_impl=local, the softmax output adds 2as/t; selective recompute drops it.
  With full recompute a layer keeps only its input (2h/t), plus one layer's full set while it
  is recomputed.
* 1F1B pipelining keeps min(pp, micro-batches) micro-batches in flight on the first stage
  (x (1 + (pp-1)/(pp*vpp)) when interleaved); the last stage holds the logits and the loss
  buffer: bf16 logits + one fp32 exp/gradient buffer, 6V/t bytes per token.

Not counted: the CUDA context, NCCL and communication buffers, allocator fragmentation and
other transient tensors: leave 4-8 GiB of headroom on top of these numbers. The command line
is ``megatron-mile-estimate-memory`` (megatron_mile/cli/estimate_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megatron_mile.config import TrainConfig, config_from_dict, read_config_tree
from megatron_mile.model import num_parameters, padded_vocab_size

GiB = 2**30
DEFAULT_VOCAB = 32000
"""Vocabulary when a config sets neither model.vocab_size nor data.vocab_size (its tokenizer
file is not read here): LLaMA's SentencePiece vocabulary, the paper's."""

# Planning a run needs no dataset or tokenizer file: mock data of the model's vocabulary.
_MOCK_DATA = ("data.mock=true", "data.data_path=[]", "data.valid_data_path=null",
              "data.test_data_path=null", "data.tokenizer_model=null")


@dataclass(frozen=True)
class Run:
    """A configuration at a world size, as the estimate sees it."""

    name: str
    cfg: TrainConfig
    world_size: int
    flash_attention: bool
    """Fused attention kernel (model.transformer_impl=transformer_engine): no s x s softmax
    kept for backward."""

    @property
    def tp(self) -> int:
        return self.cfg.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.cfg.parallel.pipeline_model_parallel_size

    @property
    def vpp(self) -> int:
        return self.cfg.parallel.virtual_pipeline_model_parallel_size or 1

    @property
    def dp(self) -> int:
        return self.cfg.data_parallel_size(self.world_size)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step and data-parallel rank (gradient accumulation)."""
        t = self.cfg.training
        return t.global_batch_size // (t.micro_batch_size * self.dp)

    @property
    def recompute(self) -> str:
        """The configured recomputation: 'none', 'selective' or 'full'."""
        return self.cfg.model.recompute_granularity or "none"

    @property
    def padded_vocab(self) -> int:
        """The embedding rows the trainer builds: the vocabulary padded for this TP size."""
        m = self.cfg.model
        return padded_vocab_size(m.vocab_size or self.cfg.data.vocab_size or DEFAULT_VOCAB,
                                 self.cfg)

    def parameters(self) -> int:
        """Parameters of the whole (unsharded) model."""
        return num_parameters(self.cfg, self.padded_vocab)["total"]


@dataclass(frozen=True)
class Estimate:
    """Memory per rank of the busiest pipeline stage."""

    params_per_rank: float
    weights_grads_gib: float
    optimizer_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_grads_gib + self.optimizer_gib + self.activations_gib


def load_run(name: str, world_size: int, overrides: Sequence[str] = ()) -> Run:
    """A config (shipped name or YAML path) with ``section.field=value`` overrides, on mock
    data, at ``world_size`` ranks.

    The layout goes through :meth:`TrainConfig.validate` at that world size, with the local
    layer implementation: its transformer_engine check needs Transformer Engine installed,
    which the machine planning a GPU run often lacks. ``flash_attention`` keeps the configured
    implementation (``auto``: Transformer Engine, as on the GPU nodes).

    Raises:
        ConfigError: a bad value, or a layout that does not fit ``world_size``.
    """
    tree = read_config_tree(name, list(overrides))
    vocab = ((tree.get("model") or {}).get("vocab_size")
             or (tree.get("data") or {}).get("vocab_size") or DEFAULT_VOCAB)
    mock = [*_MOCK_DATA, f"data.vocab_size={vocab}"]
    cfg = config_from_dict(tree, mock)
    config_from_dict(tree, [*mock, "model.transformer_impl=local", "precision.fp8=null"]) \
        .validate(world_size)
    # "auto" plans for the GPU node of NVIDIA's container, where it resolves to Transformer
    # Engine (megatron_mile/fusions.py), not for the machine running the estimate.
    return Run(Path(name).stem, cfg, world_size, cfg.model.transformer_impl != "local")


def activation_bytes_per_token(run: Run, recompute: str) -> tuple[float, float]:
    """(bytes kept per layer, bytes of one layer's full set while recomputed) per token."""
    m, t = run.cfg.model, run.tp
    full = (16 * m.hidden_size + 6 * m.ffn_size) / t
    if not run.flash_attention and recompute == "none":
        full += 2 * m.num_attention_heads * m.seq_length / t
    if recompute == "full":
        return 2 * m.hidden_size / t, full
    return full, 0.0


def estimate(run: Run, recompute: str | None = None) -> Estimate:
    """Memory per rank of the busiest pipeline stage; ``recompute`` ('none', 'selective' or
    'full') defaults to the configured one."""
    recompute = recompute or run.recompute
    m, t, p = run.cfg.model, run.tp, run.pp
    v = run.padded_vocab
    stage_layers = m.num_layers / p
    # With PP each end stage holds one V x h matrix (the embedding, or the output layer /
    # megatron's copy of the tied embedding); at PP=1 the one stage holds both when untied.
    vocab_matrices = 2 if p == 1 and m.untie_embeddings else 1
    params = (stage_layers * num_parameters(run.cfg, v)["per_layer"]
              + vocab_matrices * v * m.hidden_size) / t
    weights = params * (2 + 4)                      # bf16 weights + fp32 gradients
    optimizer = params * 12 / run.dp                # fp32 master + Adam m, v: sharded over DP
    tokens = run.cfg.training.micro_batch_size * m.seq_length
    kept, transient = activation_bytes_per_token(run, recompute)
    in_flight = min(p, run.micro_batches) if p > 1 else 1
    interleave = 1 + (p - 1) / (p * run.vpp) if run.vpp > 1 else 1
    first_stage = tokens * (stage_layers * kept * in_flight * interleave + transient)
    logits = tokens * 6 * v / t
    last_stage = tokens * (stage_layers * kept + transient) + logits
    activations = max(first_stage, last_stage) if p > 1 else first_stage + logits
    return Estimate(params_per_rank=params, weights_grads_gib=weights / GiB,
                    optimizer_gib=optimizer / GiB, activations_gib=activations / GiB)
