"""Faults a long, requeued run meets, injected for real into ``tiny`` runs of the trainer CLI.

Each fault ends with the outcome a user needs: one line naming the file or field and the fix,
a non-zero exit, the last published checkpoint intact, and the next restart resuming from it
and training to the end. What is injected:

- publishing: the tracker write fails after ``iter_N`` was renamed into place (a directory in
  the way of the tracker's temp file: a real OSError in that window), and the state a
  ``kill -9`` in that window leaves (an unpublished ``iter_N``, a stale ``.tmp`` and a tracker
  temp file);
- a full disk (a small tmpfs, root only) during a save;
- crafted checkpoints whose ``.metadata``, ``.distcp`` byte items, RNG entries or ``common.pt``
  carry a pickle payload that would create a sentinel file, with their checksums rewritten as an
  attacker would; and flipped bytes inside a tensor;
- a changed lr schedule on resume;
- bad values and a bad tracker;
- a peer stopped with SIGSTOP (by PID, two real processes): the other rank ends within
  ``parallel.distributed_timeout_minutes``; a second SIGTERM ends a rank blocked in a
  collective at once.

The CLI's ``main`` runs in one spawned process (``run_distributed``, one launch for every
one-process group of runs: megatron-core is imported once); the hang tests launch ``python -m megatron_mile.train``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import time
import traceback

import pytest

from fault_runs import TINY, kill as _kill, launch as _launch, one_line as _one_line
from fault_runs import wait_for_training as _wait_for_training
from megatron_mile.testing import run_distributed

pytestmark = pytest.mark.slow



class _Payload:
    """Unpickling this runs ``touch SENTINEL`` (what a crafted checkpoint would do)."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def _main(*overrides: str) -> tuple[int, str]:
    """Run the CLI in this process: (exit code, what it wrote to stderr)."""
    from megatron_mile.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*TINY, *overrides])
    return code, err.getvalue()


def _latest(save: str):
    from megatron_mile.training import checkpoint

    return checkpoint.find(save)


# --------------------------------------------------------------------------- publishing, disk


def _publish_and_disk(rank: int, world_size: int, root: str, tmpfs: str | None) -> dict:
    """The faults below with synchronous and with asynchronous saves, in one launch."""
    out = {"sync": _publish_faults(os.path.join(root, "sync"), tmpfs)}
    if tmpfs is not None:
        shutil.rmtree(os.path.join(tmpfs, "run"))
    out["async"] = _publish_faults(os.path.join(root, "async"), tmpfs,
                                   "checkpoint.async_save=true")
    return out


def _publish_faults(root: str, tmpfs: str | None, *mode: str) -> dict:
    from megatron_mile.training.checkpoint import TRACKER_FILENAME, checkpoint_path
    from megatron_mile.utils import temp_file_prefix

    def run(*overrides: str) -> tuple[int, str]:
        return _main(*mode, *overrides)

    os.makedirs(root)
    out: dict = {}
    save = os.path.join(root, "run")
    out["first"] = run("training.train_iters=2", f"checkpoint.save={save}")

    # 1. The tracker write fails after iter_4 was renamed into place.
    blocker = os.path.join(save, temp_file_prefix(TRACKER_FILENAME) + str(os.getpid()))
    os.makedirs(blocker)
    out["publish_fails"] = run("training.train_iters=4", f"checkpoint.save={save}")
    out["after_publish_failure"] = (_latest(save), sorted(os.listdir(save)))
    os.rmdir(blocker)
    out["after_publish_retry"] = run("training.train_iters=4", f"checkpoint.save={save}")
    out["latest_after_retry"] = _latest(save)

    # 2. What kill -9 between the rename and the tracker update leaves: iter_6 complete but
    #    unpublished, plus a stale .tmp and a tracker temp file from other crashed saves.
    crashed = os.path.join(root, "crashed")
    shutil.copytree(save, crashed)
    shutil.copytree(checkpoint_path(crashed, 4), checkpoint_path(crashed, 6))
    shutil.copytree(checkpoint_path(crashed, 4), checkpoint_path(crashed, 8) + ".tmp")
    with open(os.path.join(crashed, temp_file_prefix(TRACKER_FILENAME) + "999999"), "w") as f:
        f.write("6\n")
    out["crash_resume"] = run("training.train_iters=6", f"checkpoint.save={crashed}",
                                "checkpoint.save_interval=100")
    out["after_crash_resume"] = (_latest(crashed), sorted(os.listdir(crashed)))

    # 3. The disk fills up during a save (a 2-checkpoint tmpfs, filled after the first save).
    if tmpfs is not None:
        disk = os.path.join(tmpfs, "run")
        out["disk_first"] = run("training.train_iters=2", f"checkpoint.save={disk}")
        filler = os.path.join(tmpfs, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        for block in (1 << 16, 1 << 12, 1):  # to the last byte
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * block)
        # Room for the run's lock file (one page), none for a checkpoint or a 100 KB tracker.
        os.ftruncate(fd, os.fstat(fd).st_size - (16 << 10))
        os.close(fd)
        # The tracker's atomic rewrite on a full disk: fails, leaves no temp file, keeps the
        # old content.
        from megatron_mile.utils import atomic_write_text

        tracker = os.path.join(disk, TRACKER_FILENAME)
        try:
            atomic_write_text(tracker, "9" * 100_000 + "\n")
            out["tracker_write"] = "written"
        except OSError as exc:
            out["tracker_write"] = str(exc)
        out["tracker_after_full_write"] = (open(tracker).read(), sorted(os.listdir(disk)))
        out["disk_full"] = run("training.train_iters=4", f"checkpoint.save={disk}")
        out["after_disk_full"] = (_latest(disk), sorted(os.listdir(disk)))
        os.remove(filler)
        out["disk_freed"] = run("training.train_iters=4", f"checkpoint.save={disk}")
        out["latest_after_disk_freed"] = _latest(disk)
    return out


