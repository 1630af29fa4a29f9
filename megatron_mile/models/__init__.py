"""Model families: each is one :class:`ModelFamily` (``models/<name>.py``), registered in
:data:`FAMILIES`. Pure data (no torch), so configuration checks and tools read it cheaply;
``megatron_mile/model.py`` builds the GPT model from a family's layer choices and
``megatron_mile/hf/`` maps its tensors to and from Hugging Face. docs/models.md says how to add
a family.
"""

from __future__ import annotations

from megatron_mile.errors import ConfigError
from megatron_mile.models.family import ModelFamily, TensorMap
from megatron_mile.models.llama import LLAMA
from megatron_mile.models.mistral import MISTRAL
from megatron_mile.models.qwen2 import QWEN2
from megatron_mile.models.qwen3 import QWEN3

__all__ = ["FAMILIES", "LLAMA", "MISTRAL", "QWEN2", "QWEN3", "ModelFamily", "TensorMap",
           "family_for_hf_config", "get_family"]

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (LLAMA, QWEN2, QWEN3, MISTRAL)}
"""Every known family by ``model.family`` name."""


def get_family(name: str) -> ModelFamily:
    """The family ``model.family`` names; ConfigError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.family={name!r} is not one of {tuple(FAMILIES)} "
                          "(megatron_mile/models/)") from None


def family_for_hf_config(hf: dict, path: str = "config.json") -> ModelFamily:
    """The family whose ``model_type`` and ``architectures`` a config.json names (a config
    without them is read as LLaMA, the only family before ``model.family`` existed)."""
    model_type = hf.get("model_type", LLAMA.hf_model_type)
    arch = hf.get("architectures") or [LLAMA.hf_architectures[0]]
    for family in FAMILIES.values():
        if model_type == family.hf_model_type and len(arch) == 1 \
                and arch[0] in family.hf_architectures:
            return family
    known = ", ".join(f"{f.hf_architectures[0]} (model_type {f.hf_model_type!r})"
                      for f in FAMILIES.values())
    raise ConfigError(f"{path}: model_type={hf.get('model_type')!r}, architectures={arch}: "
                      f"only {known} can be imported")
