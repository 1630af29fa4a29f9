"""LLaMA (``LlamaForCausalLM``): RMSNorm, SwiGLU, RoPE, no biases, untied embeddings unless
config.json ties them. The paper's models and megatron-mile's shipped configs; Llama-2 (multi-
head), Llama-3 (GQA, rope_theta 500000) and Llama-3.1/3.2, whose RoPE frequencies are scaled
(``rope_type: llama3``, factor 8 and 32; 3.2 ties the embeddings): megatron-core's
``rope_scaling`` computes that scaling with fixed low/high frequency factors and original
context (:data:`LLAMA3_ROPE`, Llama-3.1's and 3.2's values); config.json asking for others is
refused naming the field.

Conventions of the table (checked by tests/test_export_hf.py, logits equal to 1e-4 in fp32):

* ``linear_qkv`` rows are grouped per query group g: ``[q heads of g (np/ng x hn); k_g (hn);
  v_g (hn)]``; HF's ``repeat_kv`` pairs query head j with kv head ``j // (np/ng)``, the same
  grouping, so q/k/v are the per-group slices in order (GQA needs no permutation).
* RoPE: megatron-core rotates halves (``rotary_interleaved=False``: ``[-x2, x1]``) with
  ``inv_freq = base ** (-2i/d)`` and ``cat(freqs, freqs)``: HF Llama's ``rotate_half``. So q/k
  rows are NOT permuted (the permutation HF's Meta-LLaMA converter applies is for Meta's
  interleaved checkpoints).
* SwiGLU: megatron computes ``silu(x W1a) * (x W1b)`` with ``[W1a; W1b] = linear_fc1``: gate =
  first half, up = second half.
* RMSNorm ``x * rsqrt(mean(x^2) + eps) * w`` with the model's ``norm_epsilon``; no biases.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_mile.errors import ConfigError
from megatron_mile.models.family import ModelFamily, TensorMap

__all__ = ["LLAMA", "LLAMA3_ROPE", "LLAMA_LAYER_TENSORS", "decoder_fields",
           "decoder_hf_config", "llama_hf_config", "llama_model_fields", "rope_fields"]

LLAMA_LAYER_TENSORS = (
    TensorMap("input_layernorm.weight", ("input_layernorm.weight",), "replicated",
              (("hidden",),), te="self_attention.linear_qkv.layer_norm_weight"),
    TensorMap("self_attention.linear_qkv.weight",
              ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
              "qkv", (("q_rows", "hidden"), ("kv_rows", "hidden"), ("kv_rows", "hidden"))),
    TensorMap("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "columns",
              (("hidden", "q_rows"),)),
    TensorMap("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated",
              (("hidden",),), te="mlp.linear_fc1.layer_norm_weight"),
    TensorMap("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
              "gate_up", (("ffn", "hidden"), ("ffn", "hidden"))),
    TensorMap("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "columns",
              (("hidden", "ffn"),)),
)

EMBEDDING = TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                      "vocab", (("vocab", "hidden"),))
FINAL_NORM = TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated",
                       (("hidden",),))
OUTPUT = TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", (("vocab", "hidden"),))
"""The global tensors of LLaMA-like decoders (HF's ``model.`` prefix, ``lm_head``)."""

DECODER_HF_FIELDS = (
    ("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_query_groups"),
    ("head_dim", "head_dim"), ("intermediate_size", "ffn_hidden_size"),
    ("rms_norm_eps", "norm_epsilon"), ("rope_theta", "rotary_base"),
    ("rope_scaling", "rope_scaling_factor"), ("sliding_window", "sliding_window"),
    ("tie_word_embeddings", "untie_embeddings"), ("vocab_size", "vocab_size"))
"""(config.json key, ModelConfig field) of :func:`decoder_fields`."""

_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
             "moe_intermediate_size")

LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
"""The ``rope_type: llama3`` parameters megatron-core computes with besides the factor
(``RotaryEmbedding._apply_scaling`` in megatron/core/models/common/embeddings/
rotary_pos_embedding.py takes only ``factor`` from GPTModel): Llama-3.1's and 3.2's."""