def _one_process(rank: int, world_size: int, roots: dict[str, str], tmpfs: str | None) -> dict:
    """The one-process groups of runs (publish and disk, crafted checkpoints, bad inputs) in one
    launch, so that megatron-core is imported once for all three: each group's result, or its
    traceback, so that a group that raises fails its own tests only."""
    groups = {
        "publish": lambda: _publish_and_disk(rank, world_size, roots["publish"], tmpfs),
        "crafted": lambda: _crafted(rank, world_size, roots["crafted"]),
        "bad": lambda: _bad_inputs(rank, world_size, roots["bad"]),
    }
    out = {}
    for name, group in groups.items():
        try:
            out[name] = (True, group())
        except Exception:  # noqa: BLE001 - reported by that group's fixture
            out[name] = (False, traceback.format_exc())
    return out


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    roots = {name: str(tmp_path_factory.mktemp(name)) for name in ("publish", "crafted", "bad")}
    tmpfs = None
    if os.geteuid() == 0 and shutil.which("mount"):
        tmpfs = os.path.join(roots["publish"], "tmpfs")
        os.makedirs(tmpfs)
        # One tiny checkpoint is about 2.2 MB: room for the first, not the filler too.
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", tmpfs]).returncode:
            tmpfs = None
    try:
        yield run_distributed(_one_process, 1, args=(roots, tmpfs), timeout_s=1000)[0]
    finally:
        if tmpfs is not None:
            subprocess.run(["umount", tmpfs])


def _group(one_process_runs: dict, name: str) -> dict:
    ok, result = one_process_runs[name]
    if not ok:
        pytest.fail(f"the {name} runs raised:\n{result}", pytrace=False)
    return result


@pytest.fixture(scope="module")
def publish_runs(one_process_runs):
    return _group(one_process_runs, "publish")


@pytest.fixture(params=["sync", "async"])
def publish(publish_runs, request):
    """The publish and disk faults with checkpoint.async_save off and on."""
    return publish_runs[request.param]


def test_failed_publish_leaves_the_previous_checkpoint_and_a_retry_succeeds(publish):
    assert publish["first"][0] == 0
    code, stderr = publish["publish_fails"]
    line = _one_line(stderr)
    assert code == 1 and "publishing" in line and "iter_0000004" in line, line
    assert "last published checkpoint (iteration 2) is untouched" in line
    latest, names = publish["after_publish_failure"]
    assert latest == 2 and "iter_0000004" not in names and "iter_0000004.tmp" not in names
    assert publish["after_publish_retry"] == (0, "")
    assert publish["latest_after_retry"] == 4


def test_restart_after_a_crash_in_the_publish_window_replaces_and_cleans(publish):
    assert publish["crash_resume"] == (0, "")
    latest, names = publish["after_crash_resume"]
    assert latest == 6
    assert names == ["iter_0000002", "iter_0000004", "iter_0000006",
                     "latest_checkpointed_iteration.txt"], names


