"""Trainer runs shared by the training, checkpoint and fault tests: the product's own Trainer
on the shipped ``tiny`` config with mock data, called inside ``run_distributed`` workers."""

from __future__ import annotations

from typing import Callable, Sequence

DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]


def run_trainer(overrides: list[str], world_size: int, *,
                step_callbacks: Sequence[Callable] = ()) -> dict:
    """``Trainer.setup()`` + ``train()`` + ``shutdown()``; returns ``train()``'s summary."""
    from megatron_mile.config import load_config
    from megatron_mile.training.trainer import Trainer

    trainer = Trainer(load_config("tiny", overrides, world_size=world_size),
                      step_callbacks=step_callbacks)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.shutdown()


def curve(summary: dict, key: str = "lm_loss") -> list[float]:
    """``key`` per iteration (the last pipeline stage's ranks have the losses)."""
    return [h[key] for h in summary["history"] if key in h]


def resume_curves(overrides: list[str], world_size: int, ckpt: str, steps: int = 8) -> dict:
    """Loss curves of ``steps`` steps straight, and of the same run stopped after half of them
    (saving) and resumed by a fresh trainer for the rest."""
    half = steps // 2
    runs = {
        "straight": run_trainer(overrides + [f"training.train_iters={steps}"], world_size),
        "first": run_trainer(overrides + [f"checkpoint.save={ckpt}",
                                          f"training.train_iters={half}"], world_size),
        "resumed": run_trainer(overrides + [f"checkpoint.save={ckpt}",
                                            f"training.train_iters={steps}"], world_size),
    }
    out = {name: curve(run) for name, run in runs.items()}
    out["grad_norm"] = {name: curve(run, "grad_norm") for name, run in runs.items()}
    out["resumed_start"] = runs["resumed"]["history"][0]["iteration"]
    return out
