"""The GPT model on megatron-core, with the configured loss hooked in once; its layer
choices (norm, biases, qk-norm, gated MLP) come from the model family
(``model.family``, ``megatron_mile/models/``).

Shape legend: b micro-batch, s sequence, v/tp vocabulary shard.

``MileGPTModel.compute_language_model_loss`` is megatron-core's single place where a model
turns logits into a loss. It returns a :class:`~megatron_mile.loss.WeightedCrossEntropy` of
``[b, s]`` tensors: the differentiable weighted CE and the detached per-token statistics the
normalisation and the logs need, so nothing is stashed on the module between the forward and
the loss function. On the last pipeline stage megatron-core's schedules hand the model's
output to ``loss_func`` untouched (``forward_step_calc_loss`` in
megatron/core/pipeline_parallel/schedules.py), so it need not be a tensor there; the bf16
wrapper ``Float16Module`` passes it through too, being no tuple (see ``WeightedCrossEntropy``).

With ``loss.fused_output_layer`` (on by default in fp32 and bf16: :func:`fused_output_layer`)
the output layer and the loss run as one chunked Function
(:func:`~megatron_mile.loss.linear_weighted_cross_entropy`); see :class:`MileGPTModel` for how
it is hooked in without copying megatron-core's ``_postprocess``.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

from megatron_mile.config import ConfigError, TrainConfig
from megatron_mile.context_parallel import ContextParallelDotProductAttention
from megatron_mile.fusions import Kernels, fusion_settings, resolve_transformer_impl
from megatron_mile.models import get_family
from megatron_mile.loss import (
    DeferredLogits,
    LossConfig,
    LossNormalizer,
    WeightedCrossEntropy,
    fused_token_losses,
    token_losses,
)
from megatron_mile.loss.fused_linear import forms_gradients_in_forward


def fused_output_layer(cfg: TrainConfig) -> bool:
    """``loss.fused_output_layer`` resolved: as set, or where it is None (the default) on
    exactly where the fused loss forms its gradients in forward for the run's dtype and TP
    size (:func:`~megatron_mile.loss.fused_linear.forms_gradients_in_forward`: fp32 and bf16
    at TP 1, 2, 4, 8), off elsewhere (fp16, whose backward would recompute the logits)."""
    if cfg.loss.fused_output_layer is not None:
        return cfg.loss.fused_output_layer
    return forms_gradients_in_forward(cfg.precision.torch_dtype,
                                      cfg.parallel.tensor_model_parallel_size)


def padded_vocab_size(vocab_size: int, cfg: TrainConfig) -> int:
    """Pad so every TP rank holds the same number of rows, a multiple of the padding unit."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(cfg: TrainConfig, use_cpu_initialization: bool) -> TransformerConfig:
    """megatron-core's TransformerConfig for ``cfg``: the family's choices (LLaMA: RMSNorm,
    SwiGLU, no biases; Qwen2's q/k/v biases, Qwen3's q/k norms) and the run's sizes (head
    width, sliding window included), layout and precision.

    The fusion flags are those :func:`megatron_mile.fusions.fusion_settings` decides for the
    kernels this process can load (all off on CPU).
    """
    m, p, prec = cfg.model, cfg.parallel, cfg.precision
    family = get_family(m.family)
    kernels = Kernels.detect()
    impl = resolve_transformer_impl(m.transformer_impl, kernels)
    fp8 = {}
    if prec.fp8:
        fp8 = dict(fp8=prec.fp8, fp8_margin=prec.fp8_margin,
                   fp8_amax_history_len=prec.fp8_amax_history_len,
                   fp8_amax_compute_algo=prec.fp8_amax_compute_algo)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_size,
        normalization=family.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=family.gated_linear_unit,
        activation_func=F.silu,
        add_bias_linear=family.add_bias_linear,
        add_qkv_bias=family.add_qkv_bias,
        qk_layernorm=family.qk_layernorm,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.context_parallel_size,
        params_dtype=prec.torch_dtype,
        pipeline_dtype=prec.torch_dtype,
        bf16=prec.dtype == "bf16",
        fp16=prec.dtype == "fp16",
        recompute_granularity=m.recompute_granularity,
        recompute_method="uniform" if m.recompute_granularity == "full" else None,
        recompute_num_layers=m.recompute_num_layers if m.recompute_granularity == "full" else None,
        # "global" normalisation divides by the summed weights (loss/reduction.py).
        calculate_per_token_loss=LossNormalizer.uses_per_token_loss(cfg.loss.normalization),
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        **fusion_settings(impl, kernels),
        **_attention_window(m, impl),
        # Interleaved 1F1B: unbatched, overlapped p2p, as Megatron-LM sets it (batched p2p
        # pairs the wrong messages at PP=2; see check_pipeline_config).
        overlap_p2p_comm=bool(p.virtual_pipeline_model_parallel_size),
        batch_p2p_comm=not p.virtual_pipeline_model_parallel_size,
        **fp8,
    )


