"""The state one checkpoint holds, and the fixes megatron-core 0.16.1 needs to restore it.

``build_state`` assembles megatron's sharded state dict (model chunks, optimizer, scheduler,
RNG states as per-rank tensors); the rest restores RNG states, gives a fresh distributed
optimizer its dummy Adam state before a load request, gives every param its own Adam ``step``
after one, and refuses optimizer state the current layout cannot take. Local: no collectives.
"""

from __future__ import annotations

import io
import random
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import unwrap_model

from megatron_mile.errors import CheckpointError


def current_layout() -> dict[str, int]:
    """This run's world size and TP/PP/DP/VP sizes, as recorded in every checkpoint."""
    return {
        "world_size": dist.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        "vp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 0,
    }


def model_keys(model: Sequence[MegatronModule]) -> list[str]:
    # Megatron-LM's naming: "model" for one chunk, "model<i>" for virtual pipeline chunks.
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states as tensors (``torch.load(weights_only=True)`` reads them).

    python: Mersenne Twister words [625] and [version, has_gauss, gauss]; numpy likewise
    ([624] and [pos, has_gauss, cached_gaussian]); torch CPU and CUDA generator bytes; one
    entry per megatron RNG tracker state (dropout in TP regions, expert parallel ...).
    """
    from megatron_mile.cpu_compat import cuda_available

    version, words, gauss = random.getstate()
    _, np_words, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python_words": torch.tensor(words, dtype=torch.int64),
        "python_meta": torch.tensor([version, gauss is not None,
                                     gauss if gauss is not None else 0.0], dtype=torch.float64),
        "numpy_words": torch.from_numpy(np_words.astype(np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    if cuda_available():  # no empty placeholder: megatron cannot shard a zero-size tensor
        state["cuda"] = torch.cuda.get_rng_state()
    for name, tracker_state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = tracker_state
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron_mile.cpu_compat import cuda_available

    version, has_gauss, gauss = state["python_meta"].tolist()
    random.setstate((int(version), tuple(state["python_words"].tolist()),
                     gauss if has_gauss else None))
    pos, np_has_gauss, cached = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_words"].numpy().astype(np.uint32), int(pos),
                         int(np_has_gauss), cached))
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "cuda" in state and cuda_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))
    tensor_parallel.get_cuda_rng_tracker().set_states({
        key[len("tracker."):]: value for key, value in state.items()
        if key.startswith("tracker.")})


def _rng_sharded(state: dict[str, torch.Tensor],
                 saved_keys: Optional[Sequence[str]] = None) -> dict[str, ShardedTensor]:
    """Each tensor as slice ``rank`` of a ``[world_size, ...]`` ShardedTensor; when loading,
    only the ``saved_keys`` the checkpoint holds (a CPU run's has no CUDA state)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return {name: ShardedTensor.from_rank_offsets(f"mile_rng_state.{name}", tensor,
                                                  (0, rank, world), replica_id=0,
                                                  prepend_axis_num=1)
            for name, tensor in state.items() if saved_keys is None or name in saved_keys}


def is_distributed(optimizer: Any) -> bool:
    """Whether ``optimizer`` (megatron's, chained or not) shards its state over DP."""
    return any(isinstance(opt, DistributedOptimizer)
               for opt in getattr(optimizer, "chained_optimizers", [optimizer]))


