"""The one typed configuration of a training run: YAML file + dotted command-line overrides.

    cfg = load_config("tiny", ["loss.gamma=2", "parallel.tensor_model_parallel_size=2"])

Each section is a dataclass whose fields carry a docstring (the string literal right after
the field); ``docs/configuration.md`` is generated from them by ``tools/gen_config_docs.py``,
so the reference cannot drift. Values are checked field by field in ``__post_init__`` and
across sections in :meth:`TrainConfig.validate`, before any process group or model is built.

A leaf module: it imports nothing of the package beyond the error types and the data
section's dataclass, so tools, tests and every other module can import it without pulling in
torch, megatron-core, the Hugging Face code or the kernel probing. What needs those happens
where a run is set up (:mod:`megatron_mile.run_config`): the model's shape and family from a
Hugging Face ``config.json``, the kernel checks of ``model.transformer_impl`` and FP8.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_mile.errors import ConfigError
from megatron_mile.data.config import DataConfig

CONFIG_DIR = Path(__file__).parent / "configs"

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
"""The values of ``model.transformer_impl`` (resolved by :mod:`megatron_mile.fusions`)."""

LOSS_TYPES = ("cross_entropy", "focal", "mile")
"""The values of ``loss.type``."""
NORMALIZATIONS = ("paper", "global")
"""The values of ``loss.normalization`` (implemented in ``megatron_mile.loss.reduction``)."""
WEIGHTINGS = ("mile", "focal", "none")
"""The token weightings of the loss functions (``megatron_mile.loss.vocab_parallel``)."""




def _positive(section: str, **values: Any) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name}={value} must be > 0")


@dataclass
class ModelConfig:
    """Decoder-only transformer (RMSNorm, SwiGLU, RoPE) on megatron-core's GPTModel; the
    family's choices (biases, norms, tensor names) come from ``megatron_mile/models/``."""
    num_layers: int = 2
    """Transformer layers; divisible by pipeline_model_parallel_size (x virtual stages)."""
    hidden_size: int = 64
    """Model width h."""
    num_attention_heads: int = 4
    """Query heads; divisible by tensor_model_parallel_size; hidden_size divisible by it
    unless head_dim is set."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means multi-head (= heads)."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU inner width; None means LLaMA's rule: 2/3 * 4h rounded up to a multiple of 256."""
    seq_length: int = 128
    """Tokens per training sample."""
    vocab_size: Optional[int] = None
    """None: the tokenizer's vocabulary. The embedding is padded to a multiple of
    make_vocab_size_divisible_by x tensor_model_parallel_size."""
    make_vocab_size_divisible_by: int = 128
    """Padding multiple of the embedding rows (per TP rank), as in Megatron-LM."""
    init_method_std: float = 0.01
    """Std of the normal weight init (the paper: 0.01)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (the paper: 1e-5)."""
    rotary_base: int = 10000
    """RoPE base."""
    untie_embeddings: bool = True
    """Separate input embedding and output layer weights (LLaMA, the paper)."""
    transformer_impl: str = "auto"
    """Layer implementation: 'auto' (Transformer Engine where it is importable with CUDA,
    else 'local'), 'local' (megatron-core modules, CPU or GPU) or 'transformer_engine' (GPU,
    needs Transformer Engine; required for FP8; runs context parallelism with TE's attention,
    where 'local' uses the project's all-gather attention). The fused kernels
    follow from it and from what is installed (megatron_mile/fusions.py, docs/launching.md)."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation: None, 'selective' (attention core) or 'full'."""
    recompute_num_layers: int = 1
    """With 'full': layers per recomputed block (uniform method)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (LLaMA: 0)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (LLaMA: 0)."""
    family: str = "llama"
    """Model family (``megatron_mile/models/``): its layer choices and Hugging Face tensor
    names. With checkpoint.init_from_hf it is inferred from config.json's architecture.
    Known: 'llama' (Llama-2, Llama-3, 3.1, 3.2), 'qwen2' (Qwen2 and Qwen2.5), 'qwen3',
    'mistral'."""
    head_dim: Optional[int] = None
    """Width of one attention head (megatron's ``kv_channels``); None: hidden_size /
    num_attention_heads. Qwen3 sets it independently of hidden_size (config.json's
    ``head_dim``)."""
    rope_scaling_factor: Optional[float] = None
    """Llama-3.1/3.2 RoPE frequency scaling (config.json ``rope_type: llama3``) with this
    factor, and megatron-core's fixed low_freq_factor 1, high_freq_factor 4,
    original_max_position_embeddings 8192; None: plain RoPE."""
    sliding_window: Optional[int] = None
    """Mistral's attention window in tokens (config.json's ``sliding_window``): a token sees
    the previous sliding_window - 1 and itself. None: full causal attention. A window of at
    least seq_length is full causal attention; a shorter one needs Transformer Engine
    (model.transformer_impl)."""

    def __post_init__(self) -> None:
        _positive("model", num_layers=self.num_layers, hidden_size=self.hidden_size,
                  num_attention_heads=self.num_attention_heads,
                  num_query_groups=self.num_query_groups, ffn_hidden_size=self.ffn_hidden_size,
                  seq_length=self.seq_length, vocab_size=self.vocab_size,
                  make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
                  init_method_std=self.init_method_std, norm_epsilon=self.norm_epsilon,
                  rotary_base=self.rotary_base, recompute_num_layers=self.recompute_num_layers)
        _positive("model", head_dim=self.head_dim, rope_scaling_factor=self.rope_scaling_factor,
                  sliding_window=self.sliding_window)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}")
        if not self.family:
            raise ConfigError("model.family must name a model family, e.g. 'llama'")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"model.transformer_impl={self.transformer_impl!r} is not one of "
                              f"{TRANSFORMER_IMPLS}")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ConfigError(f"model.recompute_granularity={self.recompute_granularity!r} is "
                              "not one of (None, 'selective', 'full')")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be in [0, 1)")

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)