def _attention_window(m: Any, impl: str) -> dict[str, Any]:
    """``window_size`` for a sliding window shorter than the sequence (Transformer Engine
    only: TE's ``(left, right)`` = ``(window - 1, 0)``, the token and the window - 1 before it,
    as transformers' Mistral mask); nothing for a window that covers the sequence, which is
    plain causal attention. :func:`megatron_mile.fusions.check_kernels` refuses a shorter
    window without TE before any model is built."""
    if m.sliding_window is None or m.sliding_window >= m.seq_length:
        return {}
    if impl != "transformer_engine":
        raise ConfigError(f"model.sliding_window={m.sliding_window} < model.seq_length="
                          f"{m.seq_length} needs model.transformer_impl=transformer_engine")
    return {"window_size": (m.sliding_window - 1, 0)}


def check_pipeline_config(config: Any) -> None:
    """Reject pipeline settings that silently mix up p2p messages.

    The interleaved schedule with PP=2 must not use batched p2p (``batch_p2p_comm=True``, the
    ModelParallelConfig default): there prev and next peer are the same rank, and
    ``_batched_p2p_ops`` (megatron/core/pipeline_parallel/p2p_communication.py) posts
    [send_prev, send_next] on one rank against [recv_prev, recv_next] on the other, so an
    activation lands in the gradient buffer. Seen on gloo (wrong losses, no error); the
    ordering argument is the same for NCCL (not verified here). Use ``overlap_p2p_comm=True,
    batch_p2p_comm=False`` as Megatron-LM does for interleaving (:func:`transformer_config`
    does).

    ``config`` is a megatron ``ModelParallelConfig`` / ``TransformerConfig``. Issues no
    collectives.

    Raises:
        ValueError: interleaved pipeline (virtual_pipeline_model_parallel_size set) at PP=2
            with ``batch_p2p_comm=True``.
    """
    if (config.virtual_pipeline_model_parallel_size
            and config.pipeline_model_parallel_size == 2 and config.batch_p2p_comm):
        raise ValueError(
            "interleaved pipeline with pipeline_model_parallel_size=2 needs "
            "batch_p2p_comm=False (and overlap_p2p_comm=True, as Megatron-LM sets it): batched "
            "p2p pairs the send_prev of one stage with the recv_prev of the other"
        )


