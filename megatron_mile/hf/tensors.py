"""A family's tensor table at work: splitting a full megatron tensor into its HF tensors
(export), assembling one TP rank's slice from them (import), and the shapes a config.json
implies for every tensor (checked against the safetensors headers before a model is built).
The table itself is the family's (``megatron_mile/models/<family>.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mile.config import ModelConfig
from megatron_mile.errors import CheckpointError
from megatron_mile.hf.safetensors import HFCheckpoint, hf_weight_map, read_safetensors_shapes
from megatron_mile.models import ModelFamily, TensorMap

__all__ = ["Shapes", "check_hf_shapes", "expected_hf_shapes", "read_local", "split_full"]


@dataclass(frozen=True)
class Shapes:
    """The dimensions the table's layouts need."""

    hidden: int
    heads: int
    groups: int
    ffn: int
    vocab: Optional[int] = None
    head_dim: int = 0
    """Width of one head; 0: hidden / heads."""

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @classmethod
    def of(cls, m: ModelConfig) -> "Shapes":
        return cls(m.hidden_size, m.num_attention_heads,
                   m.num_query_groups or m.num_attention_heads, m.ffn_size, m.vocab_size,
                   m.head_dim or 0)

    def sizes(self) -> dict[str, tuple[int, str]]:
        """Each :data:`~megatron_mile.models.family.DIMENSIONS` name -> (size, the config.json
        field(s) it comes from, for messages)."""
        return {
            "hidden": (self.hidden, f"hidden_size={self.hidden}"),
            "q_rows": (self.heads * self.head_dim,
                       f"num_attention_heads={self.heads} x head_dim={self.head_dim}"),
            "kv_rows": (self.groups * self.head_dim,
                        f"num_key_value_heads={self.groups} x head_dim={self.head_dim}"),
            "head": (self.head_dim, f"head_dim={self.head_dim}"),
            "ffn": (self.ffn, f"intermediate_size={self.ffn}"),
            "vocab": (self.vocab or 0, f"vocab_size={self.vocab}"),
        }

    def shape(self, dims: tuple[str, ...]) -> tuple[int, ...]:
        """The sizes of a :attr:`TensorMap.dims` entry."""
        sizes = self.sizes()
        return tuple(sizes[d][0] for d in dims)


