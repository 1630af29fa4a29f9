"""Hugging Face ``LlamaForCausalLM`` <-> megatron-mile: the one tensor table both directions
use, config.json's mapping onto ``ModelConfig``, and the import into any TP/PP layout.

    cfg = load_config("llama_6.7b", ["checkpoint.init_from_hf=/models/llama-2-7b"])  # shape
    model = build_model(cfg, padded_vocab, device)                        # this rank's chunks
    import_hf_weights(cfg.checkpoint.init_from_hf, model, cfg, valid_vocab_size)

It lives beside ``model.py`` (the architecture it maps) because the trainer, the import tool
and the export (``evaluation/hf_export.py``) all use it: one table, so the two directions
cannot drift. Conventions (QKV grouping, RoPE halves, SwiGLU halves): see ``hf_export.py``.

Memory: every rank opens the safetensors memory-mapped (``safe_open`` + ``get_slice``) and
reads only its own TP slice of its own pipeline stage's tensors, one tensor at a time,
straight into its parameters: beyond the model itself a rank holds one slice (and its dtype
conversion) at a time. Reads only local files.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_mile.config import ConfigError, ModelConfig, TrainConfig

__all__ = ["HF_LAYER_TENSORS", "HFCheckpoint", "apply_hf_model_config", "check_hf_shapes",
           "hf_model_fields", "hf_weight_map", "import_hf_weights", "read_safetensors_shapes"]


# ---------------------------------------------------------------- the tensor table

@dataclass(frozen=True)
class TensorMap:
    """One megatron parameter and the HF tensor(s) it is made of.

    ``layout`` says how the full megatron tensor is split over TP and assembled from HF's:
    ``replicated`` (norms), ``rows`` / ``columns`` (column- / row-parallel linear), ``qkv``
    (rows grouped per query group: ``[q heads of g; k_g; v_g]`` for each group g, from
    q_proj, k_proj, v_proj), ``gate_up`` (``[gate; up]`` halves, each split over TP rows),
    ``vocab`` (rows, padded past the real vocabulary).
    """

    megatron: str
    hf: tuple[str, ...]
    layout: str
    te: Optional[str] = None
    """The parameter's name in Transformer Engine's layer spec, where the norm is fused into
    the next linear (None: the same name)."""


HF_LAYER_TENSORS = (
    TensorMap("input_layernorm.weight", ("input_layernorm.weight",), "replicated",
              te="self_attention.linear_qkv.layer_norm_weight"),
    TensorMap("self_attention.linear_qkv.weight",
              ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
              "qkv"),
    TensorMap("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "columns"),
    TensorMap("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "replicated",
              te="mlp.linear_fc1.layer_norm_weight"),
    TensorMap("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
              "gate_up"),
    TensorMap("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "columns"),
)
"""Per layer i: megatron ``decoder.layers.{i}.<megatron>`` <- HF ``model.layers.{i}.<hf>``."""

HF_EMBEDDING = TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                         "vocab")
HF_FINAL_NORM = TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated")
HF_OUTPUT = TensorMap("output_layer.weight", ("lm_head.weight",), "vocab")


@dataclass(frozen=True)
class Shapes:
    """The dimensions the table's layouts need."""

    hidden: int
    heads: int
    groups: int
    ffn: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def of(cls, m: ModelConfig) -> "Shapes":
        return cls(m.hidden_size, m.num_attention_heads,
                   m.num_query_groups or m.num_attention_heads, m.ffn_size)