def check_weight_params(weighting: str, gamma: float, sigma: float, prefix: str = "") -> None:
    """Argument checks that every rank evaluates identically: safe to raise before collectives.
    ``prefix`` names the fields as the caller knows them (``"loss."`` for the config)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}")
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"{prefix}gamma={gamma} must be a finite number >= 0 (the paper uses 1)")
    if not math.isfinite(sigma):
        raise ValueError(f"{prefix}sigma={sigma} must be finite (the paper uses 1)")
    if weighting == "mile" and sigma < 0 and gamma != int(gamma):
        raise ValueError(
            f"{prefix}sigma={sigma} < 0 needs an integer {prefix}gamma (got {gamma}): "
            "(sigma + H) ** gamma is NaN wherever the entropy H < -sigma"
        )


@dataclass
class LossConfig:
    """Which objective the model trains on, and how it is normalised."""

    type: str = "mile"
    """``cross_entropy`` (megatron-core's vocab_parallel_cross_entropy), ``focal``
    (w = (1 - p_target) ** gamma) or ``mile`` (w = (sigma + entropy) ** gamma)."""

    gamma: float = 1.0
    """Exponent of the token weight, >= 0. 0 turns focal and MiLe into cross-entropy.
    The paper's default is 1."""

    sigma: float = 1.0
    """MiLe only: offset added to the entropy before the power. The paper's default is 1.
    Negative values need an integer gamma."""

    normalization: str = "paper"
    """``paper``: alpha = 1 / mean(weight) per micro-batch, averaged over data-parallel ranks
    (the official code's semantics). ``global``: exact weighted mean
    sum(w * CE) / sum(w) over the global batch."""

    validate_targets: bool = True
    """Check that every target id is inside the vocabulary (one host sync per micro-batch on
    GPU). Turn off only for benchmarking trusted data."""

    fused_output_layer: Optional[bool] = None
    """Compute the output layer and the loss together, a chunk of tokens at a time
    (``linear_weighted_cross_entropy``), so the ``[s, b, v/tp]`` logits and their gradient
    never exist; values and gradients equal the unfused path's within fp32 rounding, for
    every parallel layout. null (the default): on in fp32 and bf16, off in fp16. In fp32 and
    bf16 the trainer hands the loss mask to the fused loss, which then forms the gradients in
    forward (3 GEMMs of the output layer's size, as unfused; at TP > 1 with two small
    all-reduces per chunk) and only scales them in backward: measured at 0.73-1.00x the
    unfused path's time as a function (v = 32000 and 128000, TP 1 and 2), 1.17x its tokens/s
    and 0.55x its peak memory in a training step at v = 128000, 0.21x the function's peak
    (docs/benchmarks.md, CPU). fp16 recomputes the logits in backward (one extra GEMM: its
    gradients need the loss scale before rounding; ``fused_linear.PRECOMPUTE_DTYPES``), so
    it is off there unless set true (where the logits' memory is the limit). With it on,
    ``cross_entropy`` runs as weight-1 CE in the same kernel, not megatron-core's CE; false
    gives megatron's output layer and the separate loss."""

    @property
    def weighting(self) -> str:
        """The ``weighting`` argument of the loss functions for this ``type``."""
        return {"cross_entropy": "none", "focal": "focal", "mile": "mile"}[self.type]

    def __post_init__(self) -> None:
        if self.type not in LOSS_TYPES:
            raise ValueError(f"loss.type={self.type!r} is not one of {LOSS_TYPES}")
        check_weight_params("mile" if self.type == "mile" else "focal", self.gamma, self.sigma,
                            prefix="loss.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"loss.normalization={self.normalization!r} is not one of {NORMALIZATIONS}"
            )


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes. Data parallel size is derived:
    world_size / (tensor x pipeline x context)."""

    tensor_model_parallel_size: int = 1
    """TP: splits attention heads, MLP and the vocabulary (the loss reduces over it)."""
    pipeline_model_parallel_size: int = 1
    """PP: splits layers into stages run with the 1F1B schedule."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage for the interleaved schedule (None: plain 1F1B)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in norm/dropout regions (needs TP > 1)."""
    context_parallel_size: int = 1
    """CP: each rank of a CP group holds 2 of the 2 x CP equal chunks of every sequence
    (megatron-core's load-balanced order: rank r has chunks r and 2CP-1-r); attention sees the
    whole sequence through Transformer Engine's CP, or on the local layer spec through an
    all-gather of keys and values (CPU and GPU; see docs/launching.md). model.seq_length
    must be a multiple of 2 x CP."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state and fp32 master weights over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    distributed_timeout_minutes: float = 10.0
    """Longest wait on another rank (Megatron-LM's --distributed-timeout-minutes): the process
    group timeout, and the trainer's watchdog bound on any phase without progress (a step, an
    evaluation, a save). A rank that stalls longer exits with one line naming the iteration and
    phase (exit code 3), so a hung or dead peer cannot hold the job forever."""

    def __post_init__(self) -> None:
        _positive("parallel", tensor_model_parallel_size=self.tensor_model_parallel_size,
                  distributed_timeout_minutes=self.distributed_timeout_minutes,
                  pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                  virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
                  context_parallel_size=self.context_parallel_size)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel=true needs "
                              "parallel.tensor_model_parallel_size > 1")
        if self.virtual_pipeline_model_parallel_size and self.pipeline_model_parallel_size < 2:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size needs "
                              "parallel.pipeline_model_parallel_size >= 2")


DTYPES = ("fp32", "bf16", "fp16")
"""The values of ``precision.dtype`` (and of the evaluation tools' ``--dtype``)."""


@dataclass
class PrecisionConfig:
    """Numeric formats. The loss always computes in fp32, whatever the logits' dtype."""

    dtype: str = "bf16"
    """Parameter/activation dtype: 'fp32', 'bf16' (fp32 master weights in the optimizer) or
    'fp16' (plus dynamic loss scaling)."""
    fp8: Optional[str] = None
    """FP8 GEMMs through Transformer Engine: None, 'hybrid' (e4m3 forward, e5m2 backward) or
    'e4m3'. Needs model.transformer_impl='transformer_engine' and a GPU with FP8."""
    fp8_amax_history_len: int = 1024
    """Delayed-scaling recipe: amax history length."""
    fp8_amax_compute_algo: str = "max"
    """Delayed-scaling recipe: 'max' or 'most_recent'."""
    fp8_margin: int = 0
    """Delayed-scaling recipe: scaling-factor margin (powers of 2)."""
    initial_loss_scale: float = 65536.0
    """fp16 only: initial dynamic loss scale."""
    min_loss_scale: float = 1.0
    """fp16 only: floor of the dynamic loss scale."""
    loss_scale_window: int = 1000
    """fp16 only: iterations without overflow before the scale doubles."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"precision.dtype={self.dtype!r} is not one of {DTYPES}")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ConfigError(f"precision.fp8={self.fp8!r} is not one of (None, 'hybrid', 'e4m3')")
        if self.fp8_amax_compute_algo not in ("max", "most_recent"):
            raise ConfigError(f"precision.fp8_amax_compute_algo={self.fp8_amax_compute_algo!r} "
                              "is not one of ('max', 'most_recent')")
        _positive("precision", fp8_amax_history_len=self.fp8_amax_history_len,
                  initial_loss_scale=self.initial_loss_scale, min_loss_scale=self.min_loss_scale,
                  loss_scale_window=self.loss_scale_window)

    @property
    def torch_dtype(self):
        import torch

        return dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16)))[self.dtype]


@dataclass
class OptimizerConfig:
    """AdamW through megatron-core's optimizer, with its OptimizerParamScheduler."""

    lr: float = 3e-4
    """Peak learning rate (the paper: 3e-4)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 2000
    """Linear warm-up iterations (the paper: 2000)."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the lr decays to min_lr; None means training.train_iters."""
    lr_decay_style: str = "cosine"
    """'cosine', 'linear' or 'constant'."""
    weight_decay: float = 0.1
    """Decoupled weight decay (the paper: 0.1)."""
    adam_beta1: float = 0.9
    """Adam beta1 (the paper: 0.9)."""
    adam_beta2: float = 0.95
    """Adam beta2 (the paper: 0.95)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""

    def __post_init__(self) -> None:
        _positive("optimizer", lr=self.lr, lr_decay_iters=self.lr_decay_iters,
                  adam_eps=self.adam_eps)
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr="
                              f"{self.lr}]")
        if self.lr_warmup_iters < 0:
            raise ConfigError(f"optimizer.lr_warmup_iters={self.lr_warmup_iters} must be >= 0")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optimizer.lr_decay_style={self.lr_decay_style!r} is not one of "
                              "('cosine', 'linear', 'constant')")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optimizer.{name}={getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ConfigError(f"optimizer.weight_decay={self.weight_decay} and optimizer."
                              f"clip_grad={self.clip_grad} must be >= 0")


@dataclass
class TrainingConfig:
    """Batch sizes, length of the run, evaluation and logging cadence."""

    micro_batch_size: int = 2
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step: micro_batch_size x data-parallel size x micro-batches."""
    train_iters: int = 100
    """Optimizer steps."""
    seed: int = 1234
    """Seed of initialisation, dropout and data order; in [0, 2**32)."""
    log_interval: int = 10
    """Iterations between console/TensorBoard logs."""
    eval_interval: int = 100
    """Iterations between validation runs (also run at the end); 0 disables."""
    eval_iters: int = 10
    """Global batches per validation run."""
    exit_on_signal: bool = True
    """On SIGTERM/SIGUSR1/SIGINT: finish the iteration, save a checkpoint, exit 0 (for
    requeue). A second SIGTERM/SIGINT exits at once, without saving."""
    exit_duration_in_mins: Optional[float] = None
    """Save a checkpoint and exit 0 after the first iteration that ends this many minutes
    after the job started (Megatron-LM's --exit-duration-in-mins): the environment variable
    MILE_JOB_START_TIME (Unix seconds; examples/slurm/pretrain.sbatch sets it and derives this
    value from the job's time limit) or else the trainer's start, the earliest over ranks.
    Ranks decide together: the elapsed time rides on the per-iteration MAX all-reduce the
    trainer already does (no extra collective). None: no limit."""
    exit_interval: Optional[int] = None
    """Save a checkpoint and exit 0 at the first iteration of this run that is a multiple of
    this (Megatron-LM's --exit-interval), e.g. to train a long schedule in slices of jobs.
    None: off."""
    on_non_finite: str = "stop"
    """An iteration whose gradient norm or loss is NaN/inf: its update is never applied (the
    norm is checked before the optimizer step, as Megatron-LM's --check-for-nan-in-loss-and-grad
    does), and no checkpoint is ever written from non-finite parameters. "stop": exit 1 naming
    the iteration; the last published checkpoint is intact. "skip": count the iteration as
    skipped in the log and go on, stopping after max_consecutive_skips in a row. (fp16's loss
    scaler skips its overflow steps in either mode, lowering the scale, as megatron does.)"""
    max_consecutive_skips: int = 10
    """With on_non_finite="skip": this many non-finite iterations in a row stop the run (the
    data or the learning rate is at fault, not a rare spike)."""

    def __post_init__(self) -> None:
        if self.on_non_finite not in ("stop", "skip"):
            raise ConfigError(f"training.on_non_finite={self.on_non_finite!r} must be 'stop' or "
                              "'skip'")
        _positive("training", micro_batch_size=self.micro_batch_size,
                  max_consecutive_skips=self.max_consecutive_skips,
                  exit_duration_in_mins=self.exit_duration_in_mins,
                  exit_interval=self.exit_interval,
                  global_batch_size=self.global_batch_size, train_iters=self.train_iters,
                  log_interval=self.log_interval)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"training.seed={self.seed} must be in [0, 2**32) (numpy's seed "
                              "range); pick e.g. 1234")
        if self.eval_interval < 0 or self.eval_iters < 0:
            raise ConfigError(f"training.eval_interval={self.eval_interval} and training."
                              f"eval_iters={self.eval_iters} must be >= 0")


@dataclass
class CheckpointConfig:
    """Where checkpoints go and where a run resumes from."""

    save: Optional[str] = None
    """Directory to save checkpoints into (None: never save)."""
    save_interval: Optional[int] = None
    """Iterations between saves; the last iteration is always saved when save is set."""
    load: Optional[str] = None
    """Directory to resume from. It MUST hold a complete checkpoint: a missing or corrupt one
    is an error, never a silent fresh start."""
    auto_resume: bool = True
    """If load is unset: resume from save when it holds a complete checkpoint, else start
    fresh (what requeued Slurm jobs need)."""
    load_optimizer: bool = True
    """Restore optimizer and scheduler state. false: weights, step and data position only
    (fresh Adam moments, lr schedule placed at the step), e.g. to resume in another TP/PP
    layout: weights reshard freely, the distributed optimizer's state does not."""
    verify_checksums: bool = True
    """Record the SHA-256 digest of every checkpoint file at save, and check them before a load
    (each rank hashes a share), so corrupted bytes are refused, not trained on. false: neither
    (a checkpoint saved so is loaded unverified, with a warning). Cost: docs/benchmarks.md."""
    allow_vocab_change: bool = False
    """Resume from a checkpoint trained with another vocabulary (its size and the digest of the
    tokenizer's id -> piece table are kept in every checkpoint and compared on resume; a
    mismatch is an error by default). true: a deliberate change, e.g. a vocabulary extension:
    the embedding and output rows of the common ids are loaded, new rows start at zero; with
    another size it needs checkpoint.load_optimizer=false (the Adam state has the old shape)."""
    lock_stale_minutes: float = 5.0
    """The run saving into checkpoint.save holds save/mile.lock (refreshed every 1/10 of this);
    another run is refused. A lock of a process gone from this host, or of this Slurm job
    before its requeue, is taken over at once; a lock of another host only once it has not
    been refreshed for this long (its holder's node died or froze: a frozen holder that wakes
    up later refuses to publish)."""
    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, keep the checkpoint's learning-rate schedule (lr, min_lr, warm-up, decay
    iterations and style, weight decay) even where the config differs (Megatron-LM's
    --use-checkpoint-opt_param-scheduler). By default a difference is an error."""
    init_from_hf: Optional[str] = None
    """A local Hugging Face folder of a known model family (docs/models.md: LlamaForCausalLM,
    Qwen2ForCausalLM; config.json + safetensors, single or sharded; model.family comes from
    config.json): a run that starts without a checkpoint of its own loads its weights into the
    configured layout (any TP/PP/VPP/DP), with a fresh optimizer and the configured schedule;
    a resumed run ignores it. The model's shape fields (hidden_size, num_layers, heads,
    num_query_groups, ffn_hidden_size, norm_epsilon, rotary_base, untie_embeddings,
    vocab_size) are taken from config.json: set in the config to anything but their default,
    they must agree with it. Biases, rope scaling, MoE, sliding windows and other
    architectures are refused. See README, "Continue pretraining a Hugging Face model"."""
    override_opt_param_scheduler: bool = False
    """On resume, take the schedule from the config instead of the checkpoint, e.g. to extend
    training.train_iters (Megatron-LM's --override-opt_param-scheduler); the step count still
    comes from the checkpoint. By default a difference is an error."""

    async_save: bool = False
    """Write checkpoints in the background (Megatron-LM's --async-save, torchtitan's async
    mode): at a save the ranks copy their state to host memory (the stall: one copy of the
    rank's model, optimizer and RNG state, about the checkpoint's size per rank, held until
    the write ends) and training goes on while a thread writes the files and hashes them; at a
    later step boundary the ranks publish it exactly as a synchronous save does (checksums,
    rename, tracker last). At most one save is in flight: the next waits for it, and a run
    that stops (end, signal, time limit) finishes it first. A failed background save ends the
    run with one line, the previous checkpoint still the latest. Cost: docs/benchmarks.md."""
    keep_last: Optional[int] = None
    """Keep only the newest N complete checkpoints in checkpoint.save: after each publish,
    global rank 0 removes older complete iter_N directories (one log line each). The
    published (latest) one is never removed. None or 0: keep all."""

    def __post_init__(self) -> None:
        _positive("checkpoint", save_interval=self.save_interval,
                  lock_stale_minutes=self.lock_stale_minutes)
        if self.keep_last is not None and self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 0 (0 or null: "
                              "keep every checkpoint)")
        if self.use_checkpoint_opt_param_scheduler and self.override_opt_param_scheduler:
            raise ConfigError("checkpoint.use_checkpoint_opt_param_scheduler and checkpoint."
                              "override_opt_param_scheduler are exclusive: set one")


WANDB_MODES = ("online", "offline", "disabled")
"""The values of ``logging.wandb_mode`` (wandb's own ``mode`` argument)."""


@dataclass
class LoggingConfig:
    """Where each logged step's metrics go (docs/observability.md). The console line is
    always written; every other sink is off until named here. One rank writes them all: the
    last global rank, which is on the last pipeline stage, where the loss is."""

    tensorboard_dir: Optional[str] = None
    """TensorBoard event directory (None: no TensorBoard events)."""
    metrics_jsonl: Optional[str] = None
    """A JSON Lines file: one object per logged step ({"kind": "train", "iteration", ...every
    metric of the console line}) and per validation ({"kind": "valid", ...}); appended to, so a
    resumed run continues the file. None: not written."""
    wandb_project: Optional[str] = None
    """Weights & Biases project to log to (needs the optional `wandb` package: pip install
    megatron-mile[wandb]). None: no wandb."""
    wandb_entity: Optional[str] = None
    """wandb team or user owning the project (None: the logged-in user's default)."""
    wandb_run_name: Optional[str] = None
    """Display name of the wandb run (None: wandb picks one)."""
    wandb_mode: str = "online"
    """"online" (streams to the server; needs `wandb login` or WANDB_API_KEY), "offline"
    (writes the run under wandb_dir only, no network; upload later with `wandb sync`) or
    "disabled"."""
    wandb_dir: Optional[str] = None
    """Directory wandb writes its run files into (None: wandb's default, ./wandb)."""
    peak_tflops: Optional[float] = None
    """The device's peak dense TFLOP/s, for MFU in the progress line (model FLOPs per second
    per device / this peak). None: looked up by the GPU's name (H100, H200, A100, B200, ...;
    megatron_mile/throughput.py); no MFU on CPU or an unknown GPU."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb_mode={self.wandb_mode!r} must be one of "
                              f"{', '.join(WANDB_MODES)}")
        _positive("logging", peak_tflops=self.peak_tflops)


@dataclass
class ProfileConfig:
    """torch.profiler traces of a window of iterations on chosen ranks, and NVTX ranges for
    Nsight Systems (docs/observability.md)."""

    enabled: bool = False
    """Record a torch.profiler trace (CPU activity, and CUDA kernels on GPU) of iterations
    start_step .. end_step - 1 on the ranks listed in ranks. Outside that window the profiler
    is not running and costs nothing."""
    start_step: int = 2
    """First profiled iteration (numbered as in the log, from 1); later than the first so the
    warm-up is not in the trace."""
    end_step: int = 4
    """The profiler stops before this iteration (exclusive, as Megatron-LM's
    --profile-step-end); greater than start_step."""
    ranks: list[int] = field(default_factory=lambda: [0])
    """Global ranks that record a trace (each a file of its own)."""
    dir: str = "profile"
    """Directory of the traces: rank<r>.<time>.pt.trace.json per profiled rank, Chrome trace
    JSON that both TensorBoard's profiler plugin (`tensorboard --logdir <dir>`) and
    chrome://tracing / Perfetto open."""
    record_shapes: bool = False
    """Record operator input shapes in the trace (larger trace, more overhead)."""
    nvtx: bool = False
    """On GPU: NVTX ranges around each micro-batch's forward, backward and loss, the pipeline
    sends/receives, the optimizer step, and cudaProfilerStart/Stop around the profile window,
    for `nsys profile --capture-range=cudaProfilerApi`. Ignored on CPU."""

    def __post_init__(self) -> None:
        _positive("profile", start_step=self.start_step)
        if self.end_step <= self.start_step:
            raise ConfigError(f"profile.end_step={self.end_step} must be greater than "
                              f"profile.start_step={self.start_step} (the window is start_step "
                              "..end_step - 1)")
        if not self.ranks or any(r < 0 for r in self.ranks):
            raise ConfigError(f"profile.ranks={self.ranks} must be a non-empty list of global "
                              "ranks (>= 0), e.g. [0]")


@dataclass
class TrainConfig:
    """A whole run. Load with :func:`load_config`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Training objective."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric formats."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Run length, batches, cadence."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Profiling."""

    def data_parallel_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                              * p.context_parallel_size)

    def validate(self, world_size: int) -> None:
        """Cross-section checks for a run on ``world_size`` processes."""
        p, m, t = self.parallel, self.model, self.training
        model_parallel = (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                          * p.context_parallel_size)
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor x pipeline x context "
                f"parallel = {p.tensor_model_parallel_size} x {p.pipeline_model_parallel_size} "
                f"x {p.context_parallel_size}; launch a multiple of {model_parallel} processes")
        if m.num_attention_heads % p.tensor_model_parallel_size:
            raise ConfigError(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}")
        groups = m.num_query_groups or m.num_attention_heads
        if groups % p.tensor_model_parallel_size:
            raise ConfigError(f"model.num_query_groups={groups} is not divisible by "
                              f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}")
        stages = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
        if m.num_layers % stages:
            raise ConfigError(
                f"model.num_layers={m.num_layers} is not divisible by the {stages} pipeline "
                "stages (pipeline_model_parallel_size x virtual_pipeline_model_parallel_size)")
        dp = self.data_parallel_size(world_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"training.global_batch_size={t.global_batch_size} is not divisible by "
                f"training.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}")
        if p.virtual_pipeline_model_parallel_size:
            num_mb = t.global_batch_size // (t.micro_batch_size * dp)
            if num_mb % p.pipeline_model_parallel_size:
                raise ConfigError(
                    f"the interleaved schedule needs the {num_mb} micro-batches per step to be "
                    f"a multiple of parallel.pipeline_model_parallel_size="
                    f"{p.pipeline_model_parallel_size}")
        cp = p.context_parallel_size
        if m.seq_length % (2 * cp):
            raise ConfigError(
                f"model.seq_length={m.seq_length} is not divisible by 2 x parallel."
                f"context_parallel_size = {2 * cp}: each CP rank holds 2 of 2 x {cp} equal "
                "chunks of the sequence")
        if self.profile.enabled and max(self.profile.ranks) >= world_size:
            raise ConfigError(f"profile.ranks={self.profile.ranks} names a rank outside the "
                              f"world of {world_size} processes; use ranks 0..{world_size - 1}")
        if p.sequence_parallel and (m.seq_length // cp) % p.tensor_model_parallel_size:
            raise ConfigError(
                f"model.seq_length / parallel.context_parallel_size = {m.seq_length // cp} is "
                "not divisible by parallel.tensor_model_parallel_size="
                f"{p.tensor_model_parallel_size} (parallel.sequence_parallel=true)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading

def _resolve_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a shipped config "
                      f"(shipped: {', '.join(names)})")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c.d=[x, y]"]`` -> nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if value is None:
        raise ConfigError(f"{where}=None is not allowed (expected {getattr(tp, '__name__', tp)})")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value} must be a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}={value!r} must be a string")
        return str(value)
    return value