class RMSNorm(torch.nn.Module):
    """RMSNorm for the local (non-TE) spec that, unlike megatron's WrappedTorchNorm, supports
    sequence parallelism: its weight is marked ``sequence_parallel`` so megatron's
    ``finalize_model_grads`` all-reduces its gradient over the TP group (each rank saw only
    its slice of the sequence). Computes in fp32, returns the input dtype."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x_sbh: torch.Tensor) -> torch.Tensor:
        x32 = x_sbh.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x_sbh.dtype) * self.weight


class LayoutInvariantTransformerLayer(TransformerLayer):
    """A TransformerLayer whose initial weights depend on the seed and its global layer number
    only, not on which pipeline stage builds it.

    It reseeds the CPU generator before building. With ``use_cpu_initialization`` (CPU runs),
    megatron draws every full weight from that generator and slices it per TP rank, so TP=1,
    TP=2, PP=1 and PP=2 start from the same model: the layout-equivalence tests rely on it.
    The embedding (built before any layer) and the output layer (after the last) then see the
    same stream in every layout too. On GPU megatron initialises on the device from its own
    RNG tracker, so this only fixes the order of the CPU stream there.
    """

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1,
                 *args, init_seed: int = 0, **kwargs):
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        global_number = layer_number + get_transformer_layer_offset(
            config, kwargs.get("vp_stage"), pp_rank)
        torch.manual_seed(init_seed * 1_000_003 + global_number)
        super().__init__(config, submodules, layer_number, *args, **kwargs)


def layer_spec(cfg: TrainConfig, config: TransformerConfig, vp_stage: Optional[int] = None):
    """Transformer Engine's spec, or megatron's local spec with :class:`RMSNorm` norms; the
    latter as a block spec (layers of this pipeline stage + the final norm), whose attention
    is :class:`~megatron_mile.context_parallel.ContextParallelDotProductAttention` when
    ``context_parallel_size > 1`` (TE's spec runs TE's own context parallelism).
    ``model.transformer_impl: auto`` is resolved by :mod:`megatron_mile.fusions`."""
    if resolve_transformer_impl(cfg.model.transformer_impl, Kernels.detect()) == "transformer_engine":
        try:
            from megatron.core.models.gpt.gpt_layer_specs import (
                get_gpt_layer_with_transformer_engine_spec,
            )
            import transformer_engine  # noqa: F401  (availability: the spec imports it lazily)
        except ImportError as e:
            raise ConfigError(
                "model.transformer_impl=transformer_engine needs Transformer Engine "
                f"({e}); use NVIDIA's PyTorch container or model.transformer_impl=local"
            ) from None
        return get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=get_family(cfg.model.family).qk_layernorm)
    family = get_family(cfg.model.family)
    if family.normalization != "RMSNorm":
        raise ConfigError(f"model.family={family.name!r}: the local layer spec implements "
                          f"RMSNorm only, not {family.normalization}")
    layer = get_gpt_layer_local_spec(normalization=family.normalization,
                                     qk_layernorm=family.qk_layernorm)
    layer.module = LayoutInvariantTransformerLayer
    layer.params = {**(layer.params or {}), "init_seed": cfg.training.seed}
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    if family.qk_layernorm:  # per head, inside the TP region: megatron sums their grads over TP
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    if config.context_parallel_size > 1:  # megatron's local attention refuses CP
        layer.submodules.self_attention.submodules.core_attention = \
            ContextParallelDotProductAttention
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm)


class MileGPTModel(GPTModel):
    """GPTModel whose loss is the configured objective (CE, focal or MiLe) over the
    vocabulary-parallel logits, reduced over megatron-core's tensor-parallel group.

    ``loss.fused_output_layer``: when a forward has labels, the output layer's forward is
    replaced, for that call only, by one that returns :class:`DeferredLogits` (its input and
    weight) instead of logits, and :meth:`compute_language_model_loss` runs the fused output
    layer + loss on them. Everything else in megatron-core's ``GPTModel._postprocess``
    (tied-weight selection, MTP, the inference paths) stays megatron's own: this relies only
    on three public facts of its API -- ``forward`` takes ``labels``, the output layer is
    called as ``output_layer(hidden, weight=..., runtime_gather_output=...)`` and its result
    goes, untouched, to ``compute_language_model_loss`` when labels are given -- instead of a
    copy of ``_postprocess`` that would drift between releases. Calls without labels
    (evaluation, generation) get real logits. A ``loss_mask`` given to ``forward`` (the
    trainer passes the one ``loss_func`` applies) travels in :class:`DeferredLogits` as the
    fused loss's ``grad_factor``: in fp32 and bf16 it lets the loss form its gradients in
    forward (3 GEMMs, no recompute; see :func:`~megatron_mile.loss.linear_weighted_cross_entropy`).
    """

    _FORWARD_SIGNATURE = inspect.signature(GPTModel.forward)

    def __init__(self, *args, loss_config: LossConfig, valid_vocab_size: Optional[int] = None,
                 fused_output_layer: bool = False, **kwargs):
        """``valid_vocab_size``: the real vocabulary (the tokenizer's, or model.vocab_size)
        before padding to ``vocab_size``; the padded logit columns count nowhere in the loss
        (:func:`megatron_mile.loss.token_losses`). None: every row is real.
        ``fused_output_layer``: ``loss.fused_output_layer`` resolved (:func:`fused_output_layer`)."""
        super().__init__(*args, **kwargs)
        if getattr(self.config, "mtp_num_layers", None):
            raise ConfigError("multi-token prediction is not supported with MileGPTModel")
        self.loss_config = loss_config
        self.valid_vocab_size = valid_vocab_size
        self.fused_output_layer = fused_output_layer and self.post_process
        if self.fused_output_layer:
            if self.output_layer.bias is not None or self.config.defer_embedding_wgrad_compute:
                raise ConfigError("loss.fused_output_layer needs an output layer without bias "
                                  "and defer_embedding_wgrad_compute off")

    def forward(self, *args, **kwargs):  # type: ignore[override]
        """megatron-core's forward; with the fused loss and labels, the output layer defers
        its matmul to the loss (see the class docstring)."""
        if not self.fused_output_layer:
            return super().forward(*args, **kwargs)
        call = self._FORWARD_SIGNATURE.bind(self, *args, **kwargs).arguments
        if call.get("labels") is None or call.get("runtime_gather_output"):
            return super().forward(*args, **kwargs)
        layer = self.output_layer
        layer.forward = partial(_deferred_output_layer, layer,  # this call only
                                loss_mask=call.get("loss_mask"))
        try:
            return super().forward(*args, **kwargs)
        finally:
            del layer.forward

    def compute_language_model_loss(  # type: ignore[override]
        self, labels: torch.Tensor, logits: torch.Tensor | DeferredLogits
    ) -> WeightedCrossEntropy:
        """labels ``[b, s]``, logits ``[s, b, v/tp]`` (or the fused path's
        :class:`DeferredLogits`) -> per-token statistics, each ``[b, s]`` fp32; only
        ``weighted_ce`` carries a gradient. (megatron-core's GPTModel returns one ``[b, s]``
        loss tensor here; the module docstring says why a structure can pass.)

        Collectives: those of :func:`megatron_mile.loss.token_losses` on the TP group (2
        all-reduces for focal/MiLe, 3 for megatron's CE; none in backward), or of
        :func:`megatron_mile.loss.linear_weighted_cross_entropy` (2 all-reduces, plus the
        output layer's own SP all-gather and input-gradient all-reduce / reduce-scatter).
        """
        labels_sb = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], as the logits
        if isinstance(logits, DeferredLogits):
            stats_sb = fused_token_losses(logits, labels_sb, self.loss_config,
                                          valid_vocab_size=self.valid_vocab_size)
        else:
            stats_sb = token_losses(logits, labels_sb, self.loss_config,
                                    tp_group=parallel_state.get_tensor_model_parallel_group(),
                                    valid_vocab_size=self.valid_vocab_size)
        # [s, b] -> [b, s] as megatron's labels and loss mask; views, the loss only reduces them.
        return stats_sb.map(lambda t_sb: t_sb.transpose(0, 1))


def _deferred_output_layer(layer, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                           runtime_gather_output: Optional[bool] = None, *,
                           loss_mask: Optional[torch.Tensor] = None):
    """Stands in for ``ColumnParallelLinear.forward`` (same signature and ``(output, bias)``
    result) when the loss is fused: returns the layer's input and weight, no logits. The
    tied-embedding weight arrives as ``weight=``, as megatron passes it; ``loss_mask``
    ``[b, s]`` is the model forward's, bound by :meth:`MileGPTModel.forward`."""
    del runtime_gather_output  # None here: MileGPTModel.forward does not defer otherwise
    deferred = DeferredLogits(
        hidden=input_, weight=layer.weight if weight is None else weight,
        sequence_parallel=layer.sequence_parallel, tp_group=layer.tp_group,
        gradient_accumulation_fusion=layer.gradient_accumulation_fusion, loss_mask=loss_mask)
    return deferred, None


def build_model_chunk(cfg: TrainConfig, config: TransformerConfig, vocab_size: int,
                      pre_process: bool, post_process: bool,
                      vp_stage: Optional[int] = None,
                      valid_vocab_size: Optional[int] = None) -> MileGPTModel:
    """One pipeline chunk of the model (all of it when PP = 1); ``vocab_size`` is padded,
    ``valid_vocab_size`` the real vocabulary before padding."""
    return MileGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg, config, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=cfg.model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
        rope_scaling=cfg.model.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.model.rope_scaling_factor or 8.0,  # megatron's default, unused
        vp_stage=vp_stage,
        loss_config=cfg.loss,
        valid_vocab_size=valid_vocab_size,
        fused_output_layer=fused_output_layer(cfg),
    )


def num_parameters(cfg: TrainConfig, vocab_size: int) -> dict[str, int]:
    """Analytic parameter counts of the full (unsharded) model."""
    m = cfg.model
    h, L, ffn = m.hidden_size, m.num_layers, m.ffn_size
    head_dim = m.head_dim or h // m.num_attention_heads
    q = m.num_attention_heads * head_dim
    kv = (m.num_query_groups or m.num_attention_heads) * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * ffn + 2 * h  # qkv, proj, SwiGLU, 2 norms
    family = get_family(m.family)
    if family.add_qkv_bias:
        per_layer += q + 2 * kv
    if family.qk_layernorm:
        per_layer += 2 * head_dim
    embedding = vocab_size * h
    output = vocab_size * h if m.untie_embeddings else 0
    total = L * per_layer + embedding + output + h  # + final norm
    return {"total": total, "non_embedding": total - embedding, "per_layer": per_layer}


def flops_per_token(cfg: TrainConfig, vocab_size: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention scores (fwd + bwd)."""
    m = cfg.model
    matmul_params = num_parameters(cfg, vocab_size)["non_embedding"]
    if not m.untie_embeddings:
        matmul_params += vocab_size * m.hidden_size
    attention = 12 * m.num_layers * m.num_attention_heads * (
        m.head_dim or m.hidden_size // m.num_attention_heads) * m.seq_length
    return 6.0 * matmul_params + attention
