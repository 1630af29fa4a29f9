"""Faults of long runs at scale, injected for real: phases that are slow but working (a
checkpoint saved to and loaded from a filesystem slowed the way a loaded parallel filesystem is,
a long evaluation) must finish, while a truly stopped peer is still caught within
``parallel.distributed_timeout_minutes``.

The slow filesystem is a FUSE passthrough throttled to a fixed bandwidth with a latency on each
metadata operation (``megatron_mile.testing.slow_fs``); the ranks are real processes
(``fault_runs.launch``).
"""

from __future__ import annotations

import math
import os
import re
import signal
import time

import pytest

from fault_runs import kill, launch, one_line, wait_all, wait_for_files, wait_for_line
from megatron_mile.testing import slow_fs

pytestmark = pytest.mark.slow

TIMEOUT_S = 6.0
TIMEOUT = [f"parallel.distributed_timeout_minutes={TIMEOUT_S / 60:g}"]
BIGGER = ["model.hidden_size=192", "model.ffn_hidden_size=512"]
"""A 1.1M-parameter model: a 13 MB checkpoint with its optimizer state (two 6.6 MB files)."""
BANDWIDTH = 0.75e6
"""Bytes/s of the slow filesystem for rank 0's data file (``__0_*``: a loaded storage target;
the other files go at full speed): rank 0 writes it in about 1.5x TIMEOUT_S while rank 1 is
done at once and must wait for it, and hashing it takes as long again; so do the resume's
verification and read."""


@pytest.fixture(scope="module")
def slow_mount(tmp_path_factory):
    reason = slow_fs.available()
    if reason:
        pytest.skip(f"no slow filesystem: {reason}")
    root = tmp_path_factory.mktemp("slowfs")
    with slow_fs.SlowFilesystem(str(root / "data"), str(root / "mnt"), bandwidth=BANDWIDTH,
                                latency=0.02, slow_files="__0_*"):
        yield root


