"""Hugging Face ``config.json`` <-> the run's ``ModelConfig``, through the model family the
config.json names (``megatron_mile/models``): reading a folder's config.json, setting the
model's family and shape from it (:func:`apply_hf_model_config`), and writing the exported
one (:func:`export_hf_config`). JSON only: no tensors, no torch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from megatron_mile.config import ModelConfig, TrainConfig
from megatron_mile.errors import ConfigError
from megatron_mile.models import ModelFamily, family_for_hf_config, get_family

__all__ = ["apply_hf_model_config", "export_hf_config", "hf_model_fields", "read_hf_config"]

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""``precision.dtype`` -> config.json's ``torch_dtype``."""


def read_hf_config(folder: str) -> dict:
    """config.json of a local HF model folder. Raises ConfigError naming the file."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ConfigError(f"checkpoint.init_from_hf={folder}: no such directory (a local "
                          "Hugging Face model folder with config.json and *.safetensors)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: checkpoint.init_from_hf must be a Hugging Face "
                          "model folder (config.json + *.safetensors)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON: {e}") from None


def hf_model_fields(hf: dict, path: str = "config.json") -> tuple[ModelFamily, dict[str, Any]]:
    """The family a config.json names and the ``ModelConfig`` fields it maps to; ConfigError
    (one line naming the field) for anything the model cannot represent."""
    family = family_for_hf_config(hf, path)
    return family, {"family": family.name, **family.model_fields(hf, path)}


def apply_hf_model_config(cfg: TrainConfig) -> None:
    """Set ``cfg.model``'s family and shape fields from ``checkpoint.init_from_hf``'s
    config.json (idempotent).

    A field the config sets explicitly, i.e. to a value other than ModelConfig's default,
    must agree with config.json (num_query_groups: None means "= heads"); a difference is a
    ConfigError naming both. Called where a run is set up
    (:func:`megatron_mile.run_config.resolve_model`).
    """
    folder = cfg.checkpoint.init_from_hf
    path = os.path.join(folder, "config.json")
    family, fields = hf_model_fields(read_hf_config(folder), path)
    defaults = ModelConfig()
    current = cfg.model
    conflicts = []
    for key, name in (("architectures", "family"), *family.hf_fields):
        mine, theirs = getattr(current, name), fields[name]
        if name == "num_query_groups" and mine is None:
            continue
        if mine != getattr(defaults, name) and mine != theirs:
            conflicts.append(f"model.{name}={mine} (config) vs {theirs} (from {key})")
    if conflicts:
        raise ConfigError(f"checkpoint.init_from_hf: {'; '.join(conflicts)} in {path}: remove "
                          "the model field(s) from the config (they come from config.json)")
    values = {**{f: getattr(current, f) for f in current.__dataclass_fields__}, **fields}
    try:
        cfg.model = ModelConfig(**values)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def export_hf_config(cfg: TrainConfig, vocab_size: int, special: dict[str, Optional[int]]) -> dict:
    """The exported config.json: the family's architecture fields
    (:attr:`ModelFamily.hf_config`), then the vocabulary, special tokens and dtype."""
    family = get_family(cfg.model.family)
    return {
        **family.hf_config(cfg.model),
        "vocab_size": vocab_size,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "torch_dtype": DTYPE_NAMES[cfg.precision.dtype],
        "use_cache": True,
    }
