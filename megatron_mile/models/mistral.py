"""Mistral (``MistralForCausalLM``): LLaMA's layer and tensor names (GQA, no biases) with a
sliding attention window (config.json's ``sliding_window``, ``model.sliding_window``: a token
sees itself and the ``sliding_window - 1`` before it, as transformers' sliding-window mask).
Mistral-7B-v0.1 has a 4096-token window; v0.2 and later have none (null).

A window of at least the run's ``model.seq_length`` never masks anything: the attention is
plain causal attention, on any layer spec. A shorter window needs Transformer Engine
(``window_size``); elsewhere the run is refused naming ``model.sliding_window``
(:func:`megatron_mile.fusions.check_kernels`).
"""

from __future__ import annotations

from typing import Any

from megatron_mile.errors import ConfigError
from megatron_mile.models.family import ModelFamily
from megatron_mile.models.llama import (
    DECODER_HF_FIELDS, EMBEDDING, FINAL_NORM, LLAMA_LAYER_TENSORS, OUTPUT, decoder_fields,
    decoder_hf_config,
)

__all__ = ["MISTRAL", "mistral_hf_config", "mistral_model_fields"]


def mistral_model_fields(hf: dict, path: str = "config.json") -> dict[str, Any]:
    """The ``ModelConfig`` fields of a MistralForCausalLM config.json, the sliding window
    included; ConfigError (one line naming the field) for anything the model cannot
    represent."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{path}: {key}=true is not supported (the model has no biases)")
    window = hf.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window <= 0):
        raise ConfigError(f"{path}: sliding_window={window!r} must be a positive integer or "
                          "null")
    return {**decoder_fields(hf, path), "sliding_window": window}


def mistral_hf_config(m: Any) -> dict[str, Any]:
    """The architecture part of a ``MistralForCausalLM`` config.json for ``ModelConfig`` m."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        **decoder_hf_config(m),
        "sliding_window": m.sliding_window,
    }


MISTRAL = ModelFamily(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    hf_model_type="mistral",
    model_fields=mistral_model_fields,
    hf_config=mistral_hf_config,
    hf_fields=DECODER_HF_FIELDS,
    layer_tensors=LLAMA_LAYER_TENSORS,
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    output=OUTPUT,
)
"""The Mistral family."""
