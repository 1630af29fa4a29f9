"""Drop the third-party warnings that tell a user of this project nothing, by message and module.

Each filter names the exact message and the module that issues it; everything else, including
new warnings from the same modules, still shows. Installed by the CLI entry points before
megatron-core is imported (its import-time warnings are the first ones).

Dropped everywhere:
    megatron-core ``transformer_config``: "full scope is deprecated" (raised by megatron's own
        default ``cuda_graph_scope``, whatever the user sets).
    megatron-core ``tensor_parallel.layers``: the ``CUDA_DEVICE_MAX_CONNECTIONS`` advice
        (examples/launch.sh sets the variable on GPUs; it means nothing on CPU).
    torch ``distributed.checkpoint``: the deprecations of ``load_state_dict`` and of
        ``ShardedTensor`` that megatron-core 0.16.1's checkpoint strategies trigger.
    torch ``distributed``: the ``reduce_scatter_tensor`` / ``all_gather_into_tensor``
        deprecation warnings megatron-core's gloo paths trigger.
Dropped without CUDA only (the expected setting there; on a GPU they say something):
    megatron-core: "Transformer Engine and Apex are not installed. Falling back ...",
        "Apex is not installed. Falling back to Torch Norm".
"""

from __future__ import annotations

import warnings

_MEGATRON = r"megatron\.core(\..*)?$"
_TORCH_DIST = r"torch\.distributed(\..*)?$"

_ALWAYS = (
    (r"full scope is deprecated", UserWarning, _MEGATRON),
    (r"When using async grad allreduce it is recommended to set the environment variable "
     r"CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, _MEGATRON),
    (r"`load_state_dict` is deprecated", FutureWarning, _MEGATRON),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, r".*"),
    (r"torch\.distributed\.(_reduce_scatter_base|_all_gather_base|reduce_scatter_tensor|"
     r"all_gather_into_tensor)", (UserWarning, FutureWarning), r".*"),
)
_CPU_ONLY = (
    (r"Transformer Engine and Apex are not installed\. Falling back", UserWarning, _MEGATRON),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, _MEGATRON),
)


def install_warning_filters(cuda: bool) -> None:
    """Ignore the warnings listed in the module docstring (``cuda``: keep the TE/Apex ones)."""
    for message, categories, module in _ALWAYS + (() if cuda else _CPU_ONLY):
        for category in categories if isinstance(categories, tuple) else (categories,):
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
