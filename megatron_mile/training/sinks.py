"""Where a logged step's metrics go: the console line, TensorBoard, wandb, a JSON Lines file.

Each sink takes the same records from :class:`megatron_mile.training.logger.MetricsLogger`
(the trainer's one reporting interface), on the logging rank only, at the log interval only:

    sink.write_train(record)             # a TrainRecord: iteration, counters, metrics dict
    sink.write_valid(iteration, metrics) # {"lm_loss", "ppl", "seconds"}
    sink.close()

Every sink writes every metric it is given (the MiLe statistics entropy, weight, alpha,
weight_min/max included); only the console chooses an order and a format.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from typing import Optional, Protocol

from megatron_mile.config import ConfigError, TrainConfig

log = logging.getLogger("megatron_mile")

WANDB_FIX = "pip install megatron-mile[wandb]"


@dataclasses.dataclass
class TrainRecord:
    """One logged training step."""

    iteration: int
    """The step just finished (from 1)."""
    train_iters: int
    """The run's last step."""
    consumed_samples: int
    """Samples trained on so far, over all data-parallel ranks."""
    metrics: dict[str, float]
    """Loss report (lm_loss, objective, MiLe's entropy/weight/alpha/weight_min/weight_max),
    lr, grad_norm, throughput (tokens_per_s, tflops_per_device, mfu), memory_gib, ..."""
    elapsed_s: float
    """Seconds since this run's training loop started."""
    eta_s: float
    """Estimated seconds to train_iters at this run's mean speed so far."""


class MetricsSink(Protocol):
    """What the trainer's metrics are written to."""

    def write_train(self, record: TrainRecord) -> None: ...

    def write_valid(self, iteration: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class ConsoleSink:
    """``iteration i/N | samples | lm_loss x | ... | TFLOP/s/device | MFU | elapsed | ETA``."""

    # Console order and format; metrics not listed here reach the other sinks only.
    FORMATS = (
        ("lm_loss", "lm_loss {:.4f}"), ("objective", "objective {:.4f}"),
        ("entropy", "entropy {:.3f}"), ("weight", "weight {:.3f}"), ("alpha", "alpha {:.4f}"),
        ("lr", "lr {:.3e}"), ("grad_norm", "grad norm {:.3f}"),
        ("loss_scale", "loss scale {:.0f}"), ("tokens_per_s", "tokens/s {:,.0f}"),
        ("tflops_per_device", "TFLOP/s/device {:.3f}"), ("mfu", "MFU {:.1%}"),
        ("memory_gib", "mem {:.2f} GiB"),
    )

    def write_train(self, record: TrainRecord) -> None:
        m = record.metrics
        parts = [f"iteration {record.iteration}/{record.train_iters}",
                 f"samples {record.consumed_samples}"]
        parts += [fmt.format(m[key]) for key, fmt in self.FORMATS if key in m]
        if "weight_min" in m:
            parts.append(f"weight range [{m['weight_min']:.3f}, {m['weight_max']:.3f}]")
        parts += [f"elapsed {_hms(record.elapsed_s)}", f"ETA {_hms(record.eta_s)}"]
        log.info(" | ".join(parts))

    def write_valid(self, iteration: int, metrics: dict[str, float]) -> None:
        log.info(f"validation at iteration {iteration} | lm_loss {metrics['lm_loss']:.4f} | "
                 f"ppl {metrics['ppl']:.2f} | {metrics['seconds']:.1f} s")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars ``train/<metric>`` and ``valid/<metric>`` by iteration, the config as text."""

    def __init__(self, cfg: TrainConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=cfg.logging.tensorboard_dir)
        self.writer.add_text("config", f"```\n{cfg.to_dict()}\n```")

    def write_train(self, record: TrainRecord) -> None:
        for key, value in record.metrics.items():
            self.writer.add_scalar(f"train/{key}", value, record.iteration)
        self.writer.add_scalar("train/consumed_samples", record.consumed_samples,
                               record.iteration)
        self.writer.flush()

    def write_valid(self, iteration: int, metrics: dict[str, float]) -> None:
        for key in ("lm_loss", "ppl"):
            self.writer.add_scalar(f"valid/{key}", metrics[key], iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A wandb run (online, or offline under logging.wandb_dir): the same ``train/<metric>``
    and ``valid/<metric>`` keys as TensorBoard, at step = iteration; the config as the run's
    config. wandb's console capture is off (the console sink already writes the log)."""

    def __init__(self, cfg: TrainConfig):
        import wandb

        lg = cfg.logging
        if lg.wandb_dir:
            os.makedirs(lg.wandb_dir, exist_ok=True)
        self.run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity,
                              name=lg.wandb_run_name, mode=lg.wandb_mode, dir=lg.wandb_dir,
                              config=cfg.to_dict(), settings=wandb.Settings(console="off"))

    def write_train(self, record: TrainRecord) -> None:
        row = {f"train/{key}": value for key, value in record.metrics.items()}
        row["train/consumed_samples"] = record.consumed_samples
        self.run.log(row, step=record.iteration)

    def write_valid(self, iteration: int, metrics: dict[str, float]) -> None:
        self.run.log({f"valid/{key}": metrics[key] for key in ("lm_loss", "ppl")},
                     step=iteration)

    def close(self) -> None:
        self.run.finish()


class JsonlSink:
    """One JSON object a line, appended and flushed at each write: ``{"kind": "train",
    "iteration", "consumed_samples", "elapsed_s", <metric>: value, ...}`` and ``{"kind":
    "valid", "iteration", "lm_loss", "ppl", "seconds"}``. A non-finite value is written as
    NaN/Infinity (Python's json reads it back)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def _write(self, obj: dict) -> None:
        self.file.write(json.dumps(obj) + "\n")
        self.file.flush()

    def write_train(self, record: TrainRecord) -> None:
        self._write({"kind": "train", "iteration": record.iteration,
                     "consumed_samples": record.consumed_samples,
                     "elapsed_s": round(record.elapsed_s, 3), **record.metrics})

    def write_valid(self, iteration: int, metrics: dict[str, float]) -> None:
        self._write({"kind": "valid", "iteration": iteration, **metrics})

    def close(self) -> None:
        self.file.close()


def check_sinks_available(cfg: TrainConfig) -> None:
    """Refuse, before anything is set up, a sink whose optional package is missing (every rank
    checks, so every rank stops alike)."""
    if cfg.logging.wandb_project is None or cfg.logging.wandb_mode == "disabled":
        return
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"logging.wandb_project={cfg.logging.wandb_project!r} needs the wandb package, "
            f"which is not importable ({e}): {WANDB_FIX}, or unset logging.wandb_project"
        ) from None


def build_sinks(cfg: TrainConfig) -> list[MetricsSink]:
    """The console, then every sink ``cfg.logging`` turns on."""
    lg = cfg.logging
    sinks: list[MetricsSink] = [ConsoleSink()]
    if lg.tensorboard_dir:
        sinks.append(TensorBoardSink(cfg))
    if lg.metrics_jsonl:
        sinks.append(JsonlSink(lg.metrics_jsonl))
    if lg.wandb_project is not None and lg.wandb_mode != "disabled":
        sinks.append(WandbSink(cfg))
    return sinks


def read_jsonl(path: str, kind: Optional[str] = "train") -> list[dict]:
    """The records of a metrics_jsonl file (of one ``kind``, or all with None)."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
