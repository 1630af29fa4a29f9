"""megatron-mile checkpoint -> Hugging Face model folder of the run's family
(``model.family``: its architecture, config.json and tensor names come from
``megatron_mile/models/<family>.py``), with the tokenizer files, ready for
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

The checkpoint (any TP/PP layout) is loaded into a TP=1, PP=1 model, which merges the shards
(``load_inference_model``), and its full tensors are renamed and split through the family's
tensor table (the one the import uses too, so the two directions cannot drift; the layouts:
:class:`~megatron_mile.models.family.TensorMap`, the conventions: the family's module).

Vocabulary: training and evaluation leave the rows padded for TP out of the softmax
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
from typing import Optional

import torch

from megatron_mile.config import TrainConfig
from megatron_mile.hf.config import export_hf_config
from megatron_mile.hf.tensors import Shapes, split_full
from megatron_mile.hf.tokenizer import special_token_ids, write_tokenizer
from megatron_mile.models import get_family

__all__ = ["HF_FOLDER_FILES", "check_export_target", "export_checkpoint", "hf_state_dict"]


def hf_state_dict(state: dict[str, torch.Tensor], cfg: TrainConfig,
                  rows: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Rename/split a TP=1, PP=1 megatron-mile state dict into the HF names of
    ``cfg.model.family``, through the family's tensor table.

    Args:
        state: the model's ``state_dict()`` (``_extra_state`` entries are ignored).
        rows: keep the first ``rows`` vocabulary rows (None: all, i.e. padded).
    """
    family = get_family(cfg.model.family)
    shapes = Shapes.of(cfg.model)
    globals_ = [family.embedding, family.final_norm] + (
        [family.output] if cfg.model.untie_embeddings else [])  # tied: lm_head is the embedding
    out = {}
    for entry in globals_:
        out.update(split_full(entry, state[entry.megatron], shapes, rows))
    for i in range(cfg.model.num_layers):
        for entry in family.layer_tensors:
            full = state[f"decoder.layers.{i}.{entry.megatron}"]
            for name, tensor in split_full(entry, full, shapes).items():
                out[f"{family.hf_layer_prefix}{i}.{name}"] = tensor
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


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
    """Write ``config.json`` (the family's architecture), ``model.safetensors``,
    ``generation_config.json`` and the tokenizer files into ``out_dir``.

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
        weights = hf_state_dict(loaded.model.state_dict(), cfg, rows)
        config = export_hf_config(cfg, rows, special_token_ids(tokenizer_model))
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
