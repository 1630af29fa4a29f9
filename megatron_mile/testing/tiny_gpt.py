"""A debug-size megatron-core GPT and a deterministic training step, for multi-process tests.

Everything here runs inside a process where ``torch.distributed`` is initialised (e.g. under
``run_distributed``) and ``megatron_mile.launch.initialize_distributed()`` has been called.

Weights are the same for every TP size: ``use_cpu_initialization=True`` builds each weight's
full master copy from the CPU generator and keeps this rank's slice
(``tensor_parallel/layers.py`` ``_initialize_affine_weight_cpu``; SwiGLU's fc1 is split with
stride 2), and ``seed_everything`` puts the same CPU generator state on every rank. Pipeline
stages draw from the generator in a different order than one full model does, so PP layouts
get their weights from a full reference model with ``load_from_full_model``.

Shapes: ``tokens_bs`` / ``labels_bs`` are ``[micro_batch, seq]``; the model's loss output is
per token, ``[micro_batch, seq]``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_mile.model import check_pipeline_config


@dataclass(frozen=True)
class TinyGPT:
    """Shape of the debug model: RMSNorm, SwiGLU, RoPE, no bias, untied embeddings."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    vocab_size: int = 128
    seq_length: int = 16


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch CPU and megatron's RNG tracker identically on every rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(shape: TinyGPT, *, bf16: bool = False, vp_size: int | None = None
                       ) -> TransformerConfig:
    """TransformerConfig for ``shape`` at the current parallel_state's TP/PP sizes."""
    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=True,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=vp_size,
        # Interleaved schedule: overlapped, unbatched p2p, as Megatron-LM sets it. Batched p2p
        # with PP=2 (prev == next peer) pairs one rank's send_prev with the peer's recv_prev.
        overlap_p2p_comm=vp_size is not None,
        batch_p2p_comm=vp_size is None,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.float32,
        bf16=bf16,
    )
    check_pipeline_config(config)
    return config


def build_model_chunks(shape: TinyGPT, config: TransformerConfig) -> list[GPTModel]:
    """This rank's GPTModel chunks (one, or one per virtual pipeline stage)."""
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        chunks.append(GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=shape.vocab_size,
            max_sequence_length=shape.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            vp_stage=stage,
        ))
    return chunks


def load_from_full_model(chunk: GPTModel, full_state: dict[str, torch.Tensor]) -> None:
    """Copy weights from a single-stage model's state dict into a pipeline chunk.

    Chunk layer ``i`` is global layer ``chunk.decoder.layers[i].layer_number - 1``.
    """
    renamed = {}
    for i, layer in enumerate(chunk.decoder.layers):
        renamed[f"decoder.layers.{i}."] = f"decoder.layers.{layer.layer_number - 1}."
    own = chunk.state_dict()
    with torch.no_grad():
        for key, tensor in own.items():
            if key.endswith("_extra_state"):
                continue
            src = key
            for local, global_ in renamed.items():
                if key.startswith(local):
                    src = global_ + key[len(local):]
                    break
            tensor.copy_(full_state[src])


def wrap_for_training(chunks: list[GPTModel], config: TransformerConfig, *,
                      use_distributed_optimizer: bool = False) -> list[DistributedDataParallel]:
    """Float16Module (if bf16) + megatron DDP around each chunk, as Megatron-LM does."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if config.bf16 else chunk
        wrapped.append(DistributedDataParallel(
            config, ddp_config, module,
            # As Megatron-LM: only the first chunk's bucketing may be tuned.
            disable_bucketing=i > 0,
        ))
    return wrapped


def build_optimizer(model: list[DistributedDataParallel], config: TransformerConfig, *,
                    lr: float = 1e-3, use_distributed_optimizer: bool = False):
    """Megatron Adam with grad clipping; wires the config hooks the schedules call."""
    opt_config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=lr / 10, weight_decay=0.01, clip_grad=1.0, bf16=config.bf16,
        params_dtype=torch.float32, use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    return optimizer


def build_scheduler(optimizer, *, lr: float = 1e-3, steps: int = 100) -> OptimizerParamScheduler:
    """Warmup-cosine LR scheduler over ``steps`` iterations (its state matters on resume)."""
    return OptimizerParamScheduler(
        optimizer, init_lr=lr / 10, max_lr=lr, min_lr=lr / 10, lr_warmup_steps=2,
        lr_decay_steps=steps, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
        wd_incr_steps=steps, wd_incr_style="constant",
    )


def make_batches(shape: TinyGPT, *, seed: int, count: int, micro_batch_size: int = 2
                 ) -> list[dict[str, torch.Tensor]]:
    """``count`` deterministic micro-batches, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        seq_bs = torch.randint(0, shape.vocab_size, (micro_batch_size, shape.seq_length + 1),
                               generator=gen)
        batches.append({"tokens_bs": seq_bs[:, :-1].contiguous(),
                        "labels_bs": seq_bs[:, 1:].contiguous()})
    return batches


def _loss_func(loss_mask_bs: torch.Tensor, per_token_loss_bs: torch.Tensor):
    loss_sum = (per_token_loss_bs.float() * loss_mask_bs).sum()
    num_tokens = loss_mask_bs.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(),
                                                          num_tokens.float()])}


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model):
    """megatron forward_step: ``(per-token loss [b, s], partial(loss_func, mask))``."""
    batch = next(data_iterator)
    tokens_bs = batch["tokens_bs"]
    seq = tokens_bs.shape[1]
    position_ids_bs = torch.arange(seq).unsqueeze(0).expand_as(tokens_bs)
    output = model(tokens_bs, position_ids_bs, attention_mask=None, labels=batch["labels_bs"])
    return output, partial(_loss_func, torch.ones_like(tokens_bs, dtype=torch.float))


def train_step(model: list[DistributedDataParallel], optimizer, scheduler,
               batches: list[dict[str, torch.Tensor]], shape: TinyGPT,
               micro_batch_size: int = 2) -> tuple[float, float]:
    """One optimizer step over ``batches`` (one per micro-batch).

    Returns ``(mean token loss, global grad norm before clipping)``, equal on every rank.

    Collectives: the schedule's p2p (PP), DDP grad reduction (DP), optimizer grad-norm
    all-reduce, and one broadcast of the loss from the last pipeline stage to its PP group.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    data = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
    # Every chunk reads its own copy of the batches: only the first and last use them.
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data,
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches), seq_length=shape.seq_length,
        micro_batch_size=micro_batch_size, forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise RuntimeError("optimizer step was skipped (inf/nan in grads)")
    scheduler.step(increment=1)  # steps counted in iterations
    loss = torch.zeros(1, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        totals = torch.stack([r["lm loss"] for r in reports]).sum(0)
        loss[0] = totals[0].double() / totals[1].double()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(loss, src=last, group=pp_group)
    return float(loss.item()), float(grad_norm)


def eval_loss(model: list, batches: list[dict[str, torch.Tensor]], shape: TinyGPT,
              micro_batch_size: int = 2) -> float:
    """Forward-only mean token loss over ``batches`` (no grads, no optimizer), on every rank.

    Collectives: the schedule's p2p (PP) and one broadcast over the PP group.
    """
    data = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data,
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches), seq_length=shape.seq_length,
        micro_batch_size=micro_batch_size, forward_only=True,
    )
    loss = torch.zeros(1, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        totals = torch.stack([r["lm loss"] for r in reports]).sum(0)
        loss[0] = totals[0].double() / totals[1].double()
    dist.broadcast(loss, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return float(loss.item())
