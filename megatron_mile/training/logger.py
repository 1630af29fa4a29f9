"""The trainer's one reporting interface: log lines, and each logged step's metrics handed to
every sink (:mod:`megatron_mile.training.sinks`: console, TensorBoard, wandb, JSON Lines).

One rank writes: the last global rank, which is on the last pipeline stage where the loss is
(as Megatron-LM's print_rank_last). The trainer calls :meth:`MetricsLogger.log_train` at the
log interval only, with host floats: nothing here touches a device tensor.
"""

from __future__ import annotations

import logging
import math
import sys

from megatron_mile.config import TrainConfig
from megatron_mile.training.sinks import MetricsSink, TrainRecord, build_sinks

log = logging.getLogger("megatron_mile")


class MetricsLogger:
    """Fans a logged step out to the sinks ``cfg.logging`` turns on (the console always)."""

    def __init__(self, cfg: TrainConfig, is_logging_rank: bool):
        self.enabled = is_logging_rank
        if not logging.getLogger().handlers:
            logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                                format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        # megatron-core narrates every index it builds at INFO; keep its warnings only.
        logging.getLogger("megatron").setLevel(logging.WARNING)
        self.sinks: list[MetricsSink] = build_sinks(cfg) if self.enabled else []

    def info(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def log_train(self, iteration: int, total: int, consumed_samples: int,
                  metrics: dict[str, float], elapsed: float, iterations_done: int) -> None:
        """``metrics`` of step ``iteration`` to every sink; ``elapsed`` seconds over
        ``iterations_done`` steps of this run give the ETA."""
        if not self.enabled:
            return
        eta = elapsed / max(iterations_done, 1) * (total - iteration)
        record = TrainRecord(iteration, total, consumed_samples, dict(metrics), elapsed, eta)
        for sink in self.sinks:
            sink.write_train(record)

    def log_valid(self, iteration: int, lm_loss: float, seconds: float) -> None:
        if not self.enabled:
            return
        metrics = {"lm_loss": lm_loss, "ppl": math.exp(min(lm_loss, 50.0)), "seconds": seconds}
        for sink in self.sinks:
            sink.write_valid(iteration, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
