"""Qwen3 (``Qwen3ForCausalLM``, the dense models): LLaMA's layer with an RMSNorm on each query
and key head before RoPE (``q_norm`` / ``k_norm``, megatron's ``qk_layernorm``), no q/k/v
biases, and a head width of its own (config.json's ``head_dim``, megatron's ``kv_channels``:
``num_attention_heads x head_dim`` need not be ``hidden_size``); the small sizes tie the
embeddings. Sliding-window attention (``use_sliding_window=true``) is refused.

The q/k norm weights (``head_dim`` wide) are the same for every head, so every TP rank holds
them whole (the ``replicated`` layout); megatron-core's ``finalize_model_grads`` sums their
gradient over the TP group (each rank saw only its own heads).
"""

from __future__ import annotations

from typing import Any

from megatron_mile.errors import ConfigError
from megatron_mile.models.family import ModelFamily, TensorMap
from megatron_mile.models.llama import (
    DECODER_HF_FIELDS, EMBEDDING, FINAL_NORM, LLAMA_LAYER_TENSORS, OUTPUT, decoder_fields,
    decoder_hf_config,
)

__all__ = ["QK_NORMS", "QWEN3", "qwen3_hf_config", "qwen3_model_fields"]

QK_NORMS = (
    TensorMap("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "replicated",
              (("head",),)),
    TensorMap("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "replicated",
              (("head",),)),
)
"""The per-head query and key norms (megatron's ``qk_layernorm``)."""


def qwen3_model_fields(hf: dict, path: str = "config.json") -> dict[str, Any]:
    """The ``ModelConfig`` fields of a Qwen3ForCausalLM config.json; ConfigError (one line
    naming the field) for anything the model cannot represent."""
    if hf.get("attention_bias"):
        raise ConfigError(f"{path}: attention_bias=true is not supported (Qwen3 has no q/k/v "
                          "biases; a Qwen2 model is model_type 'qwen2')")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{path}: use_sliding_window=true is not supported (full causal "
                          "attention only)")
    other = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
    if other:
        raise ConfigError(f"{path}: layer_types={other} is not supported (full_attention "
                          "layers only)")
    return decoder_fields(hf, path)


def qwen3_hf_config(m: Any) -> dict[str, Any]:
    """The architecture part of a ``Qwen3ForCausalLM`` config.json for ``ModelConfig`` m."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **decoder_hf_config(m),
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": m.num_layers,
    }


QWEN3 = ModelFamily(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_type="qwen3",
    model_fields=qwen3_model_fields,
    hf_config=qwen3_hf_config,
    hf_fields=DECODER_HF_FIELDS,
    layer_tensors=(*LLAMA_LAYER_TENSORS[:2], *QK_NORMS, *LLAMA_LAYER_TENSORS[2:]),
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    output=OUTPUT,
    qk_layernorm=True,
)
"""The Qwen3 family (dense)."""