def rope_fields(hf: dict, path: str, scaling: Optional[str] = None) -> dict[str, Any]:
    """``rotary_base`` and ``rope_scaling_factor`` from config.json: transformers 4 writes
    ``rope_theta`` and ``rope_scaling`` at the top level, 5 one ``rope_parameters``. A
    scaling other than 'default' is accepted only when it is the family's ``scaling``
    ('llama3') with megatron-core's :data:`LLAMA3_ROPE`; ConfigError naming the field
    otherwise."""
    params = hf.get("rope_parameters") or {}
    factor = None
    for where in ("rope_scaling", "rope_parameters"):
        spec = hf.get(where)
        if not isinstance(spec, dict):
            continue
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind == "default":
            continue
        if kind != scaling:
            supported = "plain RoPE" + (f" and rope_type={scaling!r}" if scaling else " only")
            raise ConfigError(f"{path}: {where}.rope_type={kind!r} is not supported (this "
                              f"family implements {supported})")
        if isinstance(spec.get("factor"), bool) or not isinstance(spec.get("factor"),
                                                                   (int, float)) \
                or spec["factor"] < 1:
            raise ConfigError(f"{path}: {where}.factor={spec.get('factor')!r} must be a number "
                              f">= 1 for rope_type={kind!r}")
        for key, value in LLAMA3_ROPE.items():
            if spec.get(key) != value:
                raise ConfigError(f"{path}: {where}.{key}={spec.get(key)!r} is not supported "
                                  f"(megatron-core's llama3 RoPE scaling computes with {key}="
                                  f"{value}, as Llama-3.1 and 3.2)")
        factor = float(spec["factor"])
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if theta != int(theta):
        raise ConfigError(f"{path}: rope_theta={theta} is not an integer (model.rotary_base "
                          "is)")
    return {"rotary_base": int(theta), "rope_scaling_factor": factor}


def llama_model_fields(hf: dict, path: str = "config.json") -> dict[str, Any]:
    """The ``ModelConfig`` fields of a LlamaForCausalLM config.json; ConfigError (one line
    naming the field) for anything the model cannot represent."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{path}: {key}=true is not supported (the model has no biases)")
    if hf.get("sliding_window") is not None:
        raise ConfigError(f"{path}: sliding_window={hf['sliding_window']} is not supported "
                          "(full causal attention only)")
    return decoder_fields(hf, path, rope_scaling=LLAMA.rope_scaling)


def decoder_fields(hf: dict, path: str, rope_scaling: Optional[str] = None) -> dict[str, Any]:
    """The ``ModelConfig`` fields of a LLaMA-like decoder's config.json (sizes, head width,
    RMSNorm eps, RoPE, tied or not; no sliding window), refusing MoE, activations other than
    silu and any RoPE scaling but ``rope_scaling`` (see :func:`rope_fields`): what the
    families built on LLaMA's layer share; each adds its own refusals."""
    for key in _MOE_KEYS:
        if hf.get(key):
            raise ConfigError(f"{path}: {key}={hf[key]!r}: mixture-of-experts models are not "
                              "supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU "
                          "with silu only)")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in hf]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return {
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "head_dim": None if head_dim * heads == hf["hidden_size"] else head_dim,
        "ffn_hidden_size": hf["intermediate_size"],
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        **rope_fields(hf, path, rope_scaling),
        "sliding_window": None,
        "untie_embeddings": not hf.get("tie_word_embeddings", False),
        "vocab_size": hf["vocab_size"],
    }


def llama_hf_config(m: Any) -> dict[str, Any]:
    """The architecture part of a ``LlamaForCausalLM`` config.json for ``ModelConfig`` m."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **decoder_hf_config(m),
        "rope_scaling": ({"rope_type": "llama3", "factor": m.rope_scaling_factor, **LLAMA3_ROPE}
                         if m.rope_scaling_factor else None),
        "attention_bias": False,
        "mlp_bias": False,
    }


def decoder_hf_config(m: Any) -> dict[str, Any]:
    """The config.json fields :func:`decoder_fields` reads, for ``ModelConfig`` m."""
    return {
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.head_dim or m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "attention_dropout": 0.0,
        "tie_word_embeddings": not m.untie_embeddings,
        "initializer_range": m.init_method_std,
    }


LLAMA = ModelFamily(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_type="llama",
    model_fields=llama_model_fields,
    hf_config=llama_hf_config,
    rope_scaling="llama3",
    hf_fields=DECODER_HF_FIELDS,
    layer_tensors=LLAMA_LAYER_TENSORS,
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    output=OUTPUT,
)
"""The LLaMA family."""
