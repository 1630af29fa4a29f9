"""Rebuild a trained model from a checkpoint, in a layout of the caller's choosing.

    cfg = read_checkpoint_config("runs/mile")                      # no process group needed
    model = load_inference_model("runs/mile", tp=1, pp=1)           # after initialize_distributed

Checkpoints are megatron ``dist_checkpointing`` state keyed by global tensor names, so a
TP=2 x PP=2 run loads into a TP=1 x PP=1 model (what the HF export does) or any other layout
that divides the model. The embedding rows are those of the saved model: the padded vocabulary
depends on the *training* TP size (``padded_vocab_size``), so it is recomputed from the saved
config, never from the loading layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mile.config import DTYPES, TrainConfig, config_from_dict
from megatron_mile.training import checkpoint
from megatron_mile.training.checkpoint import CheckpointError

@dataclass
class InferenceModel:
    """This rank's model chunk of a loaded checkpoint, and what produced it."""

    cfg: TrainConfig
    """The training config, with the parallel section replaced by the loading layout."""
    model: torch.nn.Module
    """A ``MileGPTModel`` (this pipeline stage), in eval mode."""
    vocab_size: int
    """Padded vocabulary size of the embedding/output layer (as trained)."""
    tokenizer_vocab_size: int
    """Vocabulary size of the tokenizer the model was trained with (<= vocab_size)."""
    iteration: int
    """Training iteration of the checkpoint."""
    device: torch.device


def resolve_iteration(load_dir: str, iteration: Optional[int] = None) -> int:
    """``iteration``, or the one the tracker file of ``load_dir`` names."""
    if iteration is not None:
        return iteration
    found = checkpoint.find(load_dir)
    if found is None:
        raise CheckpointError(f"{load_dir} holds no complete checkpoint (no tracker file); "
                              "pass the checkpoint.save directory of a finished run")
    return found


def read_checkpoint_state(load_dir: str, iteration: Optional[int] = None) -> dict:
    """The common (non-tensor) state of a checkpoint: ``extra_state`` and format metadata.

    Local, no collectives; ``checkpoint.read_common`` (``torch.load(weights_only=True)``).
    """
    return checkpoint.read_common(load_dir, resolve_iteration(load_dir, iteration))


def read_checkpoint_config(load_dir: str, iteration: Optional[int] = None,
                           overrides: Optional[list[str]] = None) -> TrainConfig:
    """The ``TrainConfig`` a checkpoint was trained with, plus dotted ``overrides``.

    Not validated against a world size (the caller changes the layout first).
    """
    extra = read_checkpoint_state(load_dir, iteration)["extra_state"]
    if "config" not in extra:
        raise CheckpointError(f"checkpoint in {load_dir} has no saved config (not written by "
                              "megatron_mile's Trainer)")
    return config_from_dict(extra["config"], overrides)


def trained_vocab_sizes(cfg: TrainConfig) -> tuple[int, int]:
    """(padded, tokenizer) vocabulary sizes of the model ``cfg`` trained (its own TP size)."""
    from megatron_mile.data.datasets import build_tokenizer
    from megatron_mile.model import padded_vocab_size

    tokenizer_vocab = cfg.model.vocab_size or build_tokenizer(cfg.data).vocab_size
    return padded_vocab_size(tokenizer_vocab, cfg), tokenizer_vocab


def load_inference_model(load_dir: str, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                         iteration: Optional[int] = None,
                         overrides: Optional[list[str]] = None) -> InferenceModel:
    """Initialise the process groups for TP=``tp`` x PP=``pp`` (DP = the rest of the world),
    build this rank's model chunk and load the checkpoint into it.

    Args:
        dtype: 'fp32', 'bf16' or 'fp16' for the parameters; None keeps the training dtype.
        overrides: dotted config overrides (e.g. a moved ``data.tokenizer_model``).

    Collectives: ``builders.initialize_parallel`` (the rendezvous unless a group exists,
    megatron's ``initialize_model_parallel``) and ``checkpoint.load``'s agreement and reads.
    """
    from megatron_mile.training.builders import build_model, initialize_parallel

    iteration = resolve_iteration(load_dir, iteration)
    layout = [f"parallel.tensor_model_parallel_size={tp}",
              f"parallel.pipeline_model_parallel_size={pp}",
              "parallel.virtual_pipeline_model_parallel_size=null",
              "parallel.sequence_parallel=false", "parallel.context_parallel_size=1",
              "parallel.use_distributed_optimizer=false",
              "model.recompute_granularity=null", "precision.fp8=null"]
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")
        layout.append(f"precision.dtype={dtype}")
    trained = read_checkpoint_config(load_dir, iteration, overrides)
    vocab_size, tokenizer_vocab = trained_vocab_sizes(trained)
    cfg = read_checkpoint_config(load_dir, iteration, (overrides or []) + layout)

    if vocab_size % tp:
        raise ValueError(f"the trained padded vocabulary ({vocab_size}) is not divisible by "
                         f"tp={tp}; pick a TP size that divides it")
    device = initialize_parallel(cfg)
    (model,) = build_model(cfg, vocab_size, device, for_training=False,
                           valid_vocab_size=tokenizer_vocab)
    checkpoint.load(load_dir, [model], None, None, iteration=iteration)
    model.eval()
    return InferenceModel(cfg=cfg, model=model, vocab_size=vocab_size,
                          tokenizer_vocab_size=tokenizer_vocab, iteration=iteration,
                          device=device)
