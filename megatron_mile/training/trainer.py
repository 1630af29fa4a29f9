"""GPT pretraining on megatron-core pieces: the loop Megatron-LM's ``megatron/training`` runs,
written out small (megatron-core's wheel does not ship ``megatron/training``).

    trainer = Trainer(cfg)       # builds nothing yet
    trainer.setup()              # process groups, model, optimizer, data, resume
    summary = trainer.train()    # iterations, evaluation, checkpoints, logs

Shape legend: b micro-batch, s sequence.
Per iteration, collectives beyond the model's own: megatron's schedule (p2p between stages,
DP gradient reduction in ``finalize_model_grads``), one SUM all-reduce of the loss report
over DP (x CP), one MAX all-reduce of [signal, non-finite, elapsed minutes] over the world,
which is how every rank reaches the same decision to stop (signal, time limit).
"""

from __future__ import annotations

import math
import resource
import signal
import time
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megatron_mile import context_parallel
from megatron_mile.config import ConfigError, TrainConfig
from megatron_mile.cpu_compat import cuda_available
from megatron_mile.data.datasets import build_data_loader, build_datasets, build_tokenizer
from megatron_mile.fusions import Kernels, kernel_notice, resolve_transformer_impl
from megatron_mile.launch import job_start_time
from megatron_mile.loss import LossNormalizer, WeightedCrossEntropy
from megatron_mile.model import flops_per_token, num_parameters, padded_vocab_size
from megatron_mile.training import checkpointing
from megatron_mile.training.builders import build_model, build_optimizer, initialize_parallel
from megatron_mile.training.logger import MetricsLogger
from megatron_mile.training.watchdog import Watchdog

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Report keys that are (numerator, denominator) pairs summed over micro-batches and DP ranks.
_PAIR_KEYS = ("lm_loss", "objective", "entropy", "weight", "alpha")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf."""


class _WorldFlags(NamedTuple):
    """What the ranks agree on after each step (one MAX all-reduce)."""

    signal: bool
    """Some rank received SIGTERM/SIGUSR1/SIGINT."""
    non_finite: bool
    """Some rank's loss is NaN or inf."""
    elapsed_minutes: float
    """Minutes since the job started (the largest over ranks)."""


