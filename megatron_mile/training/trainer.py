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

Host syncs per iteration: the gradient norm (megatron returns it as a float; the update is
skipped on NaN/inf) and the stop flags above. The loss report stays on the device until a
step is logged: logged steps move the metrics of every step since the last log to the host
in one transfer (``_to_host``).
"""

from __future__ import annotations

import functools
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
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megatron_mile import context_parallel
from megatron_mile.config import ConfigError, TrainConfig
from megatron_mile.cpu_compat import cuda_available
from megatron_mile.data.datasets import build_data_loader, build_datasets, build_tokenizer
from megatron_mile.data.tokenizer import vocabulary_digest
from megatron_mile.errors import EXIT_FAILED, MileError
from megatron_mile.hf.tensors import check_hf_shapes
from megatron_mile.fusions import Kernels, kernel_notice, resolve_transformer_impl
from megatron_mile.launch import job_start_time
from megatron_mile.loss import LossNormalizer, WeightedCrossEntropy
from megatron_mile.models import get_family
from megatron_mile.model import (
    flops_per_token,
    fused_output_layer,
    num_parameters,
    padded_vocab_size,
)
from megatron_mile.run_config import resolve_model
from megatron_mile.training import checkpoint
from megatron_mile.training.checkpoint_lock import CheckpointLock
from megatron_mile.training.builders import build_model, build_optimizer, initialize_parallel
from megatron_mile.training.logger import MetricsLogger
from megatron_mile.training.profiling import NvtxTimers, StepProfiler, nvtx_range
from megatron_mile.training.sinks import check_sinks_available
from megatron_mile.throughput import device_peak, mfu, model_tflops_per_device
from megatron_mile.training.watchdog import Watchdog, report_progress

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Report keys that are (numerator, denominator) pairs summed over micro-batches and DP ranks.
_PAIR_KEYS = ("lm_loss", "objective", "entropy", "weight", "alpha")


class NonFiniteLossError(MileError, RuntimeError):
    """The loss, the gradient norm or the parameters became NaN or inf (exit 1: the run
    failed; the last published checkpoint is intact)."""

    exit_code = EXIT_FAILED


class _WorldFlags(NamedTuple):
    """What the ranks agree on after each step (one MAX all-reduce)."""

    signal: bool
    """Some rank received SIGTERM/SIGUSR1/SIGINT."""
    non_finite: bool
    """Some rank's loss or gradient norm is NaN or inf."""
    elapsed_minutes: float
    """Minutes since the job started (the largest over ranks)."""


