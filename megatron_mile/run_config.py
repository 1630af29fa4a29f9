"""Where a run's configuration meets the machine and the input: the setup-time half of
configuration that :mod:`megatron_mile.config` (a leaf, files only) leaves out.

    cfg = load_run_config("tiny", ["checkpoint.init_from_hf=/models/llama"])

* :func:`resolve_model`: with ``checkpoint.init_from_hf``, the model's family and shape
  fields from that folder's ``config.json`` (the family's mapping, ``megatron_mile/models``);
  the family must be known.
* :func:`resolve_run_config`: that, the layout check against the world size
  (:meth:`TrainConfig.validate`) and the kernel checks
  (:func:`megatron_mile.fusions.check_kernels`).

The train and import CLIs call :func:`load_run_config`; the trainer calls
:func:`resolve_model` (a config built by :func:`megatron_mile.config.load_config` in code
works too) and ``initialize_parallel`` the layout and kernel checks. Every step is idempotent.
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_mile.config import TrainConfig, load_config

__all__ = ["load_run_config", "resolve_model", "resolve_run_config"]


def resolve_model(cfg: TrainConfig) -> TrainConfig:
    """Set ``cfg.model``'s family and shape from ``checkpoint.init_from_hf``'s config.json
    (when set; a field set in the config must agree with it) and check the family is known.
    Reads config.json only; no collectives. Returns ``cfg``.

    Raises:
        ConfigError: unreadable config.json, a model the family cannot represent, a field
            that disagrees, or an unknown ``model.family``.
    """
    from megatron_mile.hf.config import apply_hf_model_config
    from megatron_mile.models import get_family

    if cfg.checkpoint.init_from_hf:
        apply_hf_model_config(cfg)
    get_family(cfg.model.family)
    return cfg


def resolve_run_config(cfg: TrainConfig, world_size: Optional[int] = None) -> TrainConfig:
    """:func:`resolve_model`, then the layout against ``world_size`` (default
    ``$WORLD_SIZE``, 1 when unset) and the kernels this machine offers. Returns ``cfg``.

    Raises:
        ConfigError: one line naming the field.
    """
    from megatron_mile.fusions import check_kernels

    resolve_model(cfg)
    cfg.validate(world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    check_kernels(cfg)
    return cfg


def load_run_config(name_or_path: Optional[str], overrides: Optional[list[str]] = None,
                    world_size: Optional[int] = None) -> TrainConfig:
    """:func:`megatron_mile.config.load_config` (the file, the overrides, the field and
    layout checks), then :func:`resolve_run_config`: the configuration a run starts from."""
    return resolve_run_config(load_config(name_or_path, overrides, world_size), world_size)
