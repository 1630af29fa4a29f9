"""Process groups, model and optimizer of a run: the one way the trainer, the evaluation loader
and the tests build them.

    device = initialize_parallel(cfg)                  # process group, TP/PP/CP/DP groups, seeds
    model = build_model(cfg, vocab_size, device)       # this rank's chunks, DDP-wrapped
    optimizer, scheduler = build_optimizer(cfg, model)

    model = build_model(cfg, vocab_size, device, for_training=False)   # bare chunks (eval)
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_mile.config import TrainConfig
from megatron_mile.cpu_compat import cuda_available
from megatron_mile.fusions import check_kernels
from megatron_mile.launch import initialize_distributed
from megatron_mile.model import build_model_chunk, check_pipeline_config, transformer_config

__all__ = ["build_model", "build_optimizer", "initialize_parallel", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's TP-aware RNG tracker (dropout inside TP
    regions, weight init on GPU). Local, no collectives."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_parallel(cfg: TrainConfig) -> torch.device:
    """Join the job's process group, check ``cfg``'s layout against the world size, create
    megatron's TP/PP/CP/DP groups and seed every generator; return this rank's device.

    Collectives: the process-group rendezvous (unless a group exists; timeout
    ``parallel.distributed_timeout_minutes``) and megatron's ``initialize_model_parallel``
    (group creation on every rank).

    Raises:
        ConfigError: the layout does not fit the world size or the model, or the kernels
            it asks for are not here (:func:`megatron_mile.fusions.check_kernels`).
    """
    p = cfg.parallel
    device = initialize_distributed(timeout_minutes=p.distributed_timeout_minutes)
    cfg.validate(dist.get_world_size())
    check_kernels(cfg)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
    )
    seed_everything(cfg.training.seed)
    return device


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, *,
                for_training: bool = True,
                valid_vocab_size: Optional[int] = None) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage) of ``MileGPTModel``.

    ``vocab_size`` is the padded row count (:func:`~megatron_mile.model.padded_vocab_size`),
    ``valid_vocab_size`` the real vocabulary before padding: the loss ignores the padded
    columns (None: no padding to ignore).

    With ``for_training``: in ``Float16Module`` for bf16/fp16 (as Megatron-LM), in megatron's
    ``DistributedDataParallel`` (fp32 gradient buffers, the configured overlap and distributed
    optimizer), parameters broadcast from DP rank 0. Without: the bare chunks on ``device``.
    On CPU every full weight is drawn from one generator and sliced, so the initial weights
    do not depend on the TP size (what the layout-equivalence tests rely on).

    Collectives: with ``for_training``, DDP's parameter broadcast over DP.
    """
    config = transformer_config(cfg, use_cpu_initialization=not cuda_available())
    check_pipeline_config(config)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = build_model_chunk(
            cfg, config, vocab_size,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                                vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            vp_stage=stage, valid_vocab_size=valid_vocab_size,
        )
        chunks.append(chunk.to(device))
    if not for_training:
        return chunks
    if cfg.precision.dtype in ("bf16", "fp16"):
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    chunks = [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
              for i, c in enumerate(chunks)]
    for c in chunks:
        c.broadcast_params()
    return chunks


def build_optimizer(cfg: TrainConfig, model: list[torch.nn.Module]):
    """megatron's Adam optimizer (clipping, loss scaling, distributed optimizer) over ``model``
    and its ``OptimizerParamScheduler``; returns ``(optimizer, scheduler)``.

    The scheduler takes the checkpoint's values on load unless
    ``checkpoint.override_opt_param_scheduler``; refusing a schedule that differs from the
    config is the trainer's check (one clear error naming the fields). No collectives.
    """
    o, prec, ck = cfg.optimizer, cfg.precision, cfg.checkpoint
    opt_config = MegatronOptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=prec.dtype == "bf16", fp16=prec.dtype == "fp16",
        params_dtype=prec.torch_dtype,
        initial_loss_scale=prec.initial_loss_scale if prec.dtype == "fp16" else None,
        min_loss_scale=prec.min_loss_scale, loss_scale_window=prec.loss_scale_window,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    train_iters = cfg.training.train_iters
    decay_steps = o.lr_decay_iters or train_iters
    # megatron's scheduler needs warm-up < decay: a short debug run (train_iters=10 on a
    # 2000-step warm-up config) warms up for all but its last step.
    warmup_steps = min(o.lr_warmup_iters, max(decay_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=max(decay_steps, warmup_steps + 1),
        lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not ck.override_opt_param_scheduler,
        override_opt_param_scheduler=ck.override_opt_param_scheduler,
    )
    return optimizer, scheduler