class Trainer:
    """Owns the model chunks, optimizer, scheduler, data iterators and counters of one run."""

    def __init__(self, cfg: TrainConfig, *,
                 step_callbacks: Sequence[Callable[["Trainer", dict], None]] = ()):
        """``step_callbacks`` run on every rank after each optimizer step, with the trainer and
        that step's metrics (which they may change), before the ranks agree on stopping:
        custom logging, or a test injecting a signal or a non-finite loss."""
        self.cfg = cfg
        self.step_callbacks = list(step_callbacks)
        self.rank = 0  # global rank, set by setup()
        self.iteration = 0
        self.consumed_samples = 0
        self._signal_received = False
        self.watchdog: Optional[Watchdog] = None
        self._previous_handlers: dict = {}
        self.job_start = job_start_time()  # agreed over ranks (the earliest) in setup()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        self.device = initialize_parallel(cfg)
        world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        if cfg.training.exit_duration_in_mins is not None:
            start = torch.tensor([self.job_start], dtype=torch.float64, device=self.device)
            dist.all_reduce(start, op=dist.ReduceOp.MIN)
            self.job_start = start.item()
        p = cfg.parallel
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.cp_group = parallel_state.get_context_parallel_group()
        self.normalizer = LossNormalizer(cfg.loss.normalization, self.dp_cp_group,
                                         self.cp_group)
        self.num_microbatches = cfg.training.global_batch_size // (
            cfg.training.micro_batch_size * self.dp_size)

        self.logger = MetricsLogger(cfg, is_logging_rank=dist.get_rank() == world_size - 1)
        self.tokenizer = build_tokenizer(cfg.data)
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({self.tokenizer.vocab_size}, {cfg.data.tokenizer_model or 'data.vocab_size'}"
                "): its ids would index past the embedding. Set model.vocab_size to at least "
                f"{self.tokenizer.vocab_size}, or leave it unset (null) to take the tokenizer's")
        # The real vocabulary (the padded rows behind it count nowhere in the loss) and the
        # embedding's rows, padded to the TP padding unit.
        self.valid_vocab_size = cfg.model.vocab_size or self.tokenizer.vocab_size
        self.vocab_size = padded_vocab_size(self.valid_vocab_size, cfg)
        self._build_datasets()  # before the model: a missing data path fails fast
        # From here on every phase is bounded: a hung peer ends this rank (datasets are built
        # before, on rank 0 first, for as long as a large corpus needs).
        if cfg.training.exit_on_signal:
            self._previous_handlers = {sig: signal.signal(sig, self._on_signal)
                                       for sig in _SIGNALS}
        self.watchdog = Watchdog(p.distributed_timeout_minutes * 60, self.rank).start()
        try:
            self.watchdog.beat(0, "building the model")
            self.model = build_model(cfg, self.vocab_size, self.device,
                                     valid_vocab_size=self.valid_vocab_size)
            load_dir = self._resume_dir()
            if load_dir is None and cfg.checkpoint.init_from_hf:
                # Before the optimizer: its fp32 master weights copy the parameters.
                self.watchdog.beat(0, "importing the Hugging Face checkpoint")
                self._import_hf()
            self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
            model_config = get_model_config(self.model[0])
            model_config.grad_scale_func = self.optimizer.scale_loss
            model_config.finalize_model_grads_func = self._finalize_model_grads
            no_sync = [c.no_sync for c in self.model]
            model_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            self.watchdog.beat(0, "loading the checkpoint")
            self._resume(load_dir)
            self.train_iterator = self._iterators(self.train_dataset, self.consumed_samples,
                                                  cfg.data.num_workers)
        except BaseException:
            self._release_process_hooks()
            raise
        params = num_parameters(cfg, self.vocab_size)
        self.logger.info(
            f"model: {params['total'] / 1e6:.2f}M parameters ({params['non_embedding'] / 1e6:.2f}M"
            f" non-embedding), padded vocab {self.vocab_size}; world {world_size} = TP "
            f"{p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x CP "
            f"{p.context_parallel_size} x DP {self.dp_size}; {self.num_microbatches} "
            f"micro-batches/step; loss {cfg.loss.type} (gamma {cfg.loss.gamma}, sigma "
            f"{cfg.loss.sigma}, {cfg.loss.normalization}); device {self.device}, "
            f"dtype {cfg.precision.dtype}")
        kernels = Kernels.detect()
        notice = kernel_notice(resolve_transformer_impl(cfg.model.transformer_impl, kernels),
                               kernels)
        if notice:
            self.logger.info(notice)

    def _build_datasets(self) -> None:
        cfg = self.cfg
        t = cfg.training
        gbs = t.global_batch_size
        evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 1
        num_samples = (t.train_iters * gbs, evals * t.eval_iters * gbs, t.eval_iters * gbs)
        train_ds, valid_ds, _ = build_datasets(cfg.data, self.tokenizer, cfg.model.seq_length,
                                               num_samples, t.seed)
        self.train_dataset, self.valid_dataset = train_ds, valid_ds

    def _iterators(self, dataset, consumed_samples: int, num_workers: int):
        """One iterator per model chunk, over the same samples: with interleaved pipelining
        the schedule calls ``next`` on the first chunk for the tokens and on the last chunk
        for the labels of the same micro-batch."""
        iterators = [
            iter(build_data_loader(dataset, consumed_samples, self.cfg.training.micro_batch_size,
                                   self.dp_rank, self.dp_size, num_workers,
                                   seed=self.cfg.training.seed))
            for _ in self.model
        ]
        return iterators[0] if len(iterators) == 1 else iterators

    def _valid_iterator(self):
        if self.valid_dataset is None:
            return None
        # Every evaluation reads the same first eval_iters global batches: comparable numbers.
        return self._iterators(self.valid_dataset, 0, 0)

    # ------------------------------------------------------------------ checkpoints

    def _resume_dir(self) -> Optional[str]:
        """The checkpoint this run resumes from: checkpoint.load, or (auto_resume) the save
        directory when it holds a complete checkpoint; None for a fresh start."""
        ck = self.cfg.checkpoint
        if ck.load is not None:
            return ck.load
        if ck.auto_resume and ck.save:
            if checkpointing.find_latest_checkpoint(ck.save) is not None:
                return ck.save
            self.logger.info(f"no checkpoint in {ck.save}: starting from scratch"
                             + (f" (weights of {ck.init_from_hf})" if ck.init_from_hf else ""))
        return None

    def _import_hf(self) -> None:
        """Load checkpoint.init_from_hf's weights into this rank's slices of the model."""
        from megatron_mile.checkpoint_hf import import_hf_weights

        folder = self.cfg.checkpoint.init_from_hf
        start = time.time()
        count = import_hf_weights(folder, self.model, self.cfg, self.valid_vocab_size)
        self.logger.info(f"imported {count} tensors of {folder} into this layout in "
                         f"{time.time() - start:.1f} s (fresh optimizer, configured schedule)")

    def _resume(self, load_dir: Optional[str]) -> None:
        ck = self.cfg.checkpoint
        if load_dir is None:
            return
        with_optimizer = ck.load_optimizer
        state = checkpointing.load_checkpoint(
            load_dir, self.model, self.optimizer if with_optimizer else None,
            self.scheduler if with_optimizer else None, verify_checksums=ck.verify_checksums,
            check_common=self._check_schedule if with_optimizer else None)
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        if not with_optimizer:
            self.scheduler.step(increment=self.iteration)  # the lr schedule resumes in place
        self.logger.info(f"resumed from checkpoint at iteration {self.iteration} ({load_dir})"
                         + ("" if with_optimizer else "; weights only, fresh optimizer state"))

    # Scheduler state key -> the config field(s) that set it (see builders.build_optimizer).
    _SCHEDULE_FIELDS = {
        "max_lr": "optimizer.lr",
        "min_lr": "optimizer.min_lr",
        "lr_warmup_steps": "optimizer.lr_warmup_iters",
        "lr_decay_steps": "optimizer.lr_decay_iters (default: training.train_iters)",
        "lr_decay_style": "optimizer.lr_decay_style",
        "start_wd": "optimizer.weight_decay",
        "end_wd": "optimizer.weight_decay",
    }

    def _check_schedule(self, common: dict) -> None:
        """Refuse a checkpoint whose lr schedule differs from the config's, unless told which
        to use (Megatron-LM stops likewise). Local: called on every rank by load_checkpoint."""
        ck = self.cfg.checkpoint
        saved = common.get("opt_param_scheduler")
        if saved is None or ck.use_checkpoint_opt_param_scheduler or \
                ck.override_opt_param_scheduler:
            return
        current = self.scheduler.state_dict()
        diffs = [f"{field} (checkpoint {saved[key]!r}, config {current[key]!r})"
                 for key, field in self._SCHEDULE_FIELDS.items()
                 if key in saved and saved[key] != current[key]]
        if diffs:
            raise checkpointing.CheckpointError(
                "the learning-rate schedule differs from the checkpoint's: "
                f"{'; '.join(dict.fromkeys(diffs))}. Set checkpoint.override_opt_param_"
                "scheduler=true to use the config's schedule (e.g. to extend training), or "
                "checkpoint.use_checkpoint_opt_param_scheduler=true to keep the checkpoint's")

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.save:
            return
        path = checkpointing.save_checkpoint(
            ck.save, self.iteration, self.model, self.optimizer, self.scheduler,
            {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
             "config": self.cfg.to_dict()}, checksums=ck.verify_checksums)
        self.logger.info(f"saved checkpoint at iteration {self.iteration} to {path}")

    # ------------------------------------------------------------------ one step

    def _on_signal(self, signum, frame) -> None:
        self._signal_received = True

    def _forward_step(self, data_iterator, model):
        """megatron's forward_step_func: run a chunk, return (output, loss_func).
        With context parallelism the micro-batch is this CP rank's ``[b, s/cp]`` slice."""
        batch = context_parallel.slice_batch(next(data_iterator), self.cp_group)
        tokens_bs = batch["tokens"].to(self.device, non_blocking=True)
        labels_bs = batch["labels"].to(self.device, non_blocking=True)
        position_ids_bs = batch["position_ids"].to(self.device, non_blocking=True)
        loss_mask_bs = batch["loss_mask"].to(self.device, non_blocking=True)
        attention_mask = batch.get("attention_mask")
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        stats_bs = model(tokens_bs, position_ids_bs, attention_mask, labels=labels_bs)
        return stats_bs, partial(self._loss_func, loss_mask_bs)

    def _loss_func(self, loss_mask_bs: torch.Tensor, stats_bs: WeightedCrossEntropy):
        """(loss_sum, num_tokens, report) for one micro-batch on the last pipeline stage.

        Collectives: "paper" mode all-reduces (alpha_r, has_tokens) over DP x CP.
        """
        weight_bs, ce_bs, entropy_bs = stats_bs.weight, stats_bs.ce, stats_bs.entropy
        red = self.normalizer.micro_batch(stats_bs.weighted_ce, weight_bs, loss_mask_bs)
        mask = loss_mask_bs.float()
        n = mask.sum()
        report = {
            "lm_loss": torch.stack([(ce_bs.detach() * mask).sum(), n]),
            "objective": self.normalizer.reported_objective(red),
            "entropy": torch.stack([(entropy_bs.detach() * mask).sum(), n]),
            "weight": torch.stack([red.weight_sum, n]),
            "alpha": torch.stack([red.alpha.detach(), torch.ones_like(n)]),
            # over unmasked tokens only (+-inf where a micro-batch has none)
            "weight_min": weight_bs.detach().masked_fill(mask == 0, float("inf")).min(),
            "weight_max": weight_bs.detach().masked_fill(mask == 0, float("-inf")).max(),
        }
        return red.loss_sum, red.num_tokens, report

    def _finalize_model_grads(self, model, num_tokens=None, **kwargs):
        """megatron's grad finalisation; in "global" mode it divides by the summed weights
        (float) instead of megatron's integer token count. Collectives: megatron's DP grad
        reduction, and (global mode) a PP broadcast + DP x CP all-reduce of the weight sum."""
        finalize_model_grads(model, num_tokens=self.normalizer.grad_denominator(num_tokens),
                             **kwargs)

    def _reduce_report(self, reports: list[dict]) -> dict[str, float]:
        """Sum pairs over micro-batches and DP x CP ranks; min/max likewise. Last stage only."""
        if not reports:
            return {}
        pairs = torch.stack([sum(r[k] for r in reports) for k in _PAIR_KEYS])  # [keys, 2]
        extremes = torch.stack([
            -torch.stack([r["weight_min"] for r in reports]).min(),
            torch.stack([r["weight_max"] for r in reports]).max()])
        dist.all_reduce(pairs, group=self.dp_cp_group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.dp_cp_group)
        # One host transfer for every logged value (one sync per step on GPU).
        values = torch.cat([pairs[:, 0] / pairs[:, 1].clamp_min(1e-30), extremes]).tolist()
        out = dict(zip(_PAIR_KEYS, values))
        out["weight_min"], out["weight_max"] = -values[-2], values[-1]
        if self.cfg.loss.type == "cross_entropy":
            out.pop("entropy")  # megatron's CE does not compute it
        return out

    def _forward_backward(self, data_iterator, forward_only: bool) -> list[dict]:
        forward_backward = get_forward_backward_func()
        return forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``num_microbatches`` micro-batches."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.normalizer.start_step(self.device)
        reports = self._forward_backward(self.train_iterator, forward_only=False)
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        self.normalizer.end_step()
        self.iteration += 1
        self.consumed_samples += self.cfg.training.global_batch_size
        metrics = self._reduce_report(reports) if parallel_state.is_pipeline_last_stage(
            ignore_virtual=True) else {}
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["skipped"] = float(not update_successful)
        if self.cfg.precision.dtype == "fp16":
            metrics["loss_scale"] = float(self.optimizer.get_loss_scale())
        return metrics

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean LM cross-entropy over ``eval_iters`` validation batches (all ranks get it)."""
        iterator = self._valid_iterator()
        if iterator is None or self.cfg.training.eval_iters == 0:
            return None
        for chunk in self.model:
            chunk.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for _ in range(self.cfg.training.eval_iters):
            reports = self._forward_backward(iterator, forward_only=True)
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                pair = sum(r["lm_loss"] for r in reports)
                dist.all_reduce(pair, group=self.dp_cp_group)
                totals += pair.double().cpu()
        for chunk in self.model:
            chunk.train()
        # Share the last stage's value with every rank (it owns the loss).
        value = torch.tensor([totals[0] / max(totals[1].item(), 1.0)
                              if parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                              else -math.inf], dtype=torch.float64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)  # on the device: NCCL needs CUDA tensors
        return value.item()

    def _world_flags(self, metrics: dict) -> _WorldFlags:
        """Signal, non-finite loss and elapsed time over all ranks: one MAX all-reduce."""
        loss = metrics.get("objective", 0.0)
        flags = torch.tensor([float(self._signal_received),
                              float(not math.isfinite(loss) or not math.isfinite(
                                  metrics.get("lm_loss", 0.0))),
                              (time.time() - self.job_start) / 60.0],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signal_flag, non_finite, elapsed = flags.tolist()
        return _WorldFlags(bool(signal_flag), bool(non_finite), elapsed)

    def _stop_reason(self, flags: _WorldFlags) -> Optional[str]:
        """Why the run stops early after this iteration, the same on every rank: ``signal``,
        ``time_limit`` (training.exit_duration_in_mins), ``exit_interval``, or None."""
        t = self.cfg.training
        if self.iteration >= t.train_iters:
            return None  # completed
        if flags.signal:
            return "signal"
        if t.exit_duration_in_mins is not None and \
                flags.elapsed_minutes >= t.exit_duration_in_mins:
            return "time_limit"
        if t.exit_interval is not None and self.iteration % t.exit_interval == 0:
            return "exit_interval"
        return None

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.training
        tokens_per_step = t.global_batch_size * cfg.model.seq_length
        flops_per_step = flops_per_token(cfg, self.vocab_size) * tokens_per_step
        start_iteration = self.iteration
        start = time.time()
        history: list[dict] = []
        exit_reason = "completed"
        self.logger.info(f"training from iteration {self.iteration} to {t.train_iters}")
        window_start, window_iters = time.time(), 0
        while self.iteration < t.train_iters:
            self.watchdog.beat(self.iteration + 1, "train step")
            metrics = self.train_step()
            for callback in self.step_callbacks:
                callback(self, metrics)
            window_iters += 1
            flags = self._world_flags(metrics)
            if flags.non_finite:
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {self.iteration}: lm_loss "
                    f"{metrics.get('lm_loss')}, objective {metrics.get('objective')}. Check "
                    "the data (token ids), lower optimizer.lr, or use precision.dtype=bf16 "
                    "instead of fp16; the last good checkpoint is untouched")
            history.append({"iteration": self.iteration, **metrics})
            if self.iteration % t.log_interval == 0 or self.iteration == t.train_iters:
                elapsed = time.time() - window_start
                metrics["iteration_time"] = elapsed / window_iters
                metrics["tokens_per_s"] = tokens_per_step * window_iters / elapsed
                metrics["tflops_per_device"] = (flops_per_step * window_iters / elapsed
                                                / dist.get_world_size() / 1e12)
                metrics["memory_gib"] = _memory_gib()
                self.logger.log_train(self.iteration, t.train_iters, self.consumed_samples,
                                      metrics, time.time() - start,
                                      self.iteration - start_iteration)
                window_start, window_iters = time.time(), 0
            pause_start = time.time()
            if t.eval_interval and (self.iteration % t.eval_interval == 0
                                    or self.iteration == t.train_iters):
                self.watchdog.beat(self.iteration, "evaluation")
                valid = self.evaluate()
                if valid is not None:
                    history[-1]["valid_lm_loss"] = valid
                    self.logger.log_valid(self.iteration, valid)
            ck = cfg.checkpoint
            stop = self._stop_reason(flags)
            if ck.save and ((ck.save_interval and self.iteration % ck.save_interval == 0)
                            or self.iteration == t.train_iters or stop):
                self.watchdog.beat(self.iteration, "checkpoint save")
                self.save()
            window_start += time.time() - pause_start  # tokens/s counts training only
            if stop:
                exit_reason = stop
                self.logger.info(self._stop_message(stop, flags))
                break
        self.logger.close()
        return {"history": history, "exit_reason": exit_reason, "iteration": self.iteration}

    def _stop_message(self, stop: str, flags: _WorldFlags) -> str:
        t = self.cfg.training
        if stop == "time_limit":
            why = (f"{flags.elapsed_minutes:.2f} minutes after the job started "
                   f"(training.exit_duration_in_mins={t.exit_duration_in_mins:g})")
        elif stop == "exit_interval":
            why = f"at iteration {self.iteration} (training.exit_interval={t.exit_interval})"
        else:
            why = "on signal"
        saved = ("; resume by starting the job again" if self.cfg.checkpoint.save else
                 "; checkpoint.save is not set, so nothing was saved")
        return f"exiting {why}{saved}"

    def _release_process_hooks(self) -> None:
        """Stop the watchdog and give back the signal handlers setup() replaced."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def shutdown(self) -> None:
        self._release_process_hooks()
        parallel_state.destroy_model_parallel()


def _memory_gib() -> float:
    if cuda_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