def test_disk_full_during_a_save_is_one_line_and_recoverable(publish):
    if "disk_full" not in publish:
        pytest.skip("needs root to mount a small tmpfs")
    assert publish["disk_first"][0] == 0
    code, stderr = publish["disk_full"]
    line = _one_line(stderr)
    assert code == 1, stderr
    assert "No space left on device" in line and "iter_0000004" in line, line
    assert "last published checkpoint (iteration 2) is untouched" in line
    latest, names = publish["after_disk_full"]
    assert latest == 2 and names == ["iter_0000002", "latest_checkpointed_iteration.txt"], names
    assert publish["disk_freed"] == (0, "")
    assert publish["latest_after_disk_freed"] == 4


def test_tracker_rewrite_on_a_full_disk_leaves_no_temp_file(publish):
    if "disk_full" not in publish:
        pytest.skip("needs root to mount a small tmpfs")
    assert "No space left on device" in publish["tracker_write"]
    content, names = publish["tracker_after_full_write"]
    assert content == "2\n"
    assert names == ["iter_0000002", "latest_checkpointed_iteration.txt"], names


# --------------------------------------------------------------------------- crafted files


def _rewrite_checksums(path: str) -> None:
    """What an attacker who edits files would do: make the recorded digests match again."""
    from megatron_mile.training import checkpoint
    from megatron_mile.utils import file_checksum

    _, files = checkpoint.read_checksums(path)
    checkpoint.write_checksums(path, {
        name: [os.path.getsize(os.path.join(path, name)),
               file_checksum(os.path.join(path, name))] for name in files})


def _overwrite_item(path: str, key_part: str, data: bytes) -> None:
    """Overwrite the bytes of the first stored item whose key contains ``key_part``."""
    from megatron_mile.training import checkpoint

    index = checkpoint.read_dcp_metadata(path)
    info = next(v for k, v in index.storage_data.items() if key_part in k.fqn)
    assert len(data) <= info.length, (key_part, len(data), info.length)
    with open(os.path.join(path, info.relative_path), "r+b") as f:
        f.seek(info.offset)
        f.write(data.ljust(info.length, b"\0"))


def _crafted(rank: int, world_size: int, root: str) -> dict:
    import pickle

    import torch

    from megatron_mile.evaluation.loading import load_inference_model
    from megatron_mile.training import checkpoint
    from megatron_mile.training.checkpoint import checkpoint_path

    good = os.path.join(root, "good")
    out: dict = {"good": _main("training.train_iters=2", f"checkpoint.save={good}")}
    def sentinel(name):
        return os.path.join(root, f"SENTINEL_{name}")

    def payload(name):
        return pickle.dumps(_Payload(sentinel(name)), protocol=2)  # torch.save's protocol

    def variant(name, damage, rewrite=True):
        where = os.path.join(root, name)
        shutil.copytree(good, where)
        damage(checkpoint_path(where, 2))
        if rewrite:
            _rewrite_checksums(checkpoint_path(where, 2))
        return where

    def replace_metadata(path):
        with open(os.path.join(path, ".metadata"), "wb") as f:
            f.write(payload("metadata"))

    def save_payload(path):
        torch.save({"x": _Payload(sentinel("common"))}, os.path.join(path, "common.pt"))

    cases = {
        "metadata": variant("metadata", replace_metadata),
        "byte_item": variant("byte_item", lambda p: _overwrite_item(p, "_extra_state",
                                                                     payload("byte_item"))),
        "rng_entry": variant("rng_entry", lambda p: _overwrite_item(
            p, "mile_rng_state.torch_cpu", payload("rng_entry"))),
        "common": variant("common", save_payload),
    }
    for name, where in cases.items():
        out[name] = _main("training.train_iters=3", f"checkpoint.load={where}")
        out[f"{name}_sentinel"] = os.path.exists(sentinel(name))
    # The evaluation/export loader shares the checks.
    eval_case = variant("eval", lambda p: _overwrite_item(p, "_extra_state", payload("eval")))
    try:
        load_inference_model(eval_case)
        out["eval_byte_item"] = "loaded"
    except checkpoint.CheckpointError as exc:
        out["eval_byte_item"] = str(exc)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    out["eval_sentinel"] = os.path.exists(sentinel("eval"))

    # Flipped bytes inside a tensor: refused by the checksum, loaded without the check.
    def flip(path):
        from megatron_mile.training import checkpoint

        index = checkpoint.read_dcp_metadata(path)
        info = next(v for k, v in index.storage_data.items() if "word_embeddings" in k.fqn)
        with open(os.path.join(path, info.relative_path), "r+b") as f:
            f.seek(info.offset + info.length // 2)  # inside the tensor data, past the zip header
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x40]))
    flipped = variant("flipped", flip, rewrite=False)
    out["flipped"] = _main("training.train_iters=3", f"checkpoint.load={flipped}")
    out["flipped_unverified"] = _main("training.train_iters=3", f"checkpoint.load={flipped}",
                                      "checkpoint.verify_checksums=false")
    return out