def split_full(entry: TensorMap, full: torch.Tensor, shapes: Shapes,
               rows: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Export direction: a full (TP=1) megatron tensor -> its HF tensors by suffix.
    ``rows``: keep the first ``rows`` vocabulary rows (``vocab`` layout only)."""
    if entry.layout == "qkv":
        hn, q_per_group = shapes.head_dim, shapes.heads // shapes.groups
        # [ng * (q_per_group + 2) * hn, ...] -> [ng, q_per_group + 2, hn, ...]
        qkv = full.reshape(shapes.groups, q_per_group + 2, hn, *full.shape[1:])
        parts = (qkv[:, :q_per_group], qkv[:, q_per_group], qkv[:, q_per_group + 1])
        return {name: p.reshape(-1, *full.shape[1:]) for name, p in zip(entry.hf, parts)}
    if entry.layout == "gate_up":
        if full.shape[0] != 2 * shapes.ffn:
            raise ValueError(f"{entry.megatron} has {full.shape[0]} rows, expected 2 x ffn = "
                             f"{2 * shapes.ffn} (gate; up)")
        return dict(zip(entry.hf, (full[:shapes.ffn], full[shapes.ffn:])))
    if entry.layout == "vocab":
        return {entry.hf[0]: full[:rows]}
    return {entry.hf[0]: full}


def read_local(entry: TensorMap, prefix: str, ckpt: HFCheckpoint, shapes: Shapes,
               tp_rank: int, tp_size: int, local_shape: torch.Size,
               valid_vocab: int) -> torch.Tensor:
    """Import direction: this TP rank's slice of the megatron tensor, read from the HF
    tensors ``prefix + entry.hf[i]`` (only the rows/columns this rank holds)."""
    names = [prefix + n for n in entry.hf]
    full = [shapes.shape(d) for d in entry.dims]
    if entry.layout == "replicated":
        return ckpt.read(names[0], full[0])
    if entry.layout in ("rows", "columns"):
        axis = 0 if entry.layout == "rows" else 1
        n = local_shape[axis]
        return ckpt.read(names[0], full[0], axis, tp_rank * n, (tp_rank + 1) * n)
    if entry.layout == "qkv":
        hn, q_per_group = shapes.head_dim, shapes.heads // shapes.groups
        per_rank = shapes.groups // tp_size
        g0, g1 = tp_rank * per_rank, (tp_rank + 1) * per_rank
        rest = full[0][1:]  # (hidden,) for a weight, () for a bias
        q = ckpt.read(names[0], full[0], 0, g0 * q_per_group * hn, g1 * q_per_group * hn)
        k = ckpt.read(names[1], full[1], 0, g0 * hn, g1 * hn)
        v = ckpt.read(names[2], full[2], 0, g0 * hn, g1 * hn)
        # -> [groups of this rank, (q_per_group + 2) * hn, ...]: megatron's per-group order
        return torch.cat([q.reshape(per_rank, q_per_group * hn, *rest),
                          k.reshape(per_rank, hn, *rest), v.reshape(per_rank, hn, *rest)],
                         dim=1).reshape(-1, *rest)
    if entry.layout == "gate_up":
        f = shapes.ffn // tp_size
        return torch.cat([ckpt.read(n, shape, 0, tp_rank * f, (tp_rank + 1) * f)
                          for n, shape in zip(names, full)])
    if entry.layout == "vocab":
        vp = local_shape[0]
        start, stop = tp_rank * vp, min((tp_rank + 1) * vp, valid_vocab)
        out = torch.zeros(vp, *local_shape[1:], dtype=ckpt.dtype(names[0]))
        if stop > start:  # padding rows (global id >= the real vocabulary) stay zero
            out[:stop - start] = ckpt.read(names[0], (valid_vocab, *full[0][1:]), 0, start,
                                           stop)
        return out
    raise ValueError(f"unknown layout {entry.layout!r}")


def expected_hf_shapes(family: ModelFamily,
                       m: ModelConfig) -> dict[str, tuple[tuple[int, str], ...]]:
    """Every tensor a HF model of ``family`` and shape ``m`` holds -> its shape, each
    dimension with the config.json field(s) it comes from (for messages)."""
    sizes = Shapes.of(m).sizes()
    out: dict[str, tuple[tuple[int, str], ...]] = {}

    def add(prefix: str, entry: TensorMap) -> None:
        for name, dims in zip(entry.hf, entry.dims):
            out[prefix + name] = tuple(sizes[d] for d in dims)

    add("", family.embedding)
    for i in range(m.num_layers):
        for entry in family.layer_tensors:
            add(f"{family.hf_layer_prefix}{i}.", entry)
    add("", family.final_norm)
    if m.untie_embeddings:
        add("", family.output)
    return out


def check_hf_shapes(folder: str, m: ModelConfig, family: ModelFamily) -> None:
    """Before any model is built: every tensor of ``folder``'s safetensors has the shape its
    config.json implies (``m``, from :func:`~megatron_mile.hf.config.apply_hf_model_config`),
    none is missing, and no layer lies beyond ``num_hidden_layers``. Reads the index and the
    safetensors' JSON headers only; local, no collectives.

    Raises:
        CheckpointError: one line naming the first tensor that disagrees, both shapes, the
            config.json field and the file (and how many more disagree).
    """
    config = os.path.join(folder, "config.json")
    weight_map = hf_weight_map(folder)
    headers = {f: read_safetensors_shapes(os.path.join(folder, f))
               for f in sorted(set(weight_map.values()))}
    prefix = family.hf_layer_prefix
    problems = []
    for name, dims in expected_hf_shapes(family, m).items():
        filename = weight_map.get(name)
        shape = headers[filename].get(name) if filename else None
        want = tuple(size for size, _ in dims)
        if shape is None:
            field = (f"num_hidden_layers={m.num_layers}" if name.startswith(prefix)
                     else "tie_word_embeddings=false" if name in family.output.hf
                     else f"model_type={family.hf_model_type}")
            problems.append(f"tensor {name} is missing from the safetensors of {folder} but "
                            f"{config} ({field}) implies it")
        elif shape != want:
            fields = ", ".join(label for (size, label), got in zip(dims, shape) if size != got)
            problems.append(f"tensor {name} has shape {list(shape)} in "
                            f"{os.path.join(folder, filename)} but {config} implies "
                            f"{list(want)} ({fields or f'{len(want)} dimensions'})")
    for name in weight_map:
        layer = name[len(prefix):].split(".")[0] if name.startswith(prefix) else None
        if layer is not None and layer.isdigit() and int(layer) >= m.num_layers:
            problems.append(f"tensor {name} is in {os.path.join(folder, weight_map[name])} but "
                            f"{config} has num_hidden_layers={m.num_layers}")
            break
    if problems:
        more = f" ({len(problems) - 1} more tensor(s) disagree)" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0]}{more}: config.json disagrees with the weights; "
                              "fix config.json or use the folder the weights came from")