class Trainer:
    """Owns the model chunks, optimizer, scheduler, data iterators and counters of one run."""

    def __init__(self, cfg: TrainConfig, *,
                 step_callbacks: Sequence[Callable[["Trainer", dict], None]] = ()):
        """``step_callbacks`` run on every rank after each optimizer step, with the trainer and
        that step's metrics (which they may change), before the ranks agree on stopping:
        custom logging, or a test injecting a signal or a non-finite loss. The loss report's
        values are 0-dim device tensors there until the step is logged (``float()`` one to
        read it, at the cost of a host sync)."""
        check_sinks_available(cfg)  # a missing optional package, before anything starts
        self.cfg = cfg
        self.step_callbacks = list(step_callbacks)
        self.rank = 0  # global rank, set by setup()
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_iterations = 0  # non-finite iterations skipped (training.on_non_finite)
        self.consecutive_skips = 0
        self._signal_received = False
        self.watchdog: Optional[Watchdog] = None
        self.lock: Optional[CheckpointLock] = None  # checkpoint.save's lock (global rank 0)
        self._previous_handlers: dict = {}
        self.job_start = job_start_time()  # agreed over ranks (the earliest) in setup()
        self.setup_phase = "joining the process group"  # for a failure before the watchdog

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = resolve_model(self.cfg)  # init_from_hf's family and shape, before the layout
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
        self.profiler = StepProfiler(cfg.profile, self.rank, cuda_available())
        self._nvtx = cfg.profile.nvtx and cuda_available()  # NVTX ranges for nsys (GPU only)
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
        self.setup_phase = "building the datasets (global rank 0 builds their indices first)"
        self._build_datasets()  # before the model: a missing data path fails fast
        self.setup_phase = "setting up the model"
        # From here on every phase is bounded: a hung peer ends this rank (datasets are built
        # before, on rank 0 first, for as long as a large corpus needs).
        if cfg.training.exit_on_signal:
            self._previous_handlers = {sig: signal.signal(sig, self._on_signal)
                                       for sig in _SIGNALS}
        self.watchdog = Watchdog(p.distributed_timeout_minutes * 60, self.rank,
                                 world_size).start()
        try:
            if cfg.checkpoint.save:  # one run per directory, before anything is read there
                self.lock = checkpoint.lock_save_dir(cfg.checkpoint.save,
                                                     cfg.checkpoint.lock_stale_minutes)
            load_dir = self._resume_dir()
            if load_dir is None and cfg.checkpoint.init_from_hf:
                # The safetensors headers against config.json, before the model is allocated.
                check_hf_shapes(cfg.checkpoint.init_from_hf, cfg.model,
                                get_family(cfg.model.family))
            self.watchdog.beat(0, "building the model")
            self.model = build_model(cfg, self.vocab_size, self.device,
                                     valid_vocab_size=self.valid_vocab_size)
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
            if self._nvtx:  # megatron's schedules time forward/backward/p2p through this hook
                model_config.timers = NvtxTimers()
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
            f"{cfg.loss.sigma}, {cfg.loss.normalization}"
            f"{', fused with the output layer' if fused_output_layer(cfg) else ''}); device "
            f"{self.device}, "
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
        # Validation only when evaluating; the test split is never read: an unread split is
        # not built (and may be empty, e.g. the test split of a small corpus).
        evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 0
        num_samples = (t.train_iters * gbs, evals * t.eval_iters * gbs, 0)
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
            if checkpoint.find(ck.save) is not None:
                return ck.save
            self.logger.info(f"no checkpoint in {ck.save}: starting from scratch"
                             + (f" (weights of {ck.init_from_hf})" if ck.init_from_hf else ""))
        return None

    def _import_hf(self) -> None:
        """Load checkpoint.init_from_hf's weights into this rank's slices of the model."""
        from megatron_mile.hf.importer import import_hf_weights

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
        start = time.time()
        state = checkpoint.load(
            load_dir, self.model, self.optimizer if with_optimizer else None,
            self.scheduler if with_optimizer else None, verify_checksums=ck.verify_checksums,
            check_common=self._check_resume)
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        self._note_changed_geometry(state.get("config") or {})
        if not with_optimizer:
            self.scheduler.step(increment=self.iteration)  # the lr schedule resumes in place
        self.logger.info(f"resumed from checkpoint at iteration {self.iteration} ({load_dir}, "
                         f"{time.time() - start:.1f} s)"
                         + ("" if with_optimizer else "; weights only, fresh optimizer state"))

    @functools.cached_property
    def _vocabulary(self) -> dict[str, Any]:
        """What the model's token ids mean, kept in every checkpoint and compared on resume."""
        data = self.cfg.data
        return {"size": self.valid_vocab_size, "padded_size": self.vocab_size,
                "tokenizer": data.tokenizer_model or f"null tokenizer ({data.vocab_size} ids)",
                "digest": vocabulary_digest(self.tokenizer)}

    def _check_resume(self, common: dict) -> None:
        """Refuse a checkpoint that does not fit this run, before anything is loaded: another
        vocabulary, or (when its optimizer state is loaded) another lr schedule. Local: called
        on every rank by checkpoint.load."""
        self._check_vocabulary((common.get("extra_state") or {}).get("vocabulary"))
        if self.cfg.checkpoint.load_optimizer:
            self._check_schedule(common)

    def _check_vocabulary(self, saved: Optional[dict]) -> None:
        if saved is None:  # saved before vocabularies were recorded
            return
        current = self._vocabulary
        if (saved["size"], saved["digest"]) == (current["size"], current["digest"]):
            return
        ck = self.cfg.checkpoint

        def describe(v):
            return f"{v['size']} tokens, {v['tokenizer']}, digest {v['digest'][:12]}"
        change = f"checkpoint: {describe(saved)}; this run: {describe(current)}"
        if not ck.allow_vocab_change:
            raise checkpoint.CheckpointError(
                f"the vocabulary differs from the checkpoint's ({change}): its token ids would "
                "mean other tokens. Use the checkpoint's tokenizer (data.tokenizer_model / "
                "data.vocab_size), or set checkpoint.allow_vocab_change=true for a deliberate "
                "change (a vocabulary extension)")
        if saved["padded_size"] != current["padded_size"] and ck.load_optimizer:
            raise checkpoint.CheckpointError(
                f"the vocabulary changes size ({change}, padded {saved['padded_size']} -> "
                f"{current['padded_size']}): set checkpoint.load_optimizer=false too (the "
                "optimizer state holds the old embedding shape)")
        self.logger.info(f"vocabulary changed on purpose (checkpoint.allow_vocab_change): "
                         f"{change}; rows of new ids start at zero")

    # (section, field) of the batch geometry: may change on resume, said in one line.
    _GEOMETRY_FIELDS = (("model", "seq_length"), ("training", "global_batch_size"),
                        ("training", "micro_batch_size"))

    def _note_changed_geometry(self, saved_config: dict) -> None:
        """One line when the sequence length or batch sizes differ from the checkpoint's
        (allowed, as in Megatron-LM): what consumed_samples means from here on."""
        changes = []
        for section, field in self._GEOMETRY_FIELDS:
            old = (saved_config.get(section) or {}).get(field)
            new = getattr(getattr(self.cfg, section), field)
            if old is not None and old != new:
                changes.append(f"{section}.{field} {old} -> {new}")
        if changes:
            self.logger.info(
                f"resuming with a changed batch geometry ({', '.join(changes)}): training "
                f"continues at sample {self.consumed_samples} of the sample order built for the "
                f"new geometry (consumed_samples counts samples of "
                f"{self.cfg.model.seq_length} tokens from now on), so the next samples are not "
                "exactly the continuation of the old order")

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
        to use (Megatron-LM stops likewise). Local: called on every rank by checkpoint.load."""
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
            raise checkpoint.CheckpointError(
                "the learning-rate schedule differs from the checkpoint's: "
                f"{'; '.join(dict.fromkeys(diffs))}. Set checkpoint.override_opt_param_"
                "scheduler=true to use the config's schedule (e.g. to extend training), or "
                "checkpoint.use_checkpoint_opt_param_scheduler=true to keep the checkpoint's")

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.save:
            return
        if not self._parameters_finite():
            raise NonFiniteLossError(
                f"refusing to save iteration {self.iteration}: the parameters hold NaN/inf. "
                "Nothing was written; the last published checkpoint is intact")
        start = time.time()
        args = (ck.save, self.iteration, self.model, self.optimizer, self.scheduler,
                {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                 "config": self.cfg.to_dict(), "vocabulary": self._vocabulary})
        options = {"checksums": ck.verify_checksums, "lock": self.lock,
                   "keep_last": ck.keep_last}
        if ck.async_save:  # published by a later _finalize_save
            self.saver.save(*args, **options)
            return
        path = checkpoint.save(*args, **options)
        self.logger.info(f"saved checkpoint at iteration {self.iteration} to {path} in "
                         f"{time.time() - start:.1f} s")

    @functools.cached_property
    def saver(self) -> checkpoint.AsyncSaver:
        """The background writer of checkpoint.async_save (created at the first save)."""
        return checkpoint.AsyncSaver(log=self.logger.info)

    def _finalize_save(self, blocking: bool) -> None:
        """Publish an asynchronous save once every rank has written it (blocking: wait for
        it, as before the run ends). Collectives: ``AsyncSaver.finalize``'s, while one is in
        flight; none otherwise."""
        if self.cfg.checkpoint.async_save and self.saver.in_flight is not None:
            if blocking:
                self.watchdog.beat(self.iteration, "finishing the background checkpoint save")
            self.saver.finalize(blocking=blocking)

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
        # loss_mask: megatron's GPTModel uses it only for multi-token prediction (off here);
        # the fused loss takes it as the factor loss_func applies (MileGPTModel).
        stats_bs = model(tokens_bs, position_ids_bs, attention_mask, labels=labels_bs,
                         loss_mask=loss_mask_bs)
        return stats_bs, partial(self._loss_func, loss_mask_bs)

    def _loss_func(self, loss_mask_bs: torch.Tensor, stats_bs: WeightedCrossEntropy):
        """(loss_sum, num_tokens, report) for one micro-batch on the last pipeline stage.

        Collectives: "paper" mode all-reduces (alpha_r, has_tokens) over DP x CP.
        """
        with nvtx_range("loss", self._nvtx):
            return self._loss_terms(loss_mask_bs, stats_bs)

    def _loss_terms(self, loss_mask_bs: torch.Tensor, stats_bs: WeightedCrossEntropy):
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

    def _reduce_report(self, reports: list[dict]) -> dict[str, torch.Tensor]:
        """Sum pairs over micro-batches and DP x CP ranks; min/max likewise. Last stage only.
        The values stay on the device (0-dim tensors): no host sync here."""
        if not reports:
            return {}
        pairs = torch.stack([sum(r[k] for r in reports) for k in _PAIR_KEYS])  # [keys, 2]
        extremes = torch.stack([
            -torch.stack([r["weight_min"] for r in reports]).min(),
            torch.stack([r["weight_max"] for r in reports]).max()])
        dist.all_reduce(pairs, group=self.dp_cp_group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.dp_cp_group)
        values = torch.cat([pairs[:, 0] / pairs[:, 1].clamp_min(1e-30),
                            -extremes[:1], extremes[1:]])
        out = dict(zip(_PAIR_KEYS + ("weight_min", "weight_max"), values.unbind()))
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
        with nvtx_range("optimizer", self._nvtx):
            update_successful, grad_norm = self._optimizer_step()
        if update_successful:
            self.scheduler.step(increment=1)
        self.normalizer.end_step()
        self.iteration += 1
        self.consumed_samples += self.cfg.training.global_batch_size
        metrics = self._reduce_report(reports) if parallel_state.is_pipeline_last_stage(
            ignore_virtual=True) else {}
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if grad_norm is not None:  # None: fp16's loss scaler skipped an overflow step
            metrics["grad_norm"] = grad_norm
        metrics["skipped"] = float(not update_successful)
        if self.cfg.precision.dtype == "fp16":
            metrics["loss_scale"] = self.optimizer.get_loss_scale().detach().reshape(())
        return metrics

    @torch.no_grad()
    def _optimizer_step(self) -> tuple[bool, Optional[float]]:
        """megatron's ``ChainedOptimizer.step`` with the gradient norm checked before the
        update: a NaN/inf norm leaves the parameters untouched. Returns (updated, grad norm);
        the norm is None where fp16's loss scaler found an overflow (megatron skips that step
        and lowers the scale). The norm is the same on every rank (reduced over the model- and
        data-parallel grad-stats groups), so every rank makes the same choice.

        Collectives: megatron's (grad-norm all-reduce, distributed-optimizer gathers).
        """
        opt = self.optimizer
        if opt.prepare_grads():
            return False, None
        grad_norm = float(opt.get_grad_norm())
        if not math.isfinite(grad_norm):
            return False, grad_norm
        for sub in opt.chained_optimizers:
            params = sub.get_parameters()
            if sub.config.clip_grad > 0.0 and params and not getattr(sub, "is_stub_optimizer",
                                                                     False):
                clip_grad_by_total_norm_fp32(
                    params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        return opt.step_with_ready_grads(), grad_norm

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
            report_progress()  # a long evaluation is not a hang: each iteration is progress
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
        """Signal, non-finite loss and elapsed time over all ranks: one MAX all-reduce, and
        the step's one host transfer (the loss report's finiteness is checked on the device)."""
        flags = torch.tensor([float(self._signal_received), 0.0,
                              (time.time() - self.job_start) / 60.0],
                             dtype=torch.float64, device=self.device)
        for key in ("objective", "lm_loss", "grad_norm"):
            value = metrics.get(key, 0.0)
            if isinstance(value, torch.Tensor):  # on the device: no host transfer
                flags[1] = torch.maximum(flags[1], (~torch.isfinite(value)).double())
            elif not math.isfinite(value):
                flags[1] = 1.0
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signal_flag, non_finite, elapsed = flags.tolist()
        return _WorldFlags(bool(signal_flag), bool(non_finite), elapsed)

    def _check_finite(self, flags: _WorldFlags, metrics: dict) -> None:
        """Act on a non-finite loss or gradient norm (training.on_non_finite), the same on
        every rank (``flags`` are agreed). The update was not applied (``_optimizer_step``)."""
        t = self.cfg.training
        if not flags.non_finite:
            self.consecutive_skips = 0
            return
        _to_host([metrics])  # for the message
        self.consecutive_skips += 1
        self.skipped_iterations += 1
        what = (f"non-finite loss or gradient at iteration {self.iteration} (lm_loss "
                f"{metrics.get('lm_loss', 'n/a')}, objective {metrics.get('objective', 'n/a')}, "
                f"grad norm {metrics.get('grad_norm', 'n/a')}): the update was not applied")
        if t.on_non_finite == "skip" and self.consecutive_skips <= t.max_consecutive_skips:
            self.logger.info(f"{what}; iteration skipped ({self.consecutive_skips} in a row, "
                             f"{self.skipped_iterations} in this run; training.on_non_finite="
                             "skip)")
            return
        why = (f"{self.consecutive_skips} in a row, training.max_consecutive_skips="
               f"{t.max_consecutive_skips}" if t.on_non_finite == "skip"
               else "training.on_non_finite=stop")
        raise NonFiniteLossError(
            f"{what} ({why}). Check the data (token ids), lower optimizer.lr, or use "
            "precision.dtype=bf16 instead of fp16; the last published checkpoint is intact")

    def _parameters_finite(self) -> bool:
        """Whether every rank's parameters are finite. Collectives: one MAX all-reduce."""
        bad = any(not torch.isfinite(param).all() for chunk in self.model
                  for param in chunk.parameters())
        flag = torch.tensor([float(bad)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0

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
        model_flops_per_token = flops_per_token(cfg, self.vocab_size)
        peak = device_peak(self.device, cfg.logging.peak_tflops)
        start_iteration = self.iteration
        start = time.time()
        history: list[dict] = []
        pending = 0  # history entries since the last log, still holding device tensors
        exit_reason = "completed"
        self.logger.info(f"training from iteration {self.iteration} to {t.train_iters}; "
                         f"{peak.describe()}")
        window_start, window_iters = time.time(), 0
        while self.iteration < t.train_iters:
            self.watchdog.beat(self.iteration + 1, "train step")
            self.profiler.before_step(self.iteration + 1)
            metrics = self.train_step()
            for callback in self.step_callbacks:
                callback(self, metrics)
            window_iters += 1
            flags = self._world_flags(metrics)
            self._check_finite(flags, metrics)
            self.profiler.after_step(self.iteration)
            history.append({"iteration": self.iteration, **metrics})
            pending += 1
            if self.iteration % t.log_interval == 0 or self.iteration == t.train_iters:
                _to_host(history[-pending:])  # one host transfer for the whole window
                pending = 0
                metrics = dict(history[-1])
                del metrics["iteration"]
                elapsed = time.time() - window_start
                metrics["iteration_time"] = elapsed / window_iters
                metrics["tokens_per_s"] = tokens_per_step * window_iters / elapsed
                metrics["tflops_per_device"] = model_tflops_per_device(
                    model_flops_per_token, metrics["tokens_per_s"], dist.get_world_size())
                if peak.tflops is not None:
                    metrics["mfu"] = mfu(metrics["tflops_per_device"], peak.tflops)
                metrics["memory_gib"] = _memory_gib()
                self.logger.log_train(self.iteration, t.train_iters, self.consumed_samples,
                                      metrics, time.time() - start,
                                      self.iteration - start_iteration)
                window_start, window_iters = time.time(), 0
            pause_start = time.time()
            if t.eval_interval and (self.iteration % t.eval_interval == 0
                                    or self.iteration == t.train_iters):
                self.watchdog.beat(self.iteration, "evaluation")
                eval_start = time.time()
                valid = self.evaluate()
                if valid is not None:
                    history[-1]["valid_lm_loss"] = valid
                    self.logger.log_valid(self.iteration, valid, time.time() - eval_start)
            ck = cfg.checkpoint
            stop = self._stop_reason(flags)
            self._finalize_save(blocking=False)
            if ck.save and ((ck.save_interval and self.iteration % ck.save_interval == 0)
                            or self.iteration == t.train_iters or stop):
                self.watchdog.beat(self.iteration, "checkpoint save")
                self.save()
            window_start += time.time() - pause_start  # tokens/s counts training only
            if stop:
                exit_reason = stop
                self._finalize_save(blocking=True)
                self.logger.info(self._stop_message(stop, flags))
                break
        self.profiler.stop()  # a run that stopped inside the profile window
        self._finalize_save(blocking=True)  # a save in flight is published before exit 0
        _to_host(history[len(history) - pending:])
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
        """Release the checkpoint directory's lock, stop the watchdog and give back the
        signal handlers setup() replaced."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def shutdown(self) -> None:
        if hasattr(self, "logger"):  # flush and close the sinks of a run that failed
            self.logger.close()
        if hasattr(self, "profiler"):
            self.profiler.stop()
        self._release_process_hooks()
        parallel_state.destroy_model_parallel()


def _to_host(entries: list[dict]) -> None:
    """Replace the device tensors among ``entries``' values by floats, in place, with one
    host transfer for all of them."""
    where = [(entry, key) for entry in entries for key, value in entry.items()
             if isinstance(value, torch.Tensor)]
    if not where:
        return
    values = torch.stack([entry[key].detach().to(torch.float64).reshape(())
                          for entry, key in where]).tolist()
    for (entry, key), value in zip(where, values):
        entry[key] = value


def _memory_gib() -> float:
    if cuda_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
