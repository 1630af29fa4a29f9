"""A local Hugging Face model folder -> this rank's model chunks (any TP/PP/VPP/DP layout), or
-> a regular megatron-mile checkpoint (``megatron-mile-import-hf``).

    cfg = load_run_config("llama_6.7b", ["checkpoint.init_from_hf=/models/llama-2-7b"])  # shape
    model = build_model(cfg, padded_vocab, device)                        # this rank's chunks
    import_hf_weights(cfg.checkpoint.init_from_hf, model, cfg, valid_vocab_size)

Memory: every rank opens the safetensors memory-mapped and reads only its own TP slice of its
own pipeline stage's tensors, one tensor at a time, straight into its parameters
(:class:`~megatron_mile.hf.safetensors.HFCheckpoint`). Reads only local files.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_mile.config import TrainConfig
from megatron_mile.errors import CheckpointError
from megatron_mile.hf.config import DTYPE_NAMES, read_hf_config
from megatron_mile.hf.safetensors import HFCheckpoint
from megatron_mile.hf.tensors import Shapes, check_hf_shapes, read_local
from megatron_mile.models import ModelFamily, TensorMap, get_family

__all__ = ["import_hf_weights", "import_to_checkpoint"]


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The MileGPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _local_tensors(model, family: ModelFamily,
                   tied: bool) -> list[tuple[torch.nn.Parameter, TensorMap, str]]:
    """(parameter, table entry, HF name prefix) for every parameter of this rank's chunks."""
    out = []
    for chunk in map(_unwrap, model):
        if chunk.pre_process:
            out.append((chunk.embedding.word_embeddings.weight, family.embedding, ""))
        for layer in chunk.decoder.layers:
            i = layer.layer_number - 1  # global, pipeline offset included
            for entry in family.layer_tensors:
                try:
                    param = layer.get_parameter(entry.megatron)
                except AttributeError:  # Transformer Engine's spec: the norm sits in a linear
                    param = layer.get_parameter(entry.te or entry.megatron)
                out.append((param, entry, f"{family.hf_layer_prefix}{i}."))
        if chunk.post_process:
            out.append((chunk.decoder.final_layernorm.weight, family.final_norm, ""))
            weight = chunk.output_layer.weight
            if weight is not None:  # tied at PP=1: the embedding is the output layer
                out.append((weight, family.embedding if tied else family.output, ""))
    return out


@torch.no_grad()
def import_hf_weights(folder: str, model: list[torch.nn.Module], cfg: TrainConfig,
                      valid_vocab_size: int) -> int:
    """Copy a HF folder's weights (of ``cfg.model.family``) into this rank's model chunks
    (any TP, SP, PP, VPP, DP; wrapped in DDP/Float16Module or not); returns the number of
    tensors set.

    Call before the optimizer is built (its fp32 master weights copy the parameters). Each
    rank reads its own slices; the padded vocabulary rows are zero. ``cfg.model`` must carry
    config.json's shape (:func:`~megatron_mile.hf.config.apply_hf_model_config`). No
    collectives.

    Raises:
        CheckpointError: a tensor is missing, has an unexpected shape, or a parameter of the
            model has no HF counterpart.
    """
    from megatron.core import parallel_state

    family = get_family(cfg.model.family)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    shapes = Shapes.of(cfg.model)
    ckpt = HFCheckpoint(folder, family)
    try:
        tied = not cfg.model.untie_embeddings
        output = family.output.hf[0]
        if not tied and not ckpt.has(output):
            raise CheckpointError(f"{folder}: {output} is missing but config.json has "
                                  "tie_word_embeddings=false")
        tensors = _local_tensors(model, family, tied)
        covered = {id(p) for p, _, _ in tensors}
        for chunk in model:
            for name, p in chunk.named_parameters():
                if id(p) not in covered:
                    raise CheckpointError(f"parameter {name} has no Hugging Face counterpart "
                                          f"(the tensor table of megatron_mile/models, family "
                                          f"{family.name!r})")
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


_DTYPES = {name: short for short, name in DTYPE_NAMES.items()}


def import_to_checkpoint(hf_folder: str, out_dir: str, *, config: Optional[str] = None,
                         overrides: Optional[list[str]] = None,
                         dtype: Optional[str] = None) -> TrainConfig:
    """Write ``hf_folder`` as a regular megatron-mile checkpoint (iteration 0, no optimizer
    state) into ``out_dir``, so that a large import runs once; returns the config it saved.

    ``config``: a config file or shipped name for the non-shape fields saved with the
    checkpoint (None: the defaults, which never conflict with config.json).
    The model's family and shape come from config.json, the dtype from ``dtype`` or
    config.json's ``torch_dtype``; ``data`` points at the folder's tokenizer (tokenizer.json
    or tokenizer.model) when it has one, else a null tokenizer of the model's vocabulary.
    Runs in the current world (one process, or every rank under torchrun with ``parallel.*``
    overrides to split the memory); the checkpoint loads into any layout. Collectives:
    ``initialize_parallel``'s and ``checkpoint.save``'s.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_mile.model import padded_vocab_size
    from megatron_mile.run_config import load_run_config
    from megatron_mile.training.builders import build_model, initialize_parallel
    from megatron_mile.training import checkpoint

    hf = read_hf_config(hf_folder)
    dtype = dtype or _DTYPES.get(hf.get("torch_dtype") or hf.get("dtype"), "fp32")
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
    # before any memory is allocated for the model
    check_hf_shapes(hf_folder, cfg.model, get_family(cfg.model.family))
    device = initialize_parallel(cfg)
    try:
        valid = cfg.model.vocab_size
        model = build_model(cfg, padded_vocab_size(valid, cfg), device, for_training=False,
                            valid_vocab_size=valid)
        import_hf_weights(hf_folder, model, cfg, valid)
        checkpoint.save(out_dir, 0, model, None, None,
                        {"iteration": 0, "consumed_samples": 0, "config": cfg.to_dict()})
    finally:
        parallel_state.destroy_model_parallel()
    return cfg