def split_full(entry: TensorMap, full: torch.Tensor, shapes: Shapes,
               rows: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Export direction: a full (TP=1) megatron tensor -> its HF tensors by suffix.
    ``rows``: keep the first ``rows`` vocabulary rows (``vocab`` layout only)."""
    if entry.layout == "qkv":
        hn, q_per_group = shapes.head_dim, shapes.heads // shapes.groups
        # [ng * (q_per_group + 2) * hn, h] -> [ng, q_per_group + 2, hn, h]
        qkv = full.reshape(shapes.groups, q_per_group + 2, hn, -1)
        parts = (qkv[:, :q_per_group], qkv[:, q_per_group], qkv[:, q_per_group + 1])
        return {name: p.reshape(-1, full.shape[-1]) for name, p in zip(entry.hf, parts)}
    if entry.layout == "gate_up":
        if full.shape[0] != 2 * shapes.ffn:
            raise ValueError(f"{entry.megatron} has {full.shape[0]} rows, expected 2 x ffn = "
                             f"{2 * shapes.ffn} (gate; up)")
        return dict(zip(entry.hf, (full[:shapes.ffn], full[shapes.ffn:])))
    if entry.layout == "vocab":
        return {entry.hf[0]: full[:rows]}
    return {entry.hf[0]: full}


def read_local(entry: TensorMap, prefix: str, ckpt: "HFCheckpoint", shapes: Shapes,
               tp_rank: int, tp_size: int, local_shape: torch.Size,
               valid_vocab: int) -> torch.Tensor:
    """Import direction: this TP rank's slice of the megatron tensor, read from the HF
    tensors ``prefix + entry.hf[i]`` (only the rows/columns this rank holds)."""
    h = shapes.hidden
    names = [prefix + n for n in entry.hf]
    if entry.layout == "replicated":
        return ckpt.read(names[0], (h,))
    if entry.layout in ("rows", "columns"):
        full_shape = (local_shape[0] * tp_size, local_shape[1]) if entry.layout == "rows" \
            else (local_shape[0], local_shape[1] * tp_size)
        axis = 0 if entry.layout == "rows" else 1
        n = local_shape[axis]
        return ckpt.read(names[0], full_shape, axis, tp_rank * n, (tp_rank + 1) * n)
    if entry.layout == "qkv":
        hn, q_per_group = shapes.head_dim, shapes.heads // shapes.groups
        per_rank = shapes.groups // tp_size
        g0, g1 = tp_rank * per_rank, (tp_rank + 1) * per_rank
        q = ckpt.read(names[0], (shapes.heads * hn, h), 0, g0 * q_per_group * hn,
                      g1 * q_per_group * hn).reshape(per_rank, q_per_group * hn, h)
        k = ckpt.read(names[1], (shapes.groups * hn, h), 0, g0 * hn, g1 * hn)
        v = ckpt.read(names[2], (shapes.groups * hn, h), 0, g0 * hn, g1 * hn)
        # -> [groups of this rank, (q_per_group + 2) * hn, h]: megatron's per-group order
        return torch.cat([q, k.reshape(per_rank, hn, h), v.reshape(per_rank, hn, h)],
                         dim=1).reshape(-1, h)
    if entry.layout == "gate_up":
        f = shapes.ffn // tp_size
        return torch.cat([ckpt.read(n, (shapes.ffn, h), 0, tp_rank * f, (tp_rank + 1) * f)
                          for n in names])
    if entry.layout == "vocab":
        vp = local_shape[0]
        start, stop = tp_rank * vp, min((tp_rank + 1) * vp, valid_vocab)
        out = torch.zeros(vp, h, dtype=ckpt.dtype(names[0]))
        if stop > start:  # padding rows (global id >= the real vocabulary) stay zero
            out[:stop - start] = ckpt.read(names[0], (valid_vocab, h), 0, start, stop)
        return out
    raise ValueError(f"unknown layout {entry.layout!r}")


# ---------------------------------------------------------------- config.json

# config.json key -> ModelConfig field, for the shape fields taken from the HF model.
_SHAPE_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "intermediate_size": "ffn_hidden_size",
    "rms_norm_eps": "norm_epsilon",
    "rope_theta": "rotary_base",
    "tie_word_embeddings": "untie_embeddings",
    "vocab_size": "vocab_size",
}

_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
             "moe_intermediate_size")


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


def _rope_theta(hf: dict, path: str) -> float:
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


def hf_model_fields(hf: dict, path: str = "config.json") -> dict[str, Any]:
    """The ``ModelConfig`` shape fields of a LlamaForCausalLM config.json; ConfigError (one
    line naming the field) for anything the model cannot represent."""
    arch = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or arch != ["LlamaForCausalLM"]:
        raise ConfigError(f"{path}: model_type={hf.get('model_type')!r}, architectures={arch}: "
                          "only LlamaForCausalLM (model_type 'llama') can be imported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{path}: {key}=true is not supported (the model has no biases)")
    for key in _MOE_KEYS:
        if hf.get(key):
            raise ConfigError(f"{path}: {key}={hf[key]!r}: mixture-of-experts models are not "
                              "supported")
    if hf.get("sliding_window") is not None:
        raise ConfigError(f"{path}: sliding_window={hf['sliding_window']} is not supported "
                          "(full causal attention only)")
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
    theta = _rope_theta(hf, path)
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


def apply_hf_model_config(cfg: TrainConfig) -> None:
    """Set ``cfg.model``'s shape fields from ``checkpoint.init_from_hf``'s config.json.

    A field the config sets explicitly, i.e. to a value other than ModelConfig's default,
    must agree with config.json (num_query_groups: None means "= heads"); a difference is a
    ConfigError naming both. Called by :func:`megatron_mile.config.load_config`.
    """
    folder = cfg.checkpoint.init_from_hf
    path = os.path.join(folder, "config.json")
    fields = hf_model_fields(read_hf_config(folder), path)
    defaults = ModelConfig()
    current = cfg.model
    conflicts = []
    for key, name in _SHAPE_FIELDS.items():
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


# ---------------------------------------------------------------- the safetensors files

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
_MAX_HEADER_BYTES = 100 << 20
"""safetensors' own bound on the JSON header of a file."""


def _checkpoint_error(message: str) -> Exception:
    from megatron_mile.training.checkpointing import CheckpointError

    return CheckpointError(message)


def _allowed_roots(folder: str) -> list[str]:
    """Where the files of a HF folder may live: the folder itself, and for a folder of the
    Hugging Face hub cache (``.../snapshots/<revision>``, whose files are links into
    ``.../blobs``) that cache's ``blobs``."""
    real = os.path.realpath(folder)
    roots = [real]
    if os.path.basename(os.path.dirname(real)) == "snapshots":
        roots.append(os.path.realpath(os.path.join(os.path.dirname(real), "..", "blobs")))
    return roots


def _check_inside(folder: str, where: str, tensor: str, filename: Any) -> None:
    """CheckpointError unless ``filename`` (from ``where``) names a file inside ``folder``:
    a relative path without ``..`` that no symbolic link takes elsewhere."""
    if not isinstance(filename, str) or not filename:
        raise _checkpoint_error(f"{where}: tensor {tensor} is stored in {filename!r}, not a "
                                "file name")
    parts = filename.replace("\\", "/").split("/")
    reason = ("an absolute path" if os.path.isabs(filename) else
              "a path through '..'" if ".." in parts else None)
    if reason is None:
        real = os.path.realpath(os.path.join(folder, filename))
        if not any(os.path.commonpath([real, root]) == root for root in _allowed_roots(folder)):
            reason = f"a symbolic link to {real}"
    if reason is not None:
        raise _checkpoint_error(
            f"{where}: tensor {tensor} is stored in {filename!r}, {reason} outside the model "
            f"folder {folder}: refused (an index names files inside its folder); fix the index "
            "or copy the model into one folder")


def hf_weight_map(folder: str) -> dict[str, str]:
    """Tensor name -> safetensors file (relative to ``folder``) of a HF model folder: from
    ``model.safetensors.index.json``, else every tensor of ``model.safetensors``. Every file
    is checked to lie inside the folder. Reads JSON only (the index, or a header).

    Raises:
        CheckpointError: no safetensors, an unreadable index, or a file outside the folder.
    """
    index = os.path.join(folder, HF_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (OSError, ValueError, AttributeError) as e:
            raise _checkpoint_error(f"{index} is not a JSON index with a weight_map: "
                                    f"{' '.join(str(e).split())}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise _checkpoint_error(f"{index} has no weight_map (tensor name -> file)")
        for tensor, filename in weight_map.items():
            _check_inside(folder, index, tensor, filename)
        return dict(weight_map)
    single = os.path.join(folder, HF_SINGLE)
    if not os.path.isfile(single):
        raise _checkpoint_error(f"{folder} has neither {HF_SINGLE} nor {HF_INDEX} (only "
                                "safetensors are read)")
    _check_inside(folder, single, "*", HF_SINGLE)
    return {name: HF_SINGLE for name in read_safetensors_shapes(single)}


def read_safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the JSON header of a safetensors file (8-byte little-endian
    length, then the JSON): no tensor data is read.

    Raises:
        CheckpointError: the file is missing or its header is not a safetensors header.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"a header of {length} bytes in a file of {size} bytes")
            header = json.loads(f.read(length))
        shapes = {name: tuple(int(d) for d in info["shape"]) for name, info in header.items()
                  if name != "__metadata__"}
    except OSError as e:
        raise _checkpoint_error(f"cannot read {path}: {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise _checkpoint_error(f"{path} is not a safetensors file ({e})") from None
    return shapes


def expected_hf_shapes(m: ModelConfig) -> dict[str, tuple[tuple[int, str], ...]]:
    """Every tensor a LlamaForCausalLM of shape ``m`` holds -> its shape, each dimension with
    the config.json field(s) it comes from (for messages)."""
    s = Shapes.of(m)
    hidden = (s.hidden, f"hidden_size={s.hidden}")
    q_rows = (s.heads * s.head_dim, f"num_attention_heads={s.heads} x head_dim={s.head_dim}")
    kv_rows = (s.groups * s.head_dim, f"num_key_value_heads={s.groups} x head_dim={s.head_dim}")
    ffn = (s.ffn, f"intermediate_size={s.ffn}")
    vocab = (m.vocab_size, f"vocab_size={m.vocab_size}")
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    out = {HF_EMBEDDING.hf[0]: (vocab, hidden)}
    for i in range(m.num_layers):
        out.update({f"model.layers.{i}.{name}": dims for name, dims in layer.items()})
    out[HF_FINAL_NORM.hf[0]] = (hidden,)
    if m.untie_embeddings:
        out[HF_OUTPUT.hf[0]] = (vocab, hidden)
    return out


def check_hf_shapes(folder: str, m: ModelConfig) -> None:
    """Before any model is built: every tensor of ``folder``'s safetensors has the shape its
    config.json implies (``m``, from :func:`apply_hf_model_config`), none is missing, and no
    layer lies beyond ``num_hidden_layers``. Reads the index and the safetensors' JSON headers
    only; local, no collectives.

    Raises:
        CheckpointError: one line naming the first tensor that disagrees, both shapes, the
            config.json field and the file (and how many more disagree).
    """
    config = os.path.join(folder, "config.json")
    weight_map = hf_weight_map(folder)
    headers = {f: read_safetensors_shapes(os.path.join(folder, f))
               for f in sorted(set(weight_map.values()))}
    problems = []
    for name, dims in expected_hf_shapes(m).items():
        filename = weight_map.get(name)
        shape = headers[filename].get(name) if filename else None
        want = tuple(size for size, _ in dims)
        if shape is None:
            field = (f"num_hidden_layers={m.num_layers}" if name.startswith("model.layers.")
                     else "tie_word_embeddings=false" if name == HF_OUTPUT.hf[0]
                     else "model_type=llama")
            problems.append(f"tensor {name} is missing from the safetensors of {folder} but "
                            f"{config} ({field}) implies it")
        elif shape != want:
            fields = ", ".join(label for (size, label), got in zip(dims, shape) if size != got)
            problems.append(f"tensor {name} has shape {list(shape)} in "
                            f"{os.path.join(folder, filename)} but {config} implies "
                            f"{list(want)} ({fields or f'{len(want)} dimensions'})")
    for name in weight_map:
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and layer.isdigit() and int(layer) >= m.num_layers:
            problems.append(f"tensor {name} is in {os.path.join(folder, weight_map[name])} but "
                            f"{config} has num_hidden_layers={m.num_layers}")
            break
    if problems:
        more = f" ({len(problems) - 1} more tensor(s) disagree)" if len(problems) > 1 else ""
        raise _checkpoint_error(f"{problems[0]}{more}: config.json disagrees with the weights; "
                                "fix config.json or use the folder the weights came from")


# ---------------------------------------------------------------- the safetensors reader

class HFCheckpoint:
    """The safetensors of a HF model folder (single file or sharded with its index), opened
    memory-mapped; :meth:`read` copies out only the requested slice of a tensor."""

    def __init__(self, folder: str):
        from megatron_mile.training.checkpointing import CheckpointError

        self._error = CheckpointError
        self.folder = folder
        self.weight_map = hf_weight_map(folder)
        self._stack = ExitStack()
        self._files: dict[str, Any] = {}
        biases = [k for k in self.weight_map if k.endswith(".bias")]
        if biases:
            raise CheckpointError(f"{folder}: tensor {biases[0]} is a bias, which the model "
                                  "cannot represent")

    def _open(self, filename: str):
        try:
            from safetensors import safe_open
        except ImportError:
            raise self._error("reading a Hugging Face checkpoint needs `safetensors` "
                              "(pip install 'megatron-mile[hf]')") from None
        if filename not in self._files:
            path = os.path.join(self.folder, filename)
            try:
                self._files[filename] = self._stack.enter_context(
                    safe_open(path, framework="pt"))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise self._error(f"cannot open {path}: {e}") from None
        return self._files[filename]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise self._error(f"{self.folder}: tensor {name} is missing from the safetensors")
        return self._open(self.weight_map[name]).get_slice(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.read(name, None, 0, 0, 0).dtype

    def read(self, name: str, full_shape: Optional[tuple], axis: int = 0,
             start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """``name[start:stop]`` along ``axis`` (all of it when start is None), after checking
        its shape is ``full_shape`` (None: any)."""
        sl = self._slice(name)
        shape = tuple(sl.get_shape())
        if full_shape is not None and shape != tuple(full_shape):
            raise self._error(f"{self.folder}: tensor {name} has shape {list(shape)}, the model "
                              f"expects {list(full_shape)} (config.json disagrees with the "
                              "weights?)")
        if start is None:
            return sl[:]
        return sl[start:stop] if axis == 0 else sl[:, start:stop]

    def close(self) -> None:
        self._stack.close()


# ---------------------------------------------------------------- the import

def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The MileGPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _local_tensors(model, tied: bool) -> list[tuple[torch.nn.Parameter, TensorMap, str]]:
    """(parameter, table entry, HF name prefix) for every parameter of this rank's chunks."""
    out = []
    for chunk in map(_unwrap, model):
        if chunk.pre_process:
            out.append((chunk.embedding.word_embeddings.weight, HF_EMBEDDING, ""))
        for layer in chunk.decoder.layers:
            i = layer.layer_number - 1  # global, pipeline offset included
            for entry in HF_LAYER_TENSORS:
                try:
                    param = layer.get_parameter(entry.megatron)
                except AttributeError:  # Transformer Engine's spec: the norm sits in a linear
                    param = layer.get_parameter(entry.te or entry.megatron)
                out.append((param, entry, f"model.layers.{i}."))
        if chunk.post_process:
            out.append((chunk.decoder.final_layernorm.weight, HF_FINAL_NORM, ""))
            weight = chunk.output_layer.weight
            if weight is not None:  # tied at PP=1: the embedding is the output layer
                out.append((weight, HF_EMBEDDING if tied else HF_OUTPUT, ""))
    return out


@torch.no_grad()
def import_hf_weights(folder: str, model: list[torch.nn.Module], cfg: TrainConfig,
                      valid_vocab_size: int) -> int:
    """Copy a HF LlamaForCausalLM folder's weights into this rank's model chunks (any TP, SP,
    PP, VPP, DP; wrapped in DDP/Float16Module or not); returns the number of tensors set.

    Call before the optimizer is built (its fp32 master weights copy the parameters). Each
    rank reads its own slices; the padded vocabulary rows are zero. ``cfg.model`` must carry
    config.json's shape (:func:`apply_hf_model_config`). No collectives.

    Raises:
        CheckpointError: a tensor is missing, has an unexpected shape, or a parameter of the
            model has no HF counterpart.
    """
    from megatron.core import parallel_state

    from megatron_mile.training.checkpointing import CheckpointError

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    shapes = Shapes.of(cfg.model)
    ckpt = HFCheckpoint(folder)
    try:
        tied = not cfg.model.untie_embeddings
        if not tied and not ckpt.has(HF_OUTPUT.hf[0]):
            raise CheckpointError(f"{folder}: lm_head.weight is missing but config.json has "
                                  "tie_word_embeddings=false")
        tensors = _local_tensors(model, tied)
        covered = {id(p) for p, _, _ in tensors}
        for chunk in model:
            for name, p in chunk.named_parameters():
                if id(p) not in covered:
                    raise CheckpointError(f"parameter {name} has no Hugging Face counterpart "
                                          "(checkpoint_hf.HF_LAYER_TENSORS)")
        for param, entry, prefix in tensors:
            local = read_local(entry, prefix, ckpt, shapes, tp_rank, tp_size, param.shape,
                               valid_vocab_size)
            if local.shape != param.shape:
                raise CheckpointError(f"{prefix}{entry.hf[0]}: assembled {list(local.shape)} "
                                      f"for {entry.megatron} of shape {list(param.shape)}")
            param.data.copy_(local)
        return len(tensors)
    finally:
        ckpt.close()


_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def import_to_checkpoint(hf_folder: str, out_dir: str, *, config: Optional[str] = None,
                         overrides: Optional[list[str]] = None,
                         dtype: Optional[str] = None) -> TrainConfig:
    """Write ``hf_folder`` as a regular megatron-mile checkpoint (iteration 0, no optimizer
    state) into ``out_dir``, so that a large import runs once; returns the config it saved.

    ``config``: a config file or shipped name for the non-shape fields saved with the
    checkpoint (None: the defaults, which never conflict with config.json).
    The model's shape comes from config.json, the dtype from ``dtype`` or config.json's
    ``torch_dtype``; ``data`` points at the folder's tokenizer (tokenizer.json or
    tokenizer.model) when it has one, else a null tokenizer of the model's vocabulary. Runs in the current world (one process, or
    every rank under torchrun with ``parallel.*`` overrides to split the memory); the
    checkpoint loads into any layout. Collectives: ``initialize_parallel``'s and
    ``save_checkpoint``'s.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_mile.run_config import load_run_config
    from megatron_mile.model import padded_vocab_size
    from megatron_mile.training.builders import build_model, initialize_parallel
    from megatron_mile.training.checkpointing import save_checkpoint

    hf = read_hf_config(hf_folder)
    dtype = dtype or _HF_DTYPES.get(hf.get("torch_dtype") or hf.get("dtype"), "fp32")
    has_tokenizer = any(os.path.isfile(os.path.join(hf_folder, name))
                        for name in ("tokenizer.json", "tokenizer.model"))
    data = ([f"data.tokenizer_model={os.path.abspath(hf_folder)}", "data.vocab_size=null"]
            if has_tokenizer else [f"data.vocab_size={hf.get('vocab_size')}",
                                   "data.tokenizer_model=null"])
    cfg = load_run_config(config, ["data.mock=true", "data.num_workers=0", *data,
                               f"precision.dtype={dtype}",
                               *(overrides or []),
                               f"checkpoint.init_from_hf={os.path.abspath(hf_folder)}"],
                      world_size=dist.get_world_size() if dist.is_initialized() else None)
    check_hf_shapes(hf_folder, cfg.model)  # before any memory is allocated for the model
    device = initialize_parallel(cfg)
    try:
        valid = cfg.model.vocab_size
        model = build_model(cfg, padded_vocab_size(valid, cfg), device, for_training=False,
                            valid_vocab_size=valid)
        import_hf_weights(hf_folder, model, cfg, valid)
        save_checkpoint(out_dir, 0, model, None, None,
                        {"iteration": 0, "consumed_samples": 0, "config": cfg.to_dict()})
    finally:
        parallel_state.destroy_model_parallel()
    return cfg
