"""Checkpoints: exact resume in every layout, resharding, the API's errors on every rank.

One 2-process gloo launch (each process imports megatron-core once), on the product's Trainer
(the shipped tiny config, mock data, fp32 unless a layout says otherwise):
- resume: per layout, 4 steps straight; 2 steps + save, then a fresh trainer resumes for steps
  3-4. Loss and grad norm must equal the straight run bitwise (same ops in the same order on
  CPU), also with dropout on (every mask comes from the restored RNG state).
- relayout: the TP=2 checkpoint loads weights-only into a PP=2 model; its first loss is the
  straight run's at that step (fp32, 1e-5: only the reduction order differs).
- failures: atomicity and every error path of ``checkpoint.save``/``checkpoint.load``; each
  must raise CheckpointError on BOTH ranks. A hang would exceed the launch timeout.
(The CLI-level faults -- crashes in the publish window, a full disk, crafted files, hung
peers -- are in test_faults.py.)
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import threading

import pytest

from megatron_mile.testing import run_distributed
from trainer_runs import DROPOUT, curve, resume_curves, run_trainer

pytestmark = pytest.mark.slow

BASE = ["training.eval_interval=0", "training.log_interval=1", "optimizer.lr_decay_iters=16"]
TP2 = ["parallel.tensor_model_parallel_size=2"]
PP2 = ["parallel.pipeline_model_parallel_size=2"]
DISTOPT = ["parallel.use_distributed_optimizer=true"]
RESUME_LAYOUTS = {
    "tp2": TP2,
    "dp2_bf16_distopt": ["precision.dtype=bf16", *DISTOPT],
    "tp2_bf16_distopt": [*TP2, "precision.dtype=bf16", *DISTOPT],
    "pp2_vp2_distopt": [*PP2, "parallel.virtual_pipeline_model_parallel_size=2", *DISTOPT,
                        "model.num_layers=4"],
    "tp2_sp_dropout": [*TP2, "parallel.sequence_parallel=true", *DROPOUT],
    "pp2_dropout": [*PP2, *DROPOUT],
    # checkpoint.async_save, every iteration (a save is often in flight at the next), DP=2
    # (the save distribution over DP runs while staging), keeping the last two.
    "dp2_distopt_async": [*DISTOPT, "checkpoint.async_save=true", "checkpoint.save_interval=1",
                          "checkpoint.keep_last=2"],
}


def _checkpoints(rank: int, world_size: int, root: str) -> dict:
    import logging

    out: dict = {"removed": []}
    retention = logging.getLogger("megatron_mile.training.checkpoint.protocol")
    retention.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = lambda record: out["removed"].append(record.getMessage())
    retention.addHandler(handler)
    for name, layout in RESUME_LAYOUTS.items():
        out[name] = resume_curves(BASE + layout, world_size, os.path.join(root, name), steps=4)
    retention.removeHandler(handler)
    out["async_dir"] = sorted(os.listdir(os.path.join(root, "dp2_distopt_async")))
    # The TP=2 checkpoint (latest: iteration 4) into PP=2, weights only: iteration 5's loss is
    # computed from the same weights as in a straight TP=2 run.
    out["straight_tp2"] = curve(run_trainer(BASE + TP2 + ["training.train_iters=5"], world_size))
    relayout = run_trainer(BASE + PP2 + [f"checkpoint.load={os.path.join(root, 'tp2')}",
                                         "checkpoint.load_optimizer=false",
                                         "training.train_iters=5"], world_size)
    out["relayout"] = {"start": relayout["history"][0]["iteration"],
                       "loss": (curve(relayout) or [None])[0]}  # None off the last stage
    out["failures"] = _failures(rank, world_size, os.path.join(root, "failures"))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[dict]:
    root = str(tmp_path_factory.mktemp("checkpoints"))
    return run_distributed(_checkpoints, 2, args=(root,), timeout_s=600)


@pytest.mark.parametrize("layout", list(RESUME_LAYOUTS))
def test_resume_is_exact(checkpoints, layout):
    for rank_out in checkpoints:
        case = rank_out[layout]
        assert case["resumed_start"] == 3
        assert case["first"] == case["straight"][:2], layout
        assert case["resumed"] == case["straight"][2:], layout  # bitwise
        assert case["grad_norm"]["resumed"] == case["grad_norm"]["straight"][2:], layout
    last = checkpoints[-1][layout]["straight"]  # the last rank is on the last pipeline stage
    assert len(last) == 4 and last[-1] < last[0], last  # it did train


def test_dropout_is_on_in_the_dropout_layouts(checkpoints):
    for name in ("tp2_sp_dropout", "pp2_dropout"):
        dropout, plain = checkpoints[-1][name]["straight"], checkpoints[-1]["tp2"]["straight"]
        assert max(abs(a - b) for a, b in zip(dropout, plain)) > 1e-3, name


def test_checkpoint_reloads_into_another_layout(checkpoints):
    out = checkpoints[-1]
    assert out["relayout"]["start"] == 5
    assert out["relayout"]["loss"] == pytest.approx(out["straight_tp2"][4], rel=1e-5)


# --- atomicity and failures -------------------------------------------------------------------


def _outcome(fn, *args, **kwargs) -> tuple[str, str]:
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test inspects the type and message
        return type(exc).__name__, str(exc)
    return "ok", repr(result)


def _failures(rank: int, world_size: int, root: str) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_mile.config import load_config
    from megatron_mile.training import checkpoint
    from megatron_mile.training.checkpoint import TRACKER_FILENAME, checkpoint_path
    from megatron_mile.training.checkpoint import storage
    from megatron_mile.training.trainer import Trainer

    trainer = Trainer(load_config("tiny", BASE + RESUME_LAYOUTS["tp2"], world_size=world_size))
    trainer.setup()
    trainer.train_step()
    run = trainer  # its model, optimizer and scheduler are what the API saves and loads
    good = os.path.join(root, "good")
    checkpoint.save(good, 2, run.model, run.optimizer, run.scheduler, {"step": 2})
    out: dict = {"latest": checkpoint.find(good)}

    def load(where, **kwargs):
        return checkpoint.load(where, run.model, run.optimizer, run.scheduler, **kwargs)

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
    out["latest_with_stale"] = checkpoint.find(good)
    out["load_with_stale"] = _outcome(load, good)
    # A new save at 4 replaces the stale .tmp and publishes.
    out["save_over_stale_tmp"] = _outcome(checkpoint.save, good, 4, run.model, run.optimizer,
                                          run.scheduler, {"step": 4})
    out["latest_after_save"] = checkpoint.find(good)
    out["load_after_save"] = _outcome(load, good)
    out["load_explicit_iteration"] = _outcome(load, good, iteration=2)
    out["save_existing"] = _outcome(checkpoint.save, good, 4, run.model, run.optimizer,
                                    run.scheduler, {"step": 4})

    # Error paths.
    out["missing_dir"] = _outcome(load, os.path.join(root, "nope"))
    empty = os.path.join(root, "empty")
    on_rank0(lambda: os.makedirs(empty))
    out["fresh_latest"] = checkpoint.find(empty)
    out["no_tracker"] = _outcome(load, empty)
    corrupt_tracker = variant("corrupt_tracker", 2, tracker="two\n")
    out["corrupt_tracker_latest"] = _outcome(checkpoint.find, corrupt_tracker)
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

    # checkpoint.async_save through the API: a second save waits for the first (one line); a
    # background write failing on rank 1 (a full disk) is one line on every rank at the
    # finalize, and iteration 3 stays the latest.
    lines: list[str] = []
    saver = checkpoint.AsyncSaver(log=lines.append)
    adir = os.path.join(root, "async")
    saver.save(adir, 2, run.model, run.optimizer, run.scheduler, {"step": 2})
    saver.save(adir, 3, run.model, run.optimizer, run.scheduler, {"step": 3})
    out["async_published"] = _outcome(saver.finalize, blocking=True)
    out["async_lines"] = lines
    out["async_latest"] = checkpoint.find(adir)
    out["async_nothing_in_flight"] = saver.finalize()
    original = storage._ProgressStream.write

    def full_disk_on_rank1(stream, data):
        if rank == 1 and threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(stream, data)

    storage._ProgressStream.write = full_disk_on_rank1
    try:
        saver.save(adir, 4, run.model, run.optimizer, run.scheduler, {"step": 4})
        out["async_failed"] = _outcome(saver.finalize, blocking=True)
    finally:
        storage._ProgressStream.write = original
    dist.barrier()  # rank 0 removes the partial save after the agreement
    out["async_after_failure"] = (checkpoint.find(adir), sorted(os.listdir(adir)))
    out["async_load"] = _outcome(load, adir)

    # What is written is the copy staged at save(): parameters changed afterwards (by the
    # next optimizer step) never reach the files, here while the write is held back.
    gate = threading.Event()

    def held_back(stream, data):
        if threading.current_thread() is not threading.main_thread():
            gate.wait()
        return original(stream, data)

    params = [p for chunk in run.model for p in chunk.parameters()]
    staged = [p.detach().clone() for p in params]
    storage._ProgressStream.write = held_back
    try:
        saver.save(adir, 5, run.model, run.optimizer, run.scheduler, {"step": 5})
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        gate.set()
        saver.finalize(blocking=True)
    finally:
        storage._ProgressStream.write = original
    out["async_staged_load"] = _outcome(load, adir)
    out["async_staged_exact"] = all(torch.equal(p, s) for p, s in zip(params, staged))

    # The process group survived all of that: a final collective works.
    out["still_alive"] = _outcome(load, good)
    trainer.shutdown()
    return out


@pytest.fixture(scope="module")
def failures(checkpoints) -> list[dict]:
    return [rank_out["failures"] for rank_out in checkpoints]


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


def test_async_saves_keep_the_last_two_and_log_each_removal(checkpoints):
    names = [n for n in checkpoints[0]["async_dir"] if n.startswith("iter_")]
    assert names == ["iter_0000003", "iter_0000004"], checkpoints[0]["async_dir"]
    removed = [line for line in checkpoints[0]["removed"] if "keep_last" in line]
    assert len(removed) == 2, checkpoints[0]["removed"]  # rank 0 only, one line each
    assert "iter_0000001 (checkpoint.keep_last=2)" in removed[0], removed
    assert "iter_0000002 (checkpoint.keep_last=2)" in removed[1], removed
    assert not [line for line in checkpoints[1]["removed"] if "keep_last" in line]


def test_async_save_waits_for_the_one_in_flight_and_publishes(failures):
    for out in failures:
        assert out["async_published"][0] == "ok", out["async_published"]
        assert out["async_published"][1].endswith("iter_0000003'")
        assert out["async_latest"] == 3 and out["async_nothing_in_flight"] is None
        waits = [line for line in out["async_lines"] if line.startswith("waiting")]
        assert waits == ["waiting for the checkpoint save of iteration 2 to finish before "
                         "saving iteration 3 (checkpoint.async_save: at most one save in "
                         "flight)"], out["async_lines"]


def test_a_failed_background_save_is_one_line_and_the_last_stays_latest(failures):
    for out in failures:
        kind, message = out["async_failed"]
        assert kind == "CheckpointError", message
        # torch DCP gathers rank 1's failure to every rank: each one names it
        assert "\n" not in message and ": writing " in message, message
        assert "iter_0000004.tmp" in message and "No space left on device" in message, message
        assert message.endswith("the last published checkpoint (iteration 3) is untouched")
        latest, names = out["async_after_failure"]
        assert latest == 3 and "iter_0000004" not in names and "iter_0000004.tmp" not in names
        assert out["async_load"] == ("ok", repr({"step": 3}))


def test_an_async_save_writes_the_state_of_its_iteration(failures):
    for out in failures:
        assert out["async_staged_load"] == ("ok", repr({"step": 5}))
        assert out["async_staged_exact"]