@pytest.fixture(scope="module")
def crafted(one_process_runs):
    return _group(one_process_runs, "crafted")


@pytest.mark.parametrize("case, needle", [
    ("metadata", "refers to posix.system, which torch.distributed.checkpoint never writes"),
    ("byte_item", "posix.system"),
    ("rng_entry", "posix.system"),
    ("common", "common.pt is missing or corrupt"),
])
def test_crafted_checkpoint_is_refused_without_running_code(crafted, case, needle):
    assert crafted["good"][0] == 0
    code, stderr = crafted[case]
    line = _one_line(stderr)
    assert code == 2 and needle in line, line
    assert "iter_0000002" in line and "CheckpointError" in line
    assert "a crafted file could run code" in line or case == "common", line
    assert not crafted[f"{case}_sentinel"], f"{case}: the payload ran"


def test_evaluation_loader_refuses_a_crafted_checkpoint(crafted):
    assert "posix.system" in crafted["eval_byte_item"]
    assert "a crafted file could run code" in crafted["eval_byte_item"]
    assert not crafted["eval_sentinel"]


def test_flipped_bytes_fail_the_checksum(crafted):
    code, stderr = crafted["flipped"]
    line = _one_line(stderr)
    assert code == 2 and "does not match its sha256 checksum" in line, line
    assert ".distcp" in line and "checkpoint.verify_checksums=false" in line
    # The same file loads without the check: the checksum is what catches it.
    assert crafted["flipped_unverified"] == (0, "")


# --------------------------------------------------------------------------- bad values, schedule