def check_optimizer_layout(path: str, meta: dict, optimizer: Any) -> None:
    """Refuse, before any read, optimizer state this layout cannot take: the distributed
    optimizer's ``dp_reshardable`` state reshards over DP only (megatron-core 0.16.1), and the
    two optimizers' states have different keys. Local; older checkpoints (no record) pass."""
    saved = meta.get("distributed_optimizer")
    if saved is None:
        return
    fix = ("or set checkpoint.load_optimizer=false (weights, step and data position load into "
           "any layout; Adam moments start fresh)")
    current = is_distributed(optimizer)
    if saved != current:
        raise CheckpointError(
            f"{path} holds the state of parallel.use_distributed_optimizer={str(saved).lower()}"
            f" and this run has {str(current).lower()}: set it back, {fix}")
    if not current or meta.get("distopt_sharding") != "dp_reshardable":
        return
    old, new = meta["layout"], current_layout()
    moved = [f"{k.upper()} {old[k]} -> {new[k]}" for k in ("tp", "pp", "vp") if old[k] != new[k]]
    if moved:
        raise CheckpointError(
            f"{path}: the distributed optimizer state (dp_reshardable) reshards across data-"
            f"parallel sizes only, and this run changes {', '.join(moved)}: resume at TP "
            f"{old['tp']}, PP {old['pp']}, VP {old['vp']}, {fix}")


def _materialize_distopt_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer its (dummy) Adam state before building a load request.

    Without Apex/TE (torch Adam: CPU, or a GPU install without TE), megatron-core 0.16.1's
    ``DistributedOptimizer.state_dict()`` asserts that all params share one Adam ``step``; a
    fresh optimizer has none, and ``sharded_state_dict(is_loading=True)`` calls
    ``state_dict()`` *before* its own dummy-state initialisation. Run that initialisation
    (``_init_optimizer_states_with_dummy_values``: one local zero-grad step) first; every value
    it touches is overwritten by the load. Local, no collectives.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def restore_adam_steps(optimizer: Any) -> None:
    """Give every param its own, correct Adam ``step`` after a distributed-optimizer load.

    megatron-core 0.16.1 ``DistributedOptimizer.load_state_dict`` with torch Adam (no Apex/TE)
    keeps the saved step count only in ``param_groups[i]["step"]``; the per-param ``step``
    tensors it leaves behind are ONE shared tensor holding the pre-load count (here: the dummy
    step of ``_materialize_distopt_state``). torch Adam increments a shared tensor once per
    param per step, so bias correction would be wrong and the resumed run would diverge.
    Set a fresh tensor per param from its group's saved count. Local, no collectives.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                param_state = opt.optimizer.state.get(param, {})
                if isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = torch.tensor(float(group["step"]),
                                                       dtype=param_state["step"].dtype)


def build_state(model, optimizer, opt_param_scheduler, *, is_loading: bool,
                with_rng: bool, distopt_sharding: str,
                rng_keys: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Megatron's sharded state dict of a save, or the request of a load (``is_loading``):
    each model chunk unwrapped, the optimizer's state mapped onto the model's ShardedTensors,
    the scheduler (saves only) and, with ``with_rng``, this rank's RNG states (when loading,
    placeholders of the ``rng_keys`` the checkpoint holds). Local: no collectives."""
    state: dict[str, Any] = {}
    for key, chunk in zip(model_keys(model), unwrap_model(list(model))):
        # Unwrapped (no DDP/Float16Module): tensor keys do not depend on the wrapping.
        state[key] = chunk.sharded_state_dict()
    if optimizer is not None:
        if is_loading:
            _materialize_distopt_state(optimizer)
        # Built from the model entries only; megatron maps params to their ShardedTensors.
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": distopt_sharding},
        )
    if opt_param_scheduler is not None and not is_loading:
        state["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    if with_rng:
        # On load the current state is only a placeholder of the right shapes.
        state["rng_state"] = _rng_sharded(_rng_state(), rng_keys)
    return state


def check_extra_state(extra_state: dict) -> None:
    """``common.pt`` is read with ``torch.load(weights_only=True)``: refuse what it can't load."""
    if not isinstance(extra_state, dict):
        raise CheckpointError(f"extra_state must be a dict, got {type(extra_state).__name__}")
    buf = io.BytesIO()
    torch.save(extra_state, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report what torch refused
        raise CheckpointError(
            "extra_state must hold plain Python values (dict/list/tuple/str/int/float/bool/"
            f"None) or tensors, loadable with torch.load(weights_only=True): {exc}"
        ) from exc

