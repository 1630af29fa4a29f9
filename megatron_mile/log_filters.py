"""Drop the third-party warnings that tell a user of this project nothing, by message and module.

Each filter names the exact message and the module that issues it; everything else, including
new warnings from the same modules, still shows. Installed by the CLI entry points before
megatron-core is imported (its import-time warnings are the first ones).

Dropped everywhere:
    megatron-core ``transformer_config``: "full scope is deprecated" (raised by megatron's own
        default ``cuda_graph_scope``, whatever the user sets).
    torch ``distributed.checkpoint``: the deprecations of ``load_state_dict`` and of
        ``ShardedTensor`` that megatron-core 0.16.1's checkpoint strategies trigger.
    torch ``distributed``: the ``reduce_scatter_tensor`` / ``all_gather_into_tensor``
        deprecation warnings megatron-core's gloo paths trigger.
    megatron-core: the four "Transformer Engine and Apex are not installed. Falling back ..."
        warnings (optimizers, multi-tensor apply, gradient clipping) and "Apex is not
        installed. Falling back to Torch Norm", each once per rank: on a GPU the trainer's
        rank 0 says it once instead (``megatron_mile.fusions.kernel_notice``).
    megatron-core ``datasets.gpt_dataset`` (a log record): "Unable to save MockGPTDataset
        indexes because path_to_cache is None": mock data has nothing worth caching.
Dropped without CUDA only (on a GPU they say something about the run):
    megatron-core ``tensor_parallel.layers``: the ``CUDA_DEVICE_MAX_CONNECTIONS`` advice
        (``megatron_mile.launch`` and examples/launch.sh set the variable on GPUs; it means
        nothing on CPU).
    torch, seen through ``megatron_mile.cpu_compat``: "The .grad attribute of a Tensor that is
        not a leaf Tensor is being accessed", once per rank with the distributed optimizer on
        CPU, where its fp32 main parameters are views of the model's.
"""

from __future__ import annotations

import logging
import warnings

_MEGATRON = r"megatron\.core(\..*)?$"

_ALWAYS = (
    (r"full scope is deprecated", UserWarning, _MEGATRON),
    (r"`load_state_dict` is deprecated", FutureWarning, _MEGATRON),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, r".*"),
    # warnings matches the message from its start: these begin with a backtick.
    (r"`?torch\.distributed\.(_reduce_scatter_base|_all_gather_base|reduce_scatter_tensor|"
     r"all_gather_into_tensor)`? is deprecated", (UserWarning, FutureWarning), r".*"),
    (r"Transformer Engine and Apex are not installed\. Falling back", UserWarning, _MEGATRON),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, _MEGATRON),
)
_CPU_ONLY = (
    (r"When using (sequence parallelism|async grad allreduce) it is recommended to set the "
     r"environment variable CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, _MEGATRON),
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     UserWarning, r"megatron_mile\.cpu_compat$"),
)
_DROPPED_RECORDS = (
    ("megatron.core.datasets.gpt_dataset", "Unable to save MockGPTDataset indexes"),
)


class _DropRecords(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install_warning_filters(cuda: bool) -> None:
    """Ignore the warnings and log records listed in the module docstring (``cuda``: keep the
    CUDA_DEVICE_MAX_CONNECTIONS advice). Idempotent."""
    for message, categories, module in _ALWAYS + (() if cuda else _CPU_ONLY):
        for category in categories if isinstance(categories, tuple) else (categories,):
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
    by_logger: dict[str, list[str]] = {}
    for name, prefix in _DROPPED_RECORDS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in logger.filters):
            logger.addFilter(_DropRecords(tuple(prefixes)))