def _build(cls: type, values: dict, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(f'{where}.{u}'.lstrip('.') for u in unknown)}; "
                          f"{where or 'the config'} has: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        path = f"{where}.{name}".lstrip(".")
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, path)
        else:
            kwargs[name] = _coerce(value, tp, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # section validators raise ValueError naming the field
        # DataConfig (also usable on its own) names fields "DataConfig.x": say "data.x" here.
        raise ConfigError(str(e).replace(f"{cls.__name__}.", f"{where}.")) from None


def config_from_dict(tree: dict, overrides: Optional[list[str]] = None) -> TrainConfig:
    """A TrainConfig from a nested dict (e.g. the one a checkpoint saved) plus overrides;
    field checks run, the layout check (:meth:`TrainConfig.validate`) does not."""
    return _build(TrainConfig, _merge(tree, parse_overrides(overrides or [])), "")


def read_config_tree(name_or_path: Optional[str],
                     overrides: Optional[list[str]] = None) -> dict:
    """The nested dict of a YAML config (a path or a shipped name; None: no file, the
    defaults) with the overrides merged in, before any check: what :func:`load_config`
    builds its TrainConfig from."""
    if name_or_path is None:  # the dataclass defaults only
        return parse_overrides(overrides or [])
    path = _resolve_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: "
                          f"{' '.join(str(e).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(
            f"config file {path}: the top level is a YAML {type(tree).__name__}, not a mapping "
            "of sections; write it as `model:`, `data:`, `training:` ... each with its "
            "`field: value` lines (see megatron_mile/configs/tiny.yaml)")
    return _merge(tree, parse_overrides(overrides or []))


def load_config(name_or_path: Optional[str], overrides: Optional[list[str]] = None,
                world_size: Optional[int] = None) -> TrainConfig:
    """Read a YAML config (a path or a shipped name), apply overrides, validate.

    ``world_size`` defaults to ``$WORLD_SIZE`` (1 when unset), so that the layout is checked
    before any process group exists. Nothing outside the files is read: a run resolves
    ``checkpoint.init_from_hf``'s shape and checks the kernels where it is set up
    (:func:`megatron_mile.run_config.load_run_config`, the trainer); with
    ``checkpoint.init_from_hf`` the layout check waits for that shape too.
    """
    cfg = _build(TrainConfig, read_config_tree(name_or_path, overrides), "")
    if not cfg.checkpoint.init_from_hf:  # else the shape is config.json's, known at setup
        cfg.validate(world_size if world_size is not None
                     else int(os.environ.get("WORLD_SIZE", "1")))
    return cfg
