"""megatron-mile checkpoint -> Hugging Face ``LlamaForCausalLM`` folder.

The checkpoint (any TP/PP layout) is loaded into a TP=1, PP=1 model, which merges the shards
(``load_inference_model``), and its full tensors are renamed:

=========================================================  ======================================
megatron-mile (megatron-core local spec)                   transformers LlamaForCausalLM
=========================================================  ======================================
embedding.word_embeddings.weight        [V, h]             model.embed_tokens.weight
decoder.layers.i.input_layernorm.weight                    model.layers.i.input_layernorm.weight
decoder.layers.i.self_attention.linear_qkv.weight          q_proj / k_proj / v_proj (split below)
decoder.layers.i.self_attention.linear_proj.weight         model.layers.i.self_attn.o_proj.weight
decoder.layers.i.pre_mlp_layernorm.weight                  model.layers.i.post_attention_layernorm
decoder.layers.i.mlp.linear_fc1.weight  [2 f, h]           gate_proj (first f rows), up_proj (last)
decoder.layers.i.mlp.linear_fc2.weight                     model.layers.i.mlp.down_proj.weight
decoder.final_layernorm.weight                             model.norm.weight
output_layer.weight                     [V, h]             lm_head.weight (untied)
=========================================================  ======================================

Conventions checked by tests/test_export_hf.py (logits equal to 1e-4 in fp32):

* ``linear_qkv`` rows are grouped per query group g: ``[q heads of g (np/ng x hn); k_g (hn);
  v_g (hn)]``; HF's ``repeat_kv`` pairs query head j with kv head ``j // (np/ng)``, the same
  grouping, so q/k/v are the per-group slices in order (GQA needs no permutation).
* RoPE: megatron-core rotates halves (``rotary_interleaved=False``: ``[-x2, x1]``) with
  ``inv_freq = base ** (-2i/d)`` and ``cat(freqs, freqs)``: HF Llama's ``rotate_half``. So q/k
  rows are NOT permuted (the permutation HF's Meta-LLaMA converter applies is for Meta's
  interleaved checkpoints).
* SwiGLU: megatron computes ``silu(x W1a) * (x W1b)`` with ``[W1a; W1b] = linear_fc1``
  (loaded at TP=1, i.e. the TP shards' halves already regrouped by megatron's sharded state
  dict): gate = first half, up = second half.
* RMSNorm ``x * rsqrt(mean(x^2) + eps) * w`` with the model's ``norm_epsilon``; no biases.
* Vocabulary: training and evaluation leave the rows padded for TP out of the softmax
  (``valid_vocab_size``), so the export cuts both matrices to the real vocabulary
  (``trim_vocab=True``, the default): exactly the trained distribution, and a bit-exact round
  trip of an imported HF model. ``trim_vocab=False`` keeps the PADDED rows (``vocab_size`` in
  config.json = padded size, e.g. for tools that want a multiple of 128): the logits of the
  real rows equal megatron's exactly, but HF's softmax then also counts the padded rows, at
  their initial values (they get no gradient).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megatron_mile.config import TrainConfig

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def llama_state_dict(state: dict[str, torch.Tensor], cfg: TrainConfig,
                     rows: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Rename/split a TP=1, PP=1 megatron-mile state dict into HF Llama's names, through the
    tensor table the import uses too (``megatron_mile.checkpoint_hf``).

    Args:
        state: the model's ``state_dict()`` (``_extra_state`` entries are ignored).
        rows: keep the first ``rows`` vocabulary rows (None: all, i.e. padded).
    """
    from megatron_mile.checkpoint_hf import (
        HF_EMBEDDING, HF_FINAL_NORM, HF_LAYER_TENSORS, HF_OUTPUT, Shapes, split_full,
    )

    shapes = Shapes.of(cfg.model)
    globals_ = [HF_EMBEDDING, HF_FINAL_NORM] + ([HF_OUTPUT] if cfg.model.untie_embeddings
                                                else [])  # tied: lm_head is the embedding
    out = {}
    for entry in globals_:
        out.update(split_full(entry, state[entry.megatron], shapes, rows))
    for i in range(cfg.model.num_layers):
        for entry in HF_LAYER_TENSORS:
            full = state[f"decoder.layers.{i}.{entry.megatron}"]
            for name, tensor in split_full(entry, full, shapes).items():
                out[f"model.layers.{i}.{name}"] = tensor
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def llama_config(cfg: TrainConfig, vocab_size: int, dtype: torch.dtype,
                 special: dict[str, Optional[int]]) -> dict:
    """config.json of the equivalent ``LlamaForCausalLM``."""
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
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
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": not m.untie_embeddings,
        "initializer_range": m.init_method_std,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "torch_dtype": _DTYPE_NAMES[dtype],
        "use_cache": True,
    }


