"""LLaMA (``LlamaForCausalLM``): RMSNorm, SwiGLU, plain RoPE, no biases, untied embeddings
unless config.json ties them. The paper's models and megatron-mile's shipped configs.

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

from typing import Any

from megatron_mile.errors import ConfigError
from megatron_mile.models.family import ModelFamily, TensorMap

__all__ = ["LLAMA", "LLAMA_LAYER_TENSORS", "decoder_fields", "decoder_hf_config",
           "llama_hf_config", "llama_model_fields"]

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
    ("intermediate_size", "ffn_hidden_size"), ("rms_norm_eps", "norm_epsilon"),
    ("rope_theta", "rotary_base"), ("tie_word_embeddings", "untie_embeddings"),
    ("vocab_size", "vocab_size"))
"""(config.json key, ModelConfig field) of :func:`decoder_fields`."""

_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
             "moe_intermediate_size")


def rope_theta(hf: dict, path: str) -> float:
    """rope_theta from config.json (top level in transformers 4, ``rope_parameters`` in 5);
    any rope scaling type other than 'default' is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for where, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if isinstance(spec, dict):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind != "default":
                raise ConfigError(f"{path}: {where}.rope_type={kind!r} is not supported "
                                  "(megatron-mile implements plain RoPE only)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def llama_model_fields(hf: dict, path: str = "config.json") -> dict[str, Any]:
    """The ``ModelConfig`` fields of a LlamaForCausalLM config.json; ConfigError (one line
    naming the field) for anything the model cannot represent."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{path}: {key}=true is not supported (the model has no biases)")
    if hf.get("sliding_window") is not None:
        raise ConfigError(f"{path}: sliding_window={hf['sliding_window']} is not supported "
                          "(full causal attention only)")
    return decoder_fields(hf, path)


def decoder_fields(hf: dict, path: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields of a LLaMA-like decoder's config.json (sizes, RMSNorm eps,
    plain RoPE, tied or not), refusing MoE, activations other than silu and rope scaling:
    what the families built on LLaMA's layer share; each adds its own refusals."""
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
    if head_dim * heads != hf["hidden_size"]:
        raise ConfigError(f"{path}: head_dim={head_dim} x num_attention_heads={heads} != "
                          f"hidden_size={hf['hidden_size']} is not supported")
    theta = rope_theta(hf, path)
    if theta != int(theta):
        raise ConfigError(f"{path}: rope_theta={theta} is not an integer (model.rotary_base "
                          "is)")
    return {
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "ffn_hidden_size": hf["intermediate_size"],
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "rotary_base": int(theta),
        "untie_embeddings": not hf.get("tie_word_embeddings", False),
        "vocab_size": hf["vocab_size"],
    }


def llama_hf_config(m: Any) -> dict[str, Any]:
    """The architecture part of a ``LlamaForCausalLM`` config.json for ``ModelConfig`` m."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **decoder_hf_config(m),
        "rope_scaling": None,
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
        "head_dim": m.hidden_size // m.num_attention_heads,
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
    hf_fields=DECODER_HF_FIELDS,
    layer_tensors=LLAMA_LAYER_TENSORS,
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    output=OUTPUT,
)
"""The LLaMA family."""
