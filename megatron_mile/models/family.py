"""What makes a model family: :class:`ModelFamily`, one object holding its name, its Hugging
Face architecture names, how its ``config.json`` maps onto ``ModelConfig`` and back, its
layer choices and its tensor table (:class:`TensorMap`). Pure data and functions over dicts:
no torch, no megatron-core, so the configuration and the tools can read it cheaply.

The GPT model (``megatron_mile/model.py``) builds its TransformerConfig and layer spec from
these choices; the Hugging Face code (``megatron_mile/hf/``) reads, writes and checks tensors
through the table. Adding a family: ``megatron_mile/models/<name>.py`` with one
``ModelFamily``, listed in ``megatron_mile/models/__init__.py`` (docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["DIMENSIONS", "LAYOUTS", "ModelFamily", "TensorMap"]

LAYOUTS = ("replicated", "rows", "columns", "qkv", "gate_up", "vocab")
"""How a megatron tensor is split over TP and assembled from its HF tensor(s): see
:class:`TensorMap`."""

DIMENSIONS = ("hidden", "q_rows", "kv_rows", "head", "ffn", "vocab")
"""The symbolic sizes of :attr:`TensorMap.dims`: ``hidden_size``, ``heads x head_dim``,
``query groups x head_dim``, ``head_dim`` (per-head norms), the MLP's inner width, the
vocabulary."""


@dataclass(frozen=True)
class TensorMap:
    """One megatron parameter and the HF tensor(s) it is made of.

    ``layout`` says how the full megatron tensor is split over TP and assembled from HF's:
    ``replicated`` (norms, the per-head q/k norms too), ``rows`` / ``columns`` (column- /
    row-parallel linear), ``qkv`` (rows grouped per query group: ``[q heads of g; k_g;
    v_g]`` for each group g, from q_proj, k_proj, v_proj), ``gate_up`` (``[gate; up]``
    halves, each split over TP rows), ``vocab`` (rows, padded past the real vocabulary).
    """

    megatron: str
    """Name under megatron's model (per layer: under ``decoder.layers.{i}.``)."""
    hf: tuple[str, ...]
    """The HF tensor name(s) (per layer: under the family's ``hf_layer_prefix{i}.``)."""
    layout: str
    """One of :data:`LAYOUTS`."""
    dims: tuple[tuple[str, ...], ...]
    """The shape of each HF tensor in :data:`DIMENSIONS` names, e.g. ``(("ffn", "hidden"),)``;
    checked against the safetensors before anything is read."""
    te: Optional[str] = None
    """The parameter's name in Transformer Engine's layer spec, where the norm is fused into
    the next linear (None: the same name)."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"TensorMap {self.megatron}: layout {self.layout!r} is not one of "
                             f"{LAYOUTS}")
        if len(self.dims) != len(self.hf) or any(d not in DIMENSIONS
                                                 for shape in self.dims for d in shape):
            raise ValueError(f"TensorMap {self.megatron}: dims {self.dims} must give one shape "
                             f"of {DIMENSIONS} names per HF tensor {self.hf}")


@dataclass(frozen=True)
class ModelFamily:
    """A model family: everything the code needs to build, import and export it."""

    name: str
    """``model.family`` in the configuration, e.g. 'llama'."""
    hf_architectures: tuple[str, ...]
    """config.json ``architectures`` of this family; the first is what the export writes."""
    hf_model_type: str
    """config.json ``model_type``."""
    model_fields: Callable[[dict, str], dict[str, Any]]
    """config.json (a dict; its path for messages) -> ``ModelConfig`` fields, raising
    ``ConfigError`` (one line naming the config.json field) for what the model cannot
    represent."""
    hf_config: Callable[[Any], dict[str, Any]]
    """``ModelConfig`` -> the architecture part of the exported config.json (``architectures``,
    ``model_type``, sizes, norms, RoPE, biases); the export adds vocabulary, dtype and special
    tokens."""
    hf_fields: tuple[tuple[str, str], ...]
    """(config.json key, ``ModelConfig`` field) of the fields :attr:`model_fields` sets: a
    value the run's config sets explicitly must agree with config.json, named by these."""
    layer_tensors: tuple[TensorMap, ...]
    """Per layer i: megatron ``decoder.layers.{i}.<megatron>`` <- HF
    ``<hf_layer_prefix>{i}.<hf>``."""
    embedding: TensorMap
    final_norm: TensorMap
    output: TensorMap
    """The untied output layer (tied: the embedding is the output layer)."""
    hf_layer_prefix: str = "model.layers."
    normalization: str = "RMSNorm"
    """megatron-core's ``normalization`` of every norm."""
    gated_linear_unit: bool = True
    """SwiGLU (``[gate; up]`` in ``linear_fc1``)."""
    add_bias_linear: bool = False
    """Biases on every linear layer."""
    add_qkv_bias: bool = False
    """Biases on the QKV projection only (megatron's ``add_qkv_bias``)."""
    qk_layernorm: bool = False
    """A norm (``normalization``) on each query and key head before RoPE (megatron's
    ``qk_layernorm``; Qwen3's q_norm / k_norm)."""
    rope_scaling: Optional[str] = None
    """The RoPE scaling the family implements besides plain RoPE ('llama3'; None: none;
    config.json asking for any other is refused)."""

    def tensor_names(self) -> list[TensorMap]:
        """Every table entry, global ones first (for messages and checks)."""
        return [self.embedding, self.final_norm, self.output, *self.layer_tensors]