def _special_ids(tokenizer_model: Optional[str]) -> dict[str, Optional[int]]:
    if tokenizer_model is None:
        return {}
    from megatron_mile.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_model)
    ids = {"bos": tok.bos, "eos": tok.eos, "unk": tok.unk, "pad": tok.pad}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def write_tokenizer(tokenizer_model: str, out_dir: str) -> None:
    """Write the training tokenizer's files into the HF folder.

    A Hugging Face ``tokenizer.json`` is copied with the ``tokenizer_config.json`` and
    ``special_tokens_map.json`` beside it (or, without them, a ``PreTrainedTokenizerFast``
    config naming its BOS/EOS/PAD/UNK), so the folder loads with the same tokenizer.
    A SentencePiece model is copied and described as HF's ``LlamaTokenizer``; no BOS/EOS is
    added when encoding: the model was trained on documents without a BOS
    (``megatron-mile-preprocess`` appends only ``</s>``).
    """
    from megatron_mile.data.tokenizer import HFTokenizer, load_tokenizer

    tok = load_tokenizer(tokenizer_model)
    if isinstance(tok, HFTokenizer):
        src = os.path.dirname(tok.path)
        shutil.copyfile(tok.path, os.path.join(out_dir, "tokenizer.json"))
        copied = [name for name in ("tokenizer_config.json", "special_tokens_map.json")
                  if os.path.isfile(os.path.join(src, name))]
        for name in copied:
            shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
        if "tokenizer_config.json" in copied:
            return
        tokens = {f"{name}_token": tok.token(i) for name, i in
                  (("bos", tok.bos), ("eos", tok.eos), ("unk", tok.unk), ("pad", tok.pad))
                  if i >= 0}
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "clean_up_tokenization_spaces": False, "model_max_length": None, **tokens}
    else:
        shutil.copyfile(tok.path, os.path.join(out_dir, "tokenizer.model"))
        sp = tok._sp
        tokens = {name: sp.id_to_piece(i) for name, i in
                  (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                   ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())) if i >= 0}
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                  "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": None, **tokens}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(tokens, f, indent=2)


HF_FOLDER_FILES = ("config.json", "generation_config.json", "*.safetensors",
                   "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
                   "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
"""Files of a Hugging Face model folder that a loader reads: with ``overwrite`` every one of
them is removed before the export writes its own, so no stale shard or index is picked up."""


def check_export_target(load_dir: str, out_dir: str, overwrite: bool) -> None:
    """Refuse to export into the checkpoint's own folder (or inside it) or into a non-empty
    folder unless ``overwrite``. Local, no collectives; every rank reaches the same verdict.

    Raises:
        FileExistsError: one line naming the folder and ``--overwrite``.
    """
    out, load = os.path.realpath(out_dir), os.path.realpath(load_dir)
    if overwrite:
        return
    if os.path.commonpath([out, load]) == load:
        raise FileExistsError(f"--output {out_dir} is the checkpoint folder --load {load_dir} "
                              "or inside it: export elsewhere, or pass --overwrite to mix the "
                              "Hugging Face files into it")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"--output {out_dir} is not empty ({len(os.listdir(out_dir))} "
                              "entries): export into a new folder, or pass --overwrite to "
                              "replace its Hugging Face files (stale shards and index included)")


def _remove_hf_files(out_dir: str) -> list[str]:
    """Remove the :data:`HF_FOLDER_FILES` of ``out_dir``; returns their names."""
    import glob

    removed = sorted({os.path.basename(p) for pattern in HF_FOLDER_FILES
                      for p in glob.glob(os.path.join(glob.escape(out_dir), pattern))
                      if os.path.isfile(p) or os.path.islink(p)})
    for name in removed:
        os.remove(os.path.join(out_dir, name))
    return removed


def export_checkpoint(load_dir: str, out_dir: str, *, dtype: Optional[str] = None,
                      trim_vocab: bool = True, iteration: Optional[int] = None,
                      overrides: Optional[list[str]] = None, overwrite: bool = False) -> dict:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files into ``out_dir``.

    Call in a world of one process (``default_single_process_env``) or, under torchrun, on
    every rank: the model is loaded at TP=1, PP=1 (DP = world size) and rank 0 writes.
    ``out_dir`` must be a new or empty folder outside ``load_dir`` unless ``overwrite``, which
    first removes the folder's Hugging Face files (:data:`HF_FOLDER_FILES`: an older export's
    shards and index would otherwise be what a loader reads). ``model.safetensors`` is written
    under a temporary name and renamed. Returns the config dict.
    Collectives: ``load_inference_model``'s, then a barrier.

    Raises:
        FileExistsError: ``out_dir`` is in the checkpoint or not empty, without ``overwrite``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors.torch import save_file

    from megatron_mile.evaluation.loading import load_inference_model
    from megatron_mile.utils import atomic_write_text, temp_file_prefix

    check_export_target(load_dir, out_dir, overwrite)
    loaded = load_inference_model(load_dir, tp=1, pp=1, dtype=dtype, iteration=iteration,
                                  overrides=overrides)
    try:
        cfg = loaded.cfg
        tokenizer_model = cfg.data.tokenizer_model
        rows = loaded.tokenizer_vocab_size if trim_vocab else loaded.vocab_size
        weights = llama_state_dict(loaded.model.state_dict(), cfg, rows)
        config = llama_config(cfg, rows, cfg.precision.torch_dtype, _special_ids(tokenizer_model))
        config["megatron_mile"] = {"checkpoint": os.path.abspath(load_dir),
                                   "iteration": loaded.iteration, "loss": cfg.loss.type,
                                   "padded_vocab_size": loaded.vocab_size,
                                   "tokenizer_vocab_size": loaded.tokenizer_vocab_size}
        if dist.get_rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
            if overwrite:
                _remove_hf_files(out_dir)
            weights_file = os.path.join(out_dir, "model.safetensors")
            tmp = os.path.join(out_dir, f"{temp_file_prefix('model.safetensors')}{os.getpid()}")
            save_file({k: v.cpu() for k, v in weights.items()}, tmp, metadata={"format": "pt"})
            os.replace(tmp, weights_file)
            atomic_write_text(os.path.join(out_dir, "config.json"),
                              json.dumps(config, indent=2))
            atomic_write_text(os.path.join(out_dir, "generation_config.json"), json.dumps(
                {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
                indent=2))
            if tokenizer_model is not None:
                write_tokenizer(tokenizer_model, out_dir)
        dist.barrier()
    finally:
        parallel_state.destroy_model_parallel()
    return config