def _bad_inputs(rank: int, world_size: int, root: str) -> dict:
    from megatron_mile.config import load_config
    from megatron_mile.training.trainer import Trainer

    out = {
        "lr_nan": _main("optimizer.lr=.nan"),
        "lr_inf": _main("optimizer.lr=.inf"),
        "seed": _main("training.seed=-1"),
        "model_vocab": _main("model.vocab_size=100"),
    }
    # A truncated dataset: one line naming the file, before any training.
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(root, "corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in range(40):
        builder.add_document(np.arange(doc, doc + 100) % 500, [100])
    builder.finalize(prefix + ".idx")
    os.truncate(prefix + ".bin", os.path.getsize(prefix + ".bin") - 10)
    out["truncated_data"] = _main("data.mock=false", f"data.data_path=[{prefix}]")

    tracker_dir = os.path.join(root, "tracker")
    os.makedirs(tracker_dir)
    with open(os.path.join(tracker_dir, "latest_checkpointed_iteration.txt"), "wb") as f:
        f.write(b"\xff\xfe4\n")
    out["tracker"] = _main(f"checkpoint.save={tracker_dir}")

    # A schedule changed on resume: an error naming each field, or one of the two settings.
    save = os.path.join(root, "schedule")
    base = TINY[2:] + ["optimizer.lr_decay_iters=null", f"checkpoint.save={save}",
                       "checkpoint.save_interval=2"]

    def lrs(*overrides):
        trainer = Trainer(load_config("tiny", base + list(overrides)))
        trainer.setup()
        try:
            return [h["lr"] for h in trainer.train()["history"]]
        finally:
            trainer.shutdown()

    straight = lrs("training.train_iters=4", f"checkpoint.save={save}_straight")
    lrs("training.train_iters=2")
    from megatron_mile.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--config", "tiny", *base, "training.train_iters=4"])
    out["schedule"] = (code, err.getvalue())
    out["schedule_lrs"] = {
        "straight": straight,
        "override": lrs("training.train_iters=4", "checkpoint.override_opt_param_scheduler=true",
                        f"checkpoint.load={save}", f"checkpoint.save={save}_override"),
        "checkpoint": lrs("training.train_iters=4",
                          "checkpoint.use_checkpoint_opt_param_scheduler=true",
                          f"checkpoint.load={save}", f"checkpoint.save={save}_kept"),
        "min_lr": load_config("tiny").optimizer.min_lr,
    }
    return out


@pytest.fixture(scope="module")
def bad(one_process_runs):
    return _group(one_process_runs, "bad")


@pytest.mark.parametrize("case, needle", [
    ("lr_nan", "optimizer.lr=nan must be a finite number"),
    ("lr_inf", "optimizer.lr=inf must be a finite number"),
    ("seed", "training.seed=-1 must be in [0, 2**32)"),
    ("model_vocab", "model.vocab_size=100 is smaller than the tokenizer's vocabulary (512"),
    ("tracker", "latest_checkpointed_iteration.txt is corrupt (not UTF-8 text)"),
    ("truncated_data", "corpus.bin has 7990 bytes but"),
])
def test_bad_values_are_one_line_and_exit_2(bad, case, needle):
    code, stderr = bad[case]
    line = _one_line(stderr)
    assert code == 2 and needle in line, line


def test_changed_schedule_on_resume_is_an_error_naming_the_fields(bad):
    code, stderr = bad["schedule"]
    line = _one_line(stderr)
    assert code == 2, line
    assert "optimizer.lr_warmup_iters (checkpoint 1, config 2)" in line, line
    assert "optimizer.lr_decay_iters (default: training.train_iters) (checkpoint 2, config 4)" \
        in line, line
    assert "checkpoint.override_opt_param_scheduler=true" in line
    assert "checkpoint.use_checkpoint_opt_param_scheduler=true" in line


def test_schedule_override_and_keep(bad):
    lrs = bad["schedule_lrs"]
    # Override: steps 3-4 follow the config's 4-step schedule, as a straight 4-step run.
    assert lrs["override"] == lrs["straight"][2:]
    # Keep: the checkpoint's 2-step schedule has ended, so the lr stays at min_lr.
    assert lrs["checkpoint"] == [lrs["min_lr"]] * 2
    assert lrs["straight"][2] != lrs["min_lr"]


# --------------------------------------------------------------------------- hung peers


def test_a_stopped_peer_ends_the_other_rank_within_the_timeout(tmp_path):
    procs = _launch(tmp_path, "hang", ["parallel.distributed_timeout_minutes=0.1"])  # 6 s
    try:
        _wait_for_training(tmp_path, "hang", procs)
        os.kill(procs[0].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[1].wait(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        _kill(procs)
    line = _one_line((tmp_path / "hang1.err").read_text())
    assert code == 3, line
    assert waited < 6 + 15, waited
    assert "rank 1: no progress for" in line and "in iteration" in line, line
    assert "parallel.distributed_timeout_minutes=0.1" in line


def test_a_killed_peer_ends_the_other_rank_with_one_line(tmp_path):
    procs = _launch(tmp_path, "kill", [])
    try:
        _wait_for_training(tmp_path, "kill", procs)
        procs[0].kill()  # SIGKILL: no chance to say anything
        code = procs[1].wait(timeout=60)
    finally:
        _kill(procs)
    line = _one_line((tmp_path / "kill1.err").read_text())
    assert code == 3, line
    assert "rank 1: a collective failed in iteration" in line, line
    assert "a peer rank died or hung" in line


def test_second_sigterm_exits_at_once_inside_a_blocked_collective(tmp_path):
    procs = _launch(tmp_path, "term", [])  # the default 10-minute bound
    try:
        _wait_for_training(tmp_path, "term", procs)
        os.kill(procs[0].pid, signal.SIGSTOP)
        time.sleep(2)  # rank 1 is now blocked in a collective with the stopped rank 0
        os.kill(procs[1].pid, signal.SIGTERM)
        time.sleep(0.5)
        sent = time.monotonic()
        os.kill(procs[1].pid, signal.SIGTERM)
        code = procs[1].wait(timeout=30)
        waited = time.monotonic() - sent
    finally:
        _kill(procs)
    line = _one_line((tmp_path / "term1.err").read_text())
    assert code == 128 + signal.SIGTERM, line
    assert waited < 5, waited
    assert "second SIGTERM during iteration" in line, line
