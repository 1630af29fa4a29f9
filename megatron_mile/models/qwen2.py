"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): LLaMA's layer with biases on the query, key and
value projections (megatron's ``add_qkv_bias``); the small sizes tie the embeddings
(config.json's ``tie_word_embeddings``). Sliding-window attention is refused
(``use_sliding_window=true``); Qwen2 configs carry a ``sliding_window`` size that is unused
while it is off.

The bias of ``linear_qkv`` is grouped per query group like its weight: ``[q biases of g;
k_g; v_g]`` (the ``qkv`` layout on a 1-D tensor).
"""

from __future__ import annotations

from typing import Any

from megatron_mile.errors import ConfigError
from megatron_mile.models.family import ModelFamily, TensorMap
from megatron_mile.models.llama import (
    DECODER_HF_FIELDS, EMBEDDING, FINAL_NORM, LLAMA_LAYER_TENSORS, OUTPUT, decoder_fields,
    decoder_hf_config,
)

__all__ = ["QWEN2", "qwen2_hf_config", "qwen2_model_fields"]

QKV_BIAS = TensorMap("self_attention.linear_qkv.bias",
                     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                     "qkv", (("q_rows",), ("kv_rows",), ("kv_rows",)))


def qwen2_model_fields(hf: dict, path: str = "config.json") -> dict[str, Any]:
    """The ``ModelConfig`` fields of a Qwen2ForCausalLM config.json; ConfigError (one line
    naming the field) for anything the model cannot represent."""
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{path}: use_sliding_window=true is not supported (full causal "
                          "attention only)")
    return decoder_fields(hf, path)


def qwen2_hf_config(m: Any) -> dict[str, Any]:
    """The architecture part of a ``Qwen2ForCausalLM`` config.json for ``ModelConfig`` m."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **decoder_hf_config(m),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": m.num_layers,
    }


QWEN2 = ModelFamily(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_type="qwen2",
    model_fields=qwen2_model_fields,
    hf_config=qwen2_hf_config,
    hf_fields=DECODER_HF_FIELDS,
    layer_tensors=(*LLAMA_LAYER_TENSORS[:2], QKV_BIAS, *LLAMA_LAYER_TENSORS[2:]),
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    output=OUTPUT,
    add_qkv_bias=True,
)
"""The Qwen2 / Qwen2.5 family."""
