"""Metrics sinks, MFU and the profiler, read back from what the product wrote.

One tiny run (shipped ``tiny`` config, mock data, two processes, DP=2, 5 iterations, logged
at 2, 4 and 5, validated at 5) with every sink and the profiler on; each test reads one of its
outputs: the JSON Lines file, TensorBoard events, the offline wandb run (read back with
wandb's own protobufs; skipped where wandb is not installed), the profiler's Chrome traces,
and the console. Plus unit tests of the MFU table, the console line and the config checks.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import math
import os
import struct
import sys

import pytest

from megatron_mile.config import ConfigError, load_config
from megatron_mile.testing import run_distributed
from megatron_mile.throughput import peak_tflops
from megatron_mile.training.sinks import ConsoleSink, TrainRecord, read_jsonl

from trainer_runs import run_trainer

HAVE_WANDB = importlib.util.find_spec("wandb") is not None

STEPS = 5
LOGGED = [2, 4, 5]  # log_interval=2, and the last iteration
PROFILED = [2, 3]  # profile.start_step=2, end_step=4 (exclusive)
MILE_STATS = ("entropy", "weight", "alpha", "weight_min", "weight_max")


def _observed_run(rank: int, world_size: int, tmp: str) -> dict:
    import torch

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("megatron_mile").addHandler(Collect())
    seen: list[dict] = []

    def observe(trainer, metrics):
        # Before the step is logged: is the profiler on, is the loss still on the device?
        seen.append({"iteration": trainer.iteration,
                     "profiling": torch.autograd._profiler_enabled(),
                     "loss_on_device": isinstance(metrics.get("lm_loss"), torch.Tensor),
                     "skipped_so_far": trainer.skipped_iterations})
        if trainer.iteration == 3 and rank == world_size - 1:
            # A NaN objective on one rank, left on the device, on a step that is not logged.
            metrics["objective"] = metrics["objective"] * float("nan")

    overrides = [
        f"training.train_iters={STEPS}", "training.log_interval=2", "training.eval_interval=5",
        "training.eval_iters=1", f"logging.metrics_jsonl={tmp}/metrics.jsonl",
        f"logging.tensorboard_dir={tmp}/tb", "profile.enabled=true", "profile.start_step=2",
        "profile.end_step=4", "profile.ranks=[0]", f"profile.dir={tmp}/profile",
        "training.on_non_finite=skip"]
    if HAVE_WANDB:
        overrides += ["logging.wandb_project=mile-test", "logging.wandb_mode=offline",
                      f"logging.wandb_dir={tmp}/wandb"]
    summary = run_trainer(overrides, world_size, step_callbacks=[observe])
    return {"history": summary["history"], "seen": seen, "messages": messages}


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("observed"))
    ranks = run_distributed(_observed_run, 2, args=(tmp,), timeout_s=300)
    return {"tmp": tmp, "ranks": ranks}


def _logged(observed) -> list[dict]:
    """The logging rank's (the last) history at the logged iterations."""
    history = observed["ranks"][-1]["history"]
    return [h for h in history if h["iteration"] in LOGGED]


@pytest.mark.slow
def test_jsonl_has_one_record_per_logged_step_with_the_mile_statistics(observed):
    train = read_jsonl(f"{observed['tmp']}/metrics.jsonl")
    # One writer (the logging rank): each logged step once, not once per rank.
    assert [r["iteration"] for r in train] == LOGGED
    for record, expected in zip(train, _logged(observed)):
        for key in ("lm_loss", "objective", "grad_norm", "lr") + MILE_STATS:
            assert record[key] == expected[key], (key, record, expected)
        assert record["weight_min"] <= record["weight"] <= record["weight_max"]
        assert record["tokens_per_s"] > 0 and record["tflops_per_device"] > 0
        assert "mfu" not in record  # no peak known for a CPU
    valid = read_jsonl(f"{observed['tmp']}/metrics.jsonl", kind="valid")
    assert [r["iteration"] for r in valid] == [STEPS]
    assert valid[0]["lm_loss"] == observed["ranks"][-1]["history"][-1]["valid_lm_loss"]
    assert math.isclose(valid[0]["ppl"], math.exp(valid[0]["lm_loss"]))


