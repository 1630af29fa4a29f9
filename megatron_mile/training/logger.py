"""Console progress lines and TensorBoard scalars, written by one rank (the last: it holds
the loss when pipelining, as Megatron-LM's print_rank_last)."""

from __future__ import annotations

import datetime
import logging
import sys

from megatron_mile.config import TrainConfig

log = logging.getLogger("megatron_mile")

# Console order; anything else in the metrics goes to TensorBoard only.
_CONSOLE = [
    ("lm_loss", "lm_loss {:.4f}"), ("objective", "objective {:.4f}"),
    ("entropy", "entropy {:.3f}"), ("weight", "weight {:.3f}"), ("alpha", "alpha {:.4f}"),
    ("lr", "lr {:.3e}"), ("grad_norm", "grad norm {:.3f}"), ("loss_scale", "loss scale {:.0f}"),
    ("tokens_per_s", "tokens/s {:,.0f}"), ("tflops_per_device", "TFLOP/s/device {:.3f}"),
    ("memory_gib", "mem {:.2f} GiB"),
]


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MetricsLogger:
    """Writes ``iteration i/N | lm_loss x | ... | elapsed | ETA`` lines and TensorBoard events."""

    def __init__(self, cfg: TrainConfig, is_logging_rank: bool):
        self.enabled = is_logging_rank
        self.writer = None
        if not logging.getLogger().handlers:
            logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                                format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        # megatron-core narrates every index it builds at INFO; keep its warnings only.
        logging.getLogger("megatron").setLevel(logging.WARNING)
        if self.enabled and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.logging.tensorboard_dir)
            self.writer.add_text("config", f"```\n{cfg.to_dict()}\n```")

    def info(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def log_train(self, iteration: int, total: int, consumed_samples: int, metrics: dict,
                  elapsed: float, iterations_done: int) -> None:
        if not self.enabled:
            return
        parts = [f"iteration {iteration}/{total}", f"samples {consumed_samples}"]
        for key, fmt in _CONSOLE:
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        if "weight_min" in metrics:
            parts.append(f"weight range [{metrics['weight_min']:.3f}, {metrics['weight_max']:.3f}]")
        eta = elapsed / max(iterations_done, 1) * (total - iteration)
        parts += [f"elapsed {_hms(elapsed)}", f"ETA {_hms(eta)}"]
        log.info(" | ".join(parts))
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, iteration)
            self.writer.add_scalar("train/consumed_samples", consumed_samples, iteration)
            self.writer.flush()

    def log_valid(self, iteration: int, lm_loss: float, seconds: float) -> None:
        if not self.enabled:
            return
        import math

        ppl = math.exp(min(lm_loss, 50.0))
        log.info(f"validation at iteration {iteration} | lm_loss {lm_loss:.4f} | ppl {ppl:.2f}"
                 f" | {seconds:.1f} s")
        if self.writer is not None:
            self.writer.add_scalar("valid/lm_loss", lm_loss, iteration)
            self.writer.add_scalar("valid/ppl", ppl, iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