def _seconds(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, (pattern, text[-3000:])
    return float(found.group(1))


def test_slow_save_and_evaluation_finish(slow_mount, tmp_path):
    """A save and an evaluation that each take several times the timeout. (A resume that
    does, its read and checksum verification on the slow target, is the restart of
    test_a_background_save_killed_mid_write_and_one_slower_than_the_timeout.)"""
    from megatron_mile.training import checkpoint

    save = str(slow_mount / "mnt" / "run")
    procs = launch(tmp_path, "save", [*TIMEOUT, *BIGGER, "training.train_iters=2",
                                      f"checkpoint.save={save}", "training.eval_interval=2",
                                      "training.eval_iters=300"])
    codes = wait_all(procs)
    log = (tmp_path / "save1.out").read_text()
    assert codes == [0, 0], (tmp_path / "save0.err").read_text() + log
    assert checkpoint.find(save) == 2
    save_s = _seconds(r"saved checkpoint at iteration 2 to \S+ in ([\d.]+) s", log)
    eval_s = _seconds(r"validation at iteration 2 \|.*\| ([\d.]+) s", log)
    print(f"save {save_s:.1f} s, evaluation {eval_s:.1f} s, timeout {TIMEOUT_S:g} s")
    assert save_s > 2.5 * TIMEOUT_S, save_s
    assert eval_s > TIMEOUT_S, eval_s


def test_a_peer_stopped_during_a_slow_save_is_caught_within_the_timeout(slow_mount, tmp_path):
    """SIGSTOP the straggler (rank 0, writing to the slow target) mid-save: rank 1, done with
    its files and waiting for it, exits 3 within the timeout; nothing is published."""
    from megatron_mile.training import checkpoint

    save = slow_mount / "mnt" / "stopped"
    procs = launch(tmp_path, "stop", [*TIMEOUT, *BIGGER, "training.train_iters=2",
                                      f"checkpoint.save={save}"])
    try:
        wait_for_line(tmp_path, "stop", procs, "iteration 2/2")
        # rank 0 writes its data file to the slow target: stop it a second into that
        wait_for_files(slow_mount / "data" / "stopped" / "iter_0000002.tmp", ["__0_0.distcp"],
                       procs)
        time.sleep(1)
        os.kill(procs[0].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[1].wait(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        kill(procs)
    line = one_line((tmp_path / "stop1.err").read_text())
    print(f"rank 1 ended {waited:.1f} s after its peer stopped: {line}")
    assert code == 3, line
    assert "in iteration 2 (checkpoint save: waiting for 1 of 2 ranks" in line, line
    assert waited < TIMEOUT_S + 10, waited
    assert checkpoint.find(str(save)) is None


# --------------------------------------------------------------------------- non-finite updates


def _non_finite(rank: int, world_size: int, root: str) -> dict:
    import contextlib
    import io

    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core.utils import unwrap_model

    from megatron_mile.config import load_config
    from megatron_mile.train import main
    from megatron_mile.training import checkpoint
    from megatron_mile.training.trainer import NonFiniteLossError, Trainer
    from fault_runs import TINY

    def cli(*overrides):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([*TINY, *overrides])
        return code, err.getvalue()

    def checkpoint_finite(save):
        """Whether every tensor of the published checkpoint is finite (read back for real)."""
        path = checkpoint.checkpoint_path(save, checkpoint.find(save))
        index = checkpoint.read_dcp_metadata(path)
        state = {}
        for key, meta in index.state_dict_metadata.items():
            if hasattr(meta, "size"):
                state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
        return all(bool(torch.isfinite(t).all()) for t in state.values()), len(state)

    out: dict = {}
    # A learning rate that blows the weights up: finite losses, then a non-finite grad norm.
    save = os.path.join(root, "lr100")
    out["lr100"] = cli("optimizer.lr=100", "optimizer.lr_warmup_iters=0",
                       "training.train_iters=20", f"checkpoint.save={save}",
                       "checkpoint.save_interval=1")
    out["lr100_latest"] = checkpoint.find(save)
    out["lr100_finite"] = checkpoint_finite(save)
    skip = os.path.join(root, "lr100_skip")
    out["lr100_skip"] = cli("optimizer.lr=100", "optimizer.lr_warmup_iters=0",
                            "training.train_iters=20", f"checkpoint.save={skip}",
                            "checkpoint.save_interval=1", "training.on_non_finite=skip",
                            "training.max_consecutive_skips=2")

    def run(overrides, poison):
        """A run whose forward pass makes NaN activations in the iterations ``poison``
        names (a real NaN through the model: every gradient becomes NaN)."""
        trainer = Trainer(load_config("tiny", TINY[2:] + overrides))
        trainer.setup()

        def hook(module, args, output):
            if trainer.iteration + 1 in poison and module.training:
                return output * float("nan")
        unwrap_model(trainer.model[0]).embedding.register_forward_hook(hook)
        try:
            summary = trainer.train()
            return {"history": summary["history"], "skipped": trainer.skipped_iterations,
                    "finite": all(bool(torch.isfinite(p).all())
                                  for p in trainer.model[0].parameters())}
        except NonFiniteLossError as exc:
            return {"error": str(exc), "iteration": trainer.iteration}
        finally:
            trainer.shutdown()

    out["transient_skip"] = run(["training.train_iters=6", "training.on_non_finite=skip"], {3})
    out["transient_stop"] = run(["training.train_iters=6", f"checkpoint.save={root}/stop",
                                 "checkpoint.save_interval=2"], {3})
    out["transient_stop_latest"] = checkpoint.find(f"{root}/stop")

    # Parameters poisoned behind the optimizer's back: the save refuses them.
    poisoned = os.path.join(root, "poisoned")
    trainer = Trainer(load_config("tiny", TINY[2:] + [
        "training.train_iters=4", f"checkpoint.save={poisoned}", "checkpoint.save_interval=2"]),
        step_callbacks=[lambda tr, m: tr.iteration == 4 and next(
            tr.model[0].parameters()).data.fill_(float("nan"))])
    trainer.setup()
    try:
        trainer.train()
        out["poisoned"] = "saved"
    except NonFiniteLossError as exc:
        out["poisoned"] = str(exc)
    finally:
        trainer.shutdown()
    out["poisoned_dir"] = (checkpoint.find(poisoned),
                           sorted(os.listdir(poisoned)))
    return out


@pytest.fixture(scope="module")
def non_finite(tmp_path_factory):
    from megatron_mile.testing import run_distributed

    return run_distributed(_non_finite, 1, args=(str(tmp_path_factory.mktemp("nan")),),
                           timeout_s=400)[0]


def test_a_non_finite_grad_norm_stops_before_the_update_and_the_save(non_finite):
    code, stderr = non_finite["lr100"]
    line = one_line(stderr)
    assert code == 1, line
    found = re.search(r"non-finite loss or gradient at iteration (\d+) \(lm_loss ([^,]+), "
                      r"objective [^,]+, grad norm (\S+)\): the update was not applied", line)
    assert found, line
    assert "training.on_non_finite=stop" in line and "last published checkpoint is intact" in line
    stopped = int(found.group(1))
    # The loss of that iteration was finite: only the gradient norm caught it.
    assert float(found.group(2)) == float(found.group(2)) and found.group(3) in ("nan", "inf")
    # Saved every iteration: the published checkpoint is the one before, and all finite.
    assert non_finite["lr100_latest"] == stopped - 1
    finite, count = non_finite["lr100_finite"]
    assert finite and count > 10


def test_skip_policy_counts_skips_and_stops_after_too_many_in_a_row(non_finite):
    code, stderr = non_finite["lr100_skip"]
    line = one_line(stderr)
    assert code == 1 and "(3 in a row, training.max_consecutive_skips=2)" in line, line


def test_a_transient_nan_is_skipped_or_stops_with_the_last_checkpoint_intact(non_finite):
    skip = non_finite["transient_skip"]
    assert skip["skipped"] == 1 and skip["finite"], skip
    third = skip["history"][2]
    assert third["skipped"] == 1.0 and not math.isfinite(third["grad_norm"]), third
    assert all(h["skipped"] == 0.0 and math.isfinite(h["grad_norm"])
               for i, h in enumerate(skip["history"]) if i != 2)
    assert len(skip["history"]) == 6  # trained to the end
    stop = non_finite["transient_stop"]
    assert stop["iteration"] == 3 and "at iteration 3" in stop["error"], stop
    assert non_finite["transient_stop_latest"] == 2


def test_non_finite_parameters_are_never_saved(non_finite):
    assert "refusing to save iteration 4: the parameters hold NaN/inf" in non_finite["poisoned"]
    latest, names = non_finite["poisoned_dir"]
    assert latest == 2 and names == ["iter_0000002", "latest_checkpointed_iteration.txt"], names


# --------------------------------------------------------------------------- one run per directory


def test_a_second_run_on_the_same_directory_is_refused_and_a_dead_ones_lock_taken_over(
        tmp_path):
    from megatron_mile.training import checkpoint

    save = tmp_path / "run"
    common = [f"checkpoint.save={save}", "checkpoint.save_interval=2"]
    first = launch(tmp_path, "first", common, world_size=1, tp=1)
    try:
        wait_for_line(tmp_path, "first", first, "saved checkpoint at iteration 2")
        second = launch(tmp_path, "second", common, world_size=1, tp=1)
        code = wait_all(second, timeout_s=120)[0]
        line = one_line((tmp_path / "second0.err").read_text())
        assert code == 2, line
        assert f"pid {first[0].pid}" in line and "is in use by another run" in line, line
        assert first[0].poll() is None  # the holder trains on, untouched
    finally:
        kill(first)  # SIGKILL: its lock stays behind, naming a process that is gone
    latest = checkpoint.find(str(save))
    third = launch(tmp_path, "third", [*common, f"training.train_iters={latest + 2}"],
                   world_size=1, tp=1)
    assert wait_all(third)[0] == 0, (tmp_path / "third0.err").read_text()
    log = (tmp_path / "third0.out").read_text()
    assert f"its process {first[0].pid} no longer exists" in log, log
    assert f"resumed from checkpoint at iteration {latest}" in log
    assert checkpoint.find(str(save)) == latest + 2
    assert not (save / "mile.lock").exists()  # released at the end


def test_a_file_removed_during_the_save_is_never_published(slow_mount, tmp_path):
    """Another process removes rank 1's finished data file while rank 0 still writes its own:
    the manifest comes from the checkpoint's index, so the save fails and publishes nothing."""
    from megatron_mile.training import checkpoint

    save = slow_mount / "mnt" / "removed"
    tmp_dir = slow_mount / "data" / "removed" / "iter_0000002.tmp"
    procs = launch(tmp_path, "rm", [*TIMEOUT, *BIGGER, "training.train_iters=2",
                                    f"checkpoint.save={save}"])
    try:
        wait_for_line(tmp_path, "rm", procs, "iteration 2/2")
        wait_for_files(tmp_dir, ["__0_0.distcp", "__1_0.distcp"], procs)
        time.sleep(0.5)
        os.remove(tmp_dir / "__1_0.distcp")
        codes = wait_all(procs)
    finally:
        kill(procs)
    for rank in (0, 1):
        line = one_line((tmp_path / f"rm{rank}.err").read_text())
        assert codes[rank] == 1, line
        assert "is missing __1_0.distcp, named by its index" in line, line
        assert "it is not published" in line and "(none) is untouched" in line, line
    assert checkpoint.find(str(save)) is None
    assert sorted(os.listdir(slow_mount / "data" / "removed")) == ["mile.lock"] or \
        sorted(os.listdir(slow_mount / "data" / "removed")) == []


# --------------------------------------------------------------------------- what a resume checks


def _resume_checks(rank: int, world_size: int, root: str, bpe: str, unigram: str) -> dict:
    import contextlib
    import io
    import logging

    import torch
    from megatron.core.utils import unwrap_model

    from fault_runs import TINY
    from megatron_mile.config import load_config
    from megatron_mile.train import main
    from megatron_mile.training.trainer import Trainer

    def cli(*overrides):
        """(exit code, stderr, the log) of one in-process CLI run."""
        err, out = io.StringIO(), io.StringIO()
        handler = logging.StreamHandler(out)
        logging.getLogger().addHandler(handler)
        try:
            with contextlib.redirect_stderr(err):
                code = main([*TINY, *overrides])
        finally:
            logging.getLogger().removeHandler(handler)
        return code, err.getvalue(), out.getvalue()

    res: dict = {}
    null = os.path.join(root, "null512")
    res["first"] = cli("training.train_iters=2", f"checkpoint.save={null}")
    res["bigger"] = cli("training.train_iters=3", f"checkpoint.save={null}",
                        "data.vocab_size=1000")
    res["bigger_with_optimizer"] = cli("training.train_iters=3", f"checkpoint.save={null}",
                                       "data.vocab_size=1000", "checkpoint.allow_vocab_change=true")
    # A deliberate extension: the common rows come from the checkpoint, the new ones are zero.
    saved = Trainer(load_config("tiny", TINY[2:] + ["training.train_iters=2",
                                                     f"checkpoint.load={null}"]))
    saved.setup()
    old_rows = unwrap_model(saved.model[0]).embedding.word_embeddings.weight.detach().clone()
    saved.shutdown()
    extended = Trainer(load_config("tiny", TINY[2:] + [
        "training.train_iters=3", f"checkpoint.load={null}", f"checkpoint.save={root}/ext",
        "data.vocab_size=1000", "checkpoint.allow_vocab_change=true",
        "checkpoint.load_optimizer=false"]))
    extended.setup()
    rows = unwrap_model(extended.model[0]).embedding.word_embeddings.weight.detach().clone()
    summary = extended.train()
    extended.shutdown()
    res["extension"] = {"old_equal": bool(torch.equal(rows[:512], old_rows)),
                        "new_zero": bool((rows[512:] == 0).all()), "rows": rows.shape[0],
                        "iterations": summary["iteration"]}

    # Two tokenizers of the same size (300), other pieces: BPE vs unigram.
    sp = os.path.join(root, "bpe")
    res["bpe_first"] = cli("training.train_iters=2", f"checkpoint.save={sp}",
                           f"data.tokenizer_model={bpe}", "data.vocab_size=null")
    res["unigram"] = cli("training.train_iters=3", f"checkpoint.save={sp}",
                         f"data.tokenizer_model={unigram}", "data.vocab_size=null")
    res["unigram_allowed"] = cli("training.train_iters=3", f"checkpoint.save={sp}",
                                 f"data.tokenizer_model={unigram}", "data.vocab_size=null",
                                 "checkpoint.allow_vocab_change=true")
    # A changed sequence length and batch size: allowed, said in one line.
    res["geometry"] = cli("training.train_iters=4", f"checkpoint.save={null}",
                          "model.seq_length=32", "training.global_batch_size=16")
    return res


@pytest.fixture(scope="module")
def resume_checks(tmp_path_factory):
    from data_fixtures import train_small_tokenizer
    from megatron_mile.testing import run_distributed

    root = tmp_path_factory.mktemp("resume")
    (root / "a").mkdir()
    (root / "b").mkdir()
    bpe = train_small_tokenizer(root / "a", vocab_size=300)
    unigram = train_small_tokenizer(root / "b", vocab_size=300, model_type="unigram")
    return run_distributed(_resume_checks, 1, args=(str(root), bpe, unigram),
                           timeout_s=400)[0]


def test_a_changed_vocabulary_is_refused_naming_both(resume_checks):
    assert resume_checks["first"][0] == 0
    code, stderr, _ = resume_checks["bigger"]
    line = one_line(stderr)
    assert code == 2, line
    assert "the vocabulary differs from the checkpoint's (checkpoint: 512 tokens, null " \
           "tokenizer (512 ids)" in line, line
    assert "this run: 1000 tokens, null tokenizer (1000 ids)" in line, line
    assert "checkpoint.allow_vocab_change=true" in line
    code, stderr, _ = resume_checks["bigger_with_optimizer"]
    line = one_line(stderr)
    assert code == 2 and "set checkpoint.load_optimizer=false too" in line, line


def test_a_tokenizer_of_the_same_size_with_other_pieces_is_refused(resume_checks):
    assert resume_checks["bpe_first"][0] == 0
    code, stderr, _ = resume_checks["unigram"]
    line = one_line(stderr)
    assert code == 2, line
    found = re.search(r"checkpoint: 300 tokens, \S+tok\.model, digest (\w+); this run: 300 "
                      r"tokens, \S+tok\.model, digest (\w+)\)", line)
    assert found and found.group(1) != found.group(2), line
    code, stderr, stdout = resume_checks["unigram_allowed"]
    assert code == 0, stderr
    assert "vocabulary changed on purpose (checkpoint.allow_vocab_change)" in stdout


def test_a_deliberate_vocabulary_extension_keeps_the_common_rows(resume_checks):
    ext = resume_checks["extension"]
    assert ext == {"old_equal": True, "new_zero": True, "rows": 1024, "iterations": 3}, ext


def test_a_changed_batch_geometry_resumes_and_says_so(resume_checks):
    code, stderr, stdout = resume_checks["geometry"]
    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if "changed batch geometry" in line]
    assert len(lines) == 1, stdout
    assert "model.seq_length 64 -> 32, training.global_batch_size 8 -> 16" in lines[0]
    assert "continues at sample 16 of the sample order built for the new geometry" in lines[0]


# --------------------------------------------------------------------------- signals and kills


def _log_ints(pattern: str, text: str) -> list[int]:
    return [int(x) for x in re.findall(pattern, text)]


def _wait_for_save(data_dir, iteration: int, procs, timeout_s: float = 120) -> None:
    """Until both ranks' data files of ``iteration``'s save exist in its ``.tmp`` (mid-save:
    rank 0's is still being written to the slow target)."""
    wait_for_files(data_dir / f"iter_{iteration:07d}.tmp", ["__0_0.distcp", "__1_0.distcp"],
                   procs, timeout_s)


@pytest.fixture(scope="module")
def interrupted_runs(slow_mount, tmp_path_factory) -> dict:
    """One run directory on the slow filesystem, interrupted three ways in turn (4 launches,
    each resuming from what the one before published):

    1. SIGUSR1 twice during the save of iteration 2: saves 2 and 3, exit 0.
    2. SIGTERM twice during the save of iteration 4: exit 143 at once, 4 never published.
    3. Resumed from 3; SIGKILL of rank 0 during the evaluation of iteration 4.
    4. Resumed from 3 again, trains to 6 and cleans the partial save of step 2."""
    from megatron_mile.training import checkpoint

    tmp = tmp_path_factory.mktemp("interrupted")
    save, data = slow_mount / "mnt" / "signals", slow_mount / "data" / "signals"
    run = ["training.train_iters=6", f"checkpoint.save={save}", "checkpoint.save_interval=2"]
    out: dict = {"tmp": tmp, "data": data}

    def latest() -> int | None:
        return checkpoint.find(str(save))

    procs = launch(tmp, "usr1", run)
    try:
        _wait_for_save(data, 2, procs)
        for _ in range(2):
            for p in procs:
                os.kill(p.pid, signal.SIGUSR1)
            time.sleep(0.2)
        out["usr1"] = (wait_all(procs), latest())
    finally:
        kill(procs)

    procs = launch(tmp, "term", run)
    try:
        _wait_for_save(data, 4, procs)
        for _ in range(2):
            for p in procs:
                os.kill(p.pid, signal.SIGTERM)
            time.sleep(0.2)
        out["term"] = (wait_all(procs, timeout_s=30), latest(),
                       (data / "iter_0000004.tmp").is_dir())  # what the kill left
    finally:
        kill(procs)

    evaluating = [*run, "training.eval_interval=2", "training.eval_iters=400"]
    procs = launch(tmp, "eval", evaluating)
    try:
        wait_for_line(tmp, "eval", procs, "iteration 4/6")
        time.sleep(0.5)
        procs[0].kill()
        out["eval"] = procs[1].wait(timeout=60)
    finally:
        kill(procs)

    out["again"] = (wait_all(launch(tmp, "again", run)), latest(),
                    [n for n in os.listdir(data) if n.endswith(".tmp")])
    return out


def test_signals_during_a_save(interrupted_runs):
    """SIGUSR1 twice mid-save: one stop request (the save finishes, one more iteration, a stop
    save, exit 0). SIGTERM twice mid-save: exit at once (143), nothing published, and the next
    start resumes from the last published checkpoint and cleans the partial save."""
    tmp = interrupted_runs["tmp"]
    codes, latest = interrupted_runs["usr1"]
    log = (tmp / "usr11.out").read_text()
    assert codes == [0, 0], (tmp / "usr10.err").read_text() + log
    assert _log_ints(r"saved checkpoint at iteration (\d+)", log) == [2, 3], log
    assert "exiting on signal" in log and latest == 3

    codes, latest, tmp_left = interrupted_runs["term"]
    assert codes == [128 + signal.SIGTERM] * 2, codes
    for rank in (0, 1):
        line = one_line((tmp / f"term{rank}.err").read_text())
        assert "second SIGTERM during iteration 4 (checkpoint save" in line, line
    assert latest == 3 and tmp_left

    codes, latest, tmp_dirs = interrupted_runs["again"]
    log = (tmp / "again1.out").read_text()
    assert codes == [0, 0], (tmp / "again0.err").read_text() + log
    assert "resumed from checkpoint at iteration 3" in log
    assert latest == 6 and not tmp_dirs, tmp_dirs


def test_a_rank_killed_during_evaluation(interrupted_runs):
    """SIGKILL one rank mid-evaluation: the other ends with one line naming the phase, exit
    3; the restart resumes from the last checkpoint."""
    tmp = interrupted_runs["tmp"]
    line = one_line((tmp / "eval1.err").read_text())
    assert interrupted_runs["eval"] == 3, line
    assert "rank 1: a collective failed in iteration 4 (evaluation)" in line, line
    log = (tmp / "eval1.out").read_text()
    assert "resumed from checkpoint at iteration 3" in log, log
    assert "validation at iteration 4" not in log
    # Evaluation comes before the save of its iteration: the restart resumes from 3.
    assert "resumed from checkpoint at iteration 3" in (tmp / "again1.out").read_text()


# --------------------------------------------------------------------------- resharding


def _printed(log: str, key: str) -> dict[int, str]:
    """{iteration: the printed value of ``key``} from a progress log."""
    return {int(i): v for i, v in re.findall(rf"iteration (\d+)/\d+ \|.*?\| {key} (\S+) ", log)}


def test_distributed_optimizer_state_across_layouts(tmp_path):
    """With the distributed optimizer and its state loaded: another DP size resumes exactly;
    another TP size is one line naming what cannot be resharded and the fix. One DP=1, TP=1
    checkpoint serves both (4 launches)."""
    distopt = ["parallel.use_distributed_optimizer=true"]
    # A straight DP=1 run to iteration 4, and a DP=1 run stopped at iteration 2.
    one = [*distopt, "training.train_iters=4"]
    save = tmp_path / "dp1"
    assert wait_all(launch(tmp_path, "straight", one, world_size=1, tp=1))[0] == 0
    assert wait_all(launch(tmp_path, "half", [*distopt, "training.train_iters=2",
                                              f"checkpoint.save={save}"],
                           world_size=1, tp=1))[0] == 0

    # TP 1 -> 2 (world 2): refused before any read.
    procs = launch(tmp_path, "tp2", [*distopt, "training.train_iters=3",
                                     f"checkpoint.save={save}"], tp=2)
    codes = wait_all(procs)
    line = one_line((tmp_path / "tp20.err").read_text())
    assert codes == [2, 2], line
    assert "the distributed optimizer state (dp_reshardable) reshards across data-parallel " \
           "sizes only, and this run changes TP 1 -> 2: resume at TP 1, PP 1" in line, line
    assert "checkpoint.load_optimizer=false" in line

    # DP=1 -> DP=2 with the optimizer state: iterations 3-4 as in the straight DP=1 run.
    procs = launch(tmp_path, "dp2", [*one, f"checkpoint.save={save}"], tp=1)
    assert wait_all(procs) == [0, 0], (tmp_path / "dp20.err").read_text()
    straight = (tmp_path / "straight0.out").read_text()
    resumed = (tmp_path / "dp21.out").read_text()
    assert "resumed from checkpoint at iteration 2" in resumed
    for key in ("lm_loss", "objective", "grad norm"):
        expected, got = _printed(straight, key), _printed(resumed, key)
        assert [got[i] for i in (3, 4)] == [expected[i] for i in (3, 4)], (key, got, expected)


def test_a_dataset_build_longer_than_the_timeout_is_one_line(tmp_path):
    """Global rank 0 scans and indexes the corpus while the others wait: a corpus on a slow
    filesystem that takes longer than the timeout ends every rank with one line naming the
    phase and the fix, exit 3 (it was a traceback)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    reason = slow_fs.available()
    if reason:
        pytest.skip(f"no slow filesystem: {reason}")
    source = tmp_path / "data"
    source.mkdir()
    builder = IndexedDatasetBuilder(str(source / "corpus.bin"), dtype=np.uint16)
    for doc in range(1500):
        builder.add_document(np.arange(doc, doc + 1000) % 500, [1000])
    builder.finalize(str(source / "corpus.idx"))  # 3 MB of tokens: 6 s at 0.5 MB/s
    with slow_fs.SlowFilesystem(str(source), str(tmp_path / "mnt"), bandwidth=0.5e6,
                                slow_files="*.bin"):
        procs = launch(tmp_path, "data", [
            "parallel.distributed_timeout_minutes=0.05", "training.train_iters=2",
            "data.mock=false", f"data.data_path=[{tmp_path / 'mnt' / 'corpus'}]",
            f"data.path_to_cache={tmp_path / 'cache'}"])
        codes = wait_all(procs)
    for rank in (0, 1):
        line = one_line((tmp_path / f"data{rank}.err").read_text())
        assert codes[rank] == 3, line
        assert f"rank {rank}: a collective failed in setup (building the datasets" in line, line
    line = one_line((tmp_path / "data1.err").read_text())
    assert "took longer than parallel.distributed_timeout_minutes to build the dataset " \
           "indices" in line, line


def test_a_background_save_killed_mid_write_and_one_slower_than_the_timeout(slow_mount,
                                                                            tmp_path):
    """checkpoint.async_save on the slow target: the save of iteration 4 waits for the one of
    2 (said in the log); SIGKILL mid-write of 4 leaves 2 the latest; the restart resumes from
    2 (its read and checksum verification on the slow target take several timeouts, with
    progress: no watchdog exit), cleans the partial save and, at the end, waits several
    timeouts for its last background save, then publishes it and exits 0."""
    from megatron_mile.training import checkpoint

    save, data = slow_mount / "mnt" / "async", slow_mount / "data" / "async"
    run = [*TIMEOUT, *BIGGER, f"checkpoint.save={save}", "checkpoint.save_interval=2",
           "checkpoint.async_save=true"]
    procs = launch(tmp_path, "kill", [*run, "training.train_iters=6"])
    try:
        wait_for_line(tmp_path, "kill", procs, "waiting for the checkpoint save of iteration 2 "
                      "to finish before saving iteration 4")
        _wait_for_save(data, 4, procs)
        assert all(p.poll() is None for p in procs)
    finally:
        kill(procs)  # SIGKILL, mid-write of iteration 4
    assert checkpoint.find(str(save)) == 2
    assert (data / "iter_0000004.tmp").is_dir()

    procs = launch(tmp_path, "again", [*run, "training.train_iters=4"])
    codes = wait_all(procs)
    log = (tmp_path / "again1.out").read_text()
    assert codes == [0, 0], (tmp_path / "again0.err").read_text() + log
    load_s = _seconds(r"resumed from checkpoint at iteration 2 \(\S+, ([\d.]+) s\)", log)
    print(f"load (checksums verified) {load_s:.1f} s")
    assert load_s > 2.5 * TIMEOUT_S, load_s
    background_s = _seconds(r"saved checkpoint at iteration 4 to \S+ \(([\d.]+) s in the "
                            r"background\)", log)
    assert background_s > 2.5 * TIMEOUT_S, background_s
    assert checkpoint.find(str(save)) == 4
    assert not [n for n in os.listdir(data) if n.endswith(".tmp")], os.listdir(data)