@pytest.mark.slow
def test_tensorboard_gets_the_same_scalars(observed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(f"{observed['tmp']}/tb")
    events.Reload()
    train = read_jsonl(f"{observed['tmp']}/metrics.jsonl")
    for key in ("lm_loss", "tokens_per_s") + MILE_STATS:
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == LOGGED, key
        for scalar, record in zip(scalars, train):
            assert math.isclose(scalar.value, record[key], rel_tol=1e-6), (key, scalar)
    assert [s.step for s in events.Scalars("valid/lm_loss")] == [STEPS]


def _wandb_records(path: str) -> list:
    """The protobuf records of a wandb run's transaction log (``run-<id>.wandb``): a
    ``:W&B`` header, then LevelDB-log framing (32 KiB blocks; each chunk a 7-byte header of
    CRC-32C, length and type FULL/FIRST/MIDDLE/LAST), each record a
    ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    block, position, chunks, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        chunks += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install "
                                           "megatron-mile[wandb], or the test extra)")
def test_wandb_offline_run_holds_the_mile_statistics(observed):
    (path,) = glob.glob(f"{observed['tmp']}/wandb/wandb/offline-run-*/run-*.wandb")
    rows: dict[int, dict] = {}
    config = None
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                   for item in record.history.item}
            rows.setdefault(row["_step"], {}).update(row)
        elif record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json)
                      for item in record.run.config.update}
    train = read_jsonl(f"{observed['tmp']}/metrics.jsonl")
    assert sorted(rows) == LOGGED
    for record in train:
        row = rows[record["iteration"]]
        for key in ("lm_loss", "tflops_per_device") + MILE_STATS:
            assert math.isclose(row[f"train/{key}"], record[key], rel_tol=1e-9), (key, row)
    assert "valid/lm_loss" in rows[STEPS]
    assert config["loss"]["type"] == "mile" and config["training"]["train_iters"] == STEPS


@pytest.mark.slow
def test_profiler_traces_the_window_on_the_chosen_rank_only(observed):
    files = sorted(os.listdir(f"{observed['tmp']}/profile"))
    assert len(files) == 1 and files[0].startswith("rank0.") and \
        files[0].endswith(".pt.trace.json"), files
    with open(f"{observed['tmp']}/profile/{files[0]}") as f:
        trace = json.load(f)
    steps = sorted({e["name"] for e in trace["traceEvents"]
                    if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == [f"ProfilerStep#{i}" for i in PROFILED]
    # The profiler runs in the window on rank 0 and nowhere else: not before, not after, and
    # never on rank 1.
    for rank, result in enumerate(observed["ranks"]):
        profiling = [s["iteration"] for s in result["seen"] if s["profiling"]]
        assert profiling == (PROFILED if rank == 0 else []), (rank, result["seen"])


@pytest.mark.slow
def test_the_loss_report_reaches_the_host_only_when_logged(observed):
    last = observed["ranks"][-1]
    # Every step's callback saw the loss as a device tensor (no host transfer in the step)...
    assert [s["loss_on_device"] for s in last["seen"]] == [True] * STEPS
    # ...and the history holds plain floats for every step after training.
    assert all(isinstance(h["lm_loss"], float) for h in last["history"])
    assert len(last["history"]) == STEPS


@pytest.mark.slow
def test_a_non_finite_loss_left_on_the_device_is_seen_by_every_rank(observed):
    # Iteration 3's NaN objective (last rank only, never moved to the host by the step) is
    # counted as skipped on both ranks (seen from iteration 4 on): the device-side finiteness
    # check rides on the stop flags' all-reduce.
    for result in observed["ranks"]:
        assert [s["skipped_so_far"] for s in result["seen"]] == [0, 0, 0, 1, 1], result["seen"]
    assert any("non-finite loss or gradient at iteration 3 (lm_loss" in m and "objective nan"
               in m for m in observed["ranks"][-1]["messages"])


@pytest.mark.slow
def test_console_names_mfu_unavailable_once_and_logs_the_steps(observed):
    messages = observed["ranks"][-1]["messages"]
    assert sum("MFU n/a (no peak known for cpu" in m for m in messages) == 1
    lines = [m for m in messages if m.startswith("iteration ")]
    assert [int(m.split()[1].split("/")[0]) for m in lines] == LOGGED
    assert all("entropy" in m and "weight range [" in m and "MFU" not in m for m in lines)
    # Rank 0 logs no metrics; it only says where its profiler trace went.
    (line,) = observed["ranks"][0]["messages"]
    assert line.startswith("rank 0: profiler trace of iterations 2..3 written to"), line


def test_peak_table_matches_device_names():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("Tesla T4") is None


def test_console_line_shows_mfu_next_to_tflops(caplog):
    record = TrainRecord(4, 10, 32, {"lm_loss": 2.5, "tflops_per_device": 123.7, "mfu": 0.125,
                                     "entropy": 1.0, "weight_min": 0.5, "weight_max": 2.0},
                         elapsed_s=40.0, eta_s=60.0)
    with caplog.at_level(logging.INFO, logger="megatron_mile"):
        ConsoleSink().write_train(record)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "TFLOP/s/device 123.700 | MFU 12.5% |" in line, line
    assert "entropy 1.000" in line and "weight range [0.500, 2.000]" in line
    assert line.endswith("elapsed 0:00:40 | ETA 0:01:00"), line


@pytest.mark.parametrize("overrides, message", [
    (["profile.start_step=4", "profile.end_step=4"],
     "profile.end_step=4 must be greater than profile.start_step=4"),
    (["profile.ranks=[]"], "profile.ranks=[] must be a non-empty list"),
    (["profile.enabled=true", "profile.ranks=[0, 2]"],
     "profile.ranks=[0, 2] names a rank outside the world of 2 processes"),
    (["logging.wandb_mode=cloud"], "logging.wandb_mode='cloud' must be one of"),
])
def test_bad_profile_and_logging_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny", overrides, world_size=2)


def test_missing_wandb_is_one_line_naming_the_fix(monkeypatch, capsys):
    from megatron_mile import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setenv("RANK", "0")  # keep train.main from describing a world in os.environ
    code = train.main(["--config", "tiny", "logging.wandb_project=mile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "logging.wandb_project='mile' needs the wandb package" in err[0]
    assert "pip install megatron-mile[wandb]" in err[0]
