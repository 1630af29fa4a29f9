"""Checkpoints: exact resume across layouts, resharding, atomic publishing, errors without hangs.

Two 2-process gloo launches (each process pays ~8 s of imports once):
- resume: for each layout, train 4 steps saving after step 2; then build fresh objects from a
  different seed, load, train steps 3-4. Loss and grad norm must equal the uninterrupted run
  exactly (same ops in the same order on CPU: bitwise reproducible).
- failures: atomicity and every error path; each must raise CheckpointError on BOTH ranks.
  A hang would exceed the launch timeout and fail the test.
"""

from __future__ import annotations

import glob
import os
import shutil

import pytest

from megatron_mile.testing import run_distributed

pytestmark = pytest.mark.slow

RESUME_LAYOUTS = {
    # name: (tp, pp, vp, bf16, distributed optimizer, num_layers)
    "tp2": (2, 1, None, False, False, 2),
    "dp2_bf16_distopt": (1, 1, None, True, True, 2),
    "tp2_bf16_distopt": (2, 1, None, True, True, 2),
    "pp2_vp2_distopt": (1, 2, 2, False, True, 4),
}
EXTRA = {"step": 2, "consumed_samples": 16, "config": {"model": {"hidden": 64}, "lr": 1e-3}}


class _Run:
    """One layout's model/optimizer/scheduler, built inside an initialised parallel_state."""

    def __init__(self, tp, pp, vp, bf16, distopt, num_layers, seed):
        from megatron_mile.testing import tiny_gpt as T

        self.T = T
        T.seed_everything(seed)
        self.shape = T.TinyGPT(num_layers=num_layers)
        config = T.transformer_config(self.shape, bf16=bf16, vp_size=vp)
        self.model = T.wrap_for_training(T.build_model_chunks(self.shape, config), config,
                                         use_distributed_optimizer=distopt)
        self.optimizer = T.build_optimizer(self.model, config, use_distributed_optimizer=distopt)
        self.scheduler = T.build_scheduler(self.optimizer)
        self.batches = T.make_batches(self.shape, seed=7, count=4)

    def step(self):
        return self.T.train_step(self.model, self.optimizer, self.scheduler, self.batches,
                                 self.shape)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def _parallel(tp, pp, vp):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vp)


def _resume(rank: int, world_size: int, root: str) -> dict:
    from megatron.core import parallel_state

    from megatron_mile.launch import initialize_distributed
    from megatron_mile.training.checkpointing import load_checkpoint, save_checkpoint

    initialize_distributed()
    out = {}
    for name, (tp, pp, vp, bf16, distopt, layers) in RESUME_LAYOUTS.items():
        ckpt = os.path.join(root, name)
        _parallel(tp, pp, vp)
        run = _Run(tp, pp, vp, bf16, distopt, layers, seed=1)
        straight = [run.step(), run.step()]
        path = save_checkpoint(ckpt, 2, run.model, run.optimizer, run.scheduler, EXTRA)
        lr_at_save = run.lr()
        straight += [run.step(), run.step()]

        fresh = _Run(tp, pp, vp, bf16, distopt, layers, seed=99)
        extra = load_checkpoint(ckpt, fresh.model, fresh.optimizer, fresh.scheduler)
        lr_after_load = fresh.lr()
        resumed = [fresh.step(), fresh.step()]
        out[name] = {"straight": straight, "resumed": resumed, "extra": extra, "path": path,
                     "lr": (lr_at_save, lr_after_load)}

        if name == "tp2":
            # Reshard: TP=2 checkpoint -> TP=1 (DP=2) model, weights only (eval/export).
            _parallel(1, 1, None)
            single = _Run(1, 1, None, False, False, layers, seed=5)
            load_checkpoint(ckpt, single.model, None, None)
            out["tp2_to_tp1_eval"] = single.T.eval_loss(single.model, single.batches,
                                                        single.shape)
            out["tp2_after_2_steps"] = straight[2][0]
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def resume(tmp_path_factory) -> list[dict]:
    root = str(tmp_path_factory.mktemp("resume"))
    return run_distributed(_resume, 2, args=(root,), timeout_s=500)


@pytest.mark.parametrize("layout", sorted(RESUME_LAYOUTS))
def test_resume_is_exact(resume, layout):
    for rank_out in resume:
        case = rank_out[layout]
        # (loss, grad norm) of steps 3 and 4: bitwise equal to the uninterrupted run.
        assert case["resumed"] == case["straight"][2:], layout
        assert case["straight"][3][0] < case["straight"][0][0]  # it did train
        assert case["extra"] == EXTRA
        assert case["lr"][0] == case["lr"][1]
        assert os.path.basename(case["path"]) == "iter_0000002"


def test_tp2_checkpoint_loads_into_tp1(resume):
    # Same weights, different reduction order: fp32 agreement to 1e-5 relative.
    for rank_out in resume:
        expected = rank_out["tp2_after_2_steps"]
        assert abs(rank_out["tp2_to_tp1_eval"] - expected) <= 1e-5 * expected


# --- atomicity and failures -------------------------------------------------------------------


def _outcome(fn, *args, **kwargs) -> tuple[str, str]:
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test inspects the type and message
        return type(exc).__name__, str(exc)
    return "ok", repr(result)


def _failures(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist

    from megatron_mile.launch import initialize_distributed
    from megatron_mile.training.checkpointing import (
        TRACKER_FILENAME, checkpoint_path, find_latest_checkpoint, load_checkpoint,
        save_checkpoint,
    )

    initialize_distributed()
    _parallel(2, 1, None)
    run = _Run(2, 1, None, False, False, 2, seed=1)
    run.step()
    good = os.path.join(root, "good")
    save_checkpoint(good, 2, run.model, run.optimizer, run.scheduler, {"step": 2})
    out: dict = {"latest": find_latest_checkpoint(good)}

    def load(where, **kwargs):
        return load_checkpoint(where, run.model, run.optimizer, run.scheduler, **kwargs)

    def on_rank0(action):
        if rank == 0:
            action()
        dist.barrier()

    def variant(name, iteration, damage=None, tracker=None):
        """Copy of iter 2 published as ``iteration`` in its own root, then damaged."""
        where = os.path.join(root, name)
        def make():
            os.makedirs(where)
            shutil.copytree(checkpoint_path(good, 2), checkpoint_path(where, iteration))
            if damage:
                damage(checkpoint_path(where, iteration))
            with open(os.path.join(where, TRACKER_FILENAME), "w") as f:
                f.write(tracker if tracker is not None else f"{iteration}\n")
        on_rank0(make)
        return where

    # Unpublished work is ignored: a .tmp (rename never happened) and a renamed dir whose
    # tracker update never happened. The tracker still names iteration 2.
    on_rank0(lambda: (shutil.copytree(checkpoint_path(good, 2),
                                      checkpoint_path(good, 4) + ".tmp"),
                      shutil.copytree(checkpoint_path(good, 2), checkpoint_path(good, 6))))
    out["latest_with_stale"] = find_latest_checkpoint(good)
    out["load_with_stale"] = _outcome(load, good)
    # A new save at 4 replaces the stale .tmp and publishes.
    out["save_over_stale_tmp"] = _outcome(save_checkpoint, good, 4, run.model, run.optimizer,
                                          run.scheduler, {"step": 4})
    out["latest_after_save"] = find_latest_checkpoint(good)
    out["load_after_save"] = _outcome(load, good)
    out["load_explicit_iteration"] = _outcome(load, good, iteration=2)
    out["save_existing"] = _outcome(save_checkpoint, good, 4, run.model, run.optimizer,
                                    run.scheduler, {"step": 4})

    # Error paths.
    out["missing_dir"] = _outcome(load, os.path.join(root, "nope"))
    empty = os.path.join(root, "empty")
    on_rank0(lambda: os.makedirs(empty))
    out["fresh_latest"] = find_latest_checkpoint(empty)
    out["no_tracker"] = _outcome(load, empty)
    corrupt_tracker = variant("corrupt_tracker", 2, tracker="two\n")
    out["corrupt_tracker_latest"] = _outcome(find_latest_checkpoint, corrupt_tracker)
    out["corrupt_tracker"] = _outcome(load, corrupt_tracker)
    out["tracker_names_missing"] = _outcome(load, variant("names_missing", 2, tracker="99\n"))
    out["incomplete"] = _outcome(load, variant(
        "incomplete", 8, damage=lambda p: os.remove(os.path.join(p, "metadata.json"))))

    def truncate(p):
        data_file = sorted(glob.glob(os.path.join(p, "*.distcp")))[-1]
        os.truncate(data_file, os.path.getsize(data_file) // 2)
    out["truncated"] = _outcome(load, variant("truncated", 10, damage=truncate))

    def zero_fill(p):
        data_file = sorted(glob.glob(os.path.join(p, "*.distcp")))[0]
        size = os.path.getsize(data_file)
        with open(data_file, "r+b") as f:
            f.write(b"\0" * size)
    out["corrupt_bytes"] = _outcome(load, variant("corrupt_bytes", 12, damage=zero_fill))

    # One rank's view of the checkpoint lacks that rank's data file (e.g. a node-local copy):
    # rank 0 loads the intact copy, rank 1 the damaged one. Both must raise, neither hang.
    one_rank = variant("one_rank_missing", 2, damage=lambda p: os.remove(
        sorted(glob.glob(os.path.join(p, "*.distcp")))[-1]))
    out["one_rank_missing"] = _outcome(load, good if rank == 0 else one_rank, iteration=2)

    # The process group survived all of that: a final collective works.
    out["still_alive"] = _outcome(load, good)
    return out


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> list[dict]:
    root = str(tmp_path_factory.mktemp("failures"))
    return run_distributed(_failures, 2, args=(root,), timeout_s=400)


def test_tracker_names_published_checkpoint(failures):
    for out in failures:
        assert out["latest"] == 2
        assert out["latest_with_stale"] == 2
        assert out["load_with_stale"] == ("ok", repr({"step": 2}))


def test_save_replaces_stale_tmp_and_publishes(failures):
    for out in failures:
        assert out["save_over_stale_tmp"][0] == "ok"
        assert out["save_over_stale_tmp"][1].endswith("iter_0000004'")
        assert out["latest_after_save"] == 4
        assert out["load_after_save"] == ("ok", repr({"step": 4}))
        assert out["load_explicit_iteration"] == ("ok", repr({"step": 2}))
        assert out["still_alive"] == ("ok", repr({"step": 4}))


def test_fresh_dir_has_no_latest(failures):
    for out in failures:
        assert out["fresh_latest"] is None


@pytest.mark.parametrize("case, needle", [
    ("save_existing", "iter_0000004 already exists"),
    ("missing_dir", "nope does not exist"),
    ("no_tracker", "has no latest_checkpointed_iteration.txt"),
    ("corrupt_tracker_latest", "is corrupt"),
    ("corrupt_tracker", "is corrupt"),
    ("tracker_names_missing", "iter_0000099 does not exist"),
    ("incomplete", "iter_0000008 is incomplete"),
    ("truncated", "truncated"),
    ("corrupt_bytes", "iter_0000012"),
    ("one_rank_missing", "is missing"),
])
def test_errors_raise_checkpoint_error_on_every_rank(failures, case, needle):
    for rank, out in enumerate(failures):
        kind, message = out[case]
        assert kind == "CheckpointError", (rank, case, kind, message)
        assert needle in message, (rank, case, message)


def test_one_rank_missing_is_reported_from_the_rank_that_saw_it(failures):
    for out in failures:
        message = out["one_rank_missing"][1]
        assert "rank 1:" in message and "rank 0:" not in message
