"""Bad inputs a long run meets before its first step, injected for real; each must end in one
line on stderr naming the value, the file and the fix, and exit 2, never a hang or a
traceback:

- a corpus too small for ``data.split``: a split in use with no document (megatron-core's
  ``GPTDataset._get_num_epochs`` loops forever on it), single and blended, and the splits a
  run does not read (test; validation without evaluation) dropped instead;
- a YAML config whose top level is a list;
- a process-group rendezvous that times out (``WORLD_SIZE=2``, one process started, a tiny
  ``parallel.distributed_timeout_minutes``), on the rank hosting the store and on a client;
- a malformed ``tokenizer.json`` given to the trainer (the preprocessing tool's wording);
- a Hugging Face ``config.json`` that disagrees with its safetensors, for
  ``checkpoint.init_from_hf`` and ``megatron-mile-import-hf``;
- an HF shard index naming a file outside its folder (``..``, absolute, a symbolic link);
- ``megatron-mile-export-hf`` into the checkpoint's folder or a non-empty folder, and with
  ``--overwrite`` over an older sharded export.

The CLIs' ``main`` run in one spawned process (``run_distributed``: megatron-core is imported
once); the unit checks below it run in the test process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback

import numpy as np
import pytest

from megatron_mile.testing import run_distributed

BASE = ["--config", "tiny", "training.train_iters=2", "training.log_interval=1",
        "optimizer.lr_warmup_iters=1"]
EVAL = ["training.eval_interval=2", "training.eval_iters=1"]
NO_EVAL = ["training.eval_interval=0"]
SMALL_DOCS = 12
"""Documents of the small corpus: 969,30,1 gives validation round(11.63)..round(11.99), none."""

BAD_TOKENIZER = '{"version": "1.0", "truncation": null, "model": {"type": "BPE", "vocab": '


def write_corpus(prefix: str, num_documents: int) -> str:
    """A real indexed dataset (megatron-core's writer): documents of 100 ids below 500."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in range(num_documents):
        builder.add_document(np.arange(doc, doc + 100) % 500, [100])
    builder.finalize(prefix + ".idx")
    return prefix


def _run(main, argv: list[str]) -> tuple[int, str]:
    """A CLI's ``main`` in this process: (exit code, what it wrote to stderr), the file
    descriptor included (where C++ code such as c10d's TCPStore logs). An exception that
    escapes ``main`` is what Python would make of it: its traceback and exit code 1."""
    err = io.StringIO()
    with tempfile.TemporaryFile() as native:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except Exception:  # noqa: BLE001 - the traceback is the outcome under test
                    traceback.print_exc()
                    code = 1
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        native.seek(0)
        return code, err.getvalue() + native.read().decode(errors="replace")


def _train(*overrides: str) -> tuple[int, str]:
    from megatron_mile.train import main

    return _run(main, [*BASE, *overrides])


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _fresh_world() -> None:
    """Leave the harness's process group: the CLIs below join (and leave) their own world of
    one through env://, as under torchrun."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())


def _hf_folder(root: str, name: str, edit: dict | None = None) -> str:
    """A real tiny LlamaForCausalLM folder (tests/hf_fixtures.py), config.json edited."""
    from hf_fixtures import make_hf_model

    folder = os.path.join(root, name)
    make_hf_model(folder, "tied", sharded=name.startswith("sharded"))
    if edit:
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        config.update(edit)
        with open(path, "w") as f:
            json.dump(config, f)
    return folder


def _inputs(rank: int, world_size: int, root: str) -> dict:
    out: dict = {}
    # ---- 4. a small corpus, single and blended
    small = write_corpus(os.path.join(root, "small"), SMALL_DOCS)
    big = write_corpus(os.path.join(root, "big"), 400)
    data = ["data.mock=false", f"data.data_path=[{small}]"]
    out["small_eval"] = _train(*data, *EVAL)
    out["small_no_eval"] = _train(*data, *NO_EVAL)
    out["blend_eval"] = _train("data.mock=false", f"data.data_path=[0.5,{big},0.5,{small}]",
                               *EVAL)
    out["blend_no_eval"] = _train("data.mock=false", f"data.data_path=[0.5,{big},0.5,{small}]",
                                  *NO_EVAL)
    caches = [os.path.join(prefix, "cache", "GPTDataset_indices") for prefix in (small, big)]
    out["cache"] = sorted(name for c in caches if os.path.isdir(c) for name in os.listdir(c))

    # ---- 6a. a YAML list
    listed = os.path.join(root, "listed.yaml")
    with open(listed, "w") as f:
        f.write("- model:\n    num_layers: 2\n- training:\n    train_iters: 2\n")
    from megatron_mile.train import main as train

    out["yaml_list"] = _run(train, ["--config", listed])

    # ---- 6c. a malformed tokenizer.json: the trainer says what preprocessing says
    tok_dir = os.path.join(root, "tok")
    os.makedirs(tok_dir)
    bad_tokenizer = os.path.join(tok_dir, "tokenizer.json")
    with open(bad_tokenizer, "w") as f:
        f.write(BAD_TOKENIZER)
    out["tokenizer_train"] = _train(*NO_EVAL, "data.vocab_size=null",
                                    f"data.tokenizer_model={bad_tokenizer}")
    from megatron_mile.cli.preprocess import main as preprocess

    corpus = os.path.join(root, "corpus.jsonl")
    with open(corpus, "w") as f:
        f.write('{"text": "hello"}\n')
    handler = signal.getsignal(signal.SIGTERM)
    try:
        out["tokenizer_preprocess"] = _run(preprocess, [
            "--input", corpus, "--output-prefix", os.path.join(root, "pre"),
            "--tokenizer-model", bad_tokenizer, "--quiet"])
    finally:
        signal.signal(signal.SIGTERM, handler)

    # ---- 6d. config.json disagrees with the safetensors; 7. an index leaving the folder
    hf = ["data.vocab_size=1000", "model.seq_length=16", *NO_EVAL]
    kv = _hf_folder(root, "kv_heads", {"num_key_value_heads": 2})
    out["hf_train"] = _train(*hf, f"checkpoint.init_from_hf={kv}")
    escaping = _hf_folder(root, "sharded_escape")
    index = os.path.join(escaping, "model.safetensors.index.json")
    with open(index) as f:
        content = json.load(f)
    victim = next(iter(content["weight_map"]))  # the first entry the reader checks
    shard = content["weight_map"][victim]
    os.rename(os.path.join(escaping, shard), os.path.join(root, shard))  # beside the folder
    content["weight_map"] = {k: (f"../{shard}" if v == shard else v)
                             for k, v in content["weight_map"].items()}
    with open(index, "w") as f:
        json.dump(content, f)
    out["escape_train"] = _train(*hf, f"checkpoint.init_from_hf={escaping}")
    out["escape_victim"] = (victim, shard)

    # ---- 7. export-hf into the checkpoint, into a non-empty folder, over an older export
    ckpt = os.path.join(root, "ckpt")
    out["trained"] = _train(*NO_EVAL, f"checkpoint.save={ckpt}")
    _fresh_world()
    from megatron_mile.cli.export_hf import main as export

    out["export_into_ckpt"] = _run(export, ["--load", ckpt, "--output", ckpt])
    out["ckpt_after"] = sorted(os.listdir(ckpt))
    older = os.path.join(root, "older")
    os.makedirs(older)
    stale = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
             "model-00003-of-00003.safetensors", "model.safetensors.index.json",
             "tokenizer.model", "notes.txt"]
    for name in stale:
        with open(os.path.join(older, name), "w") as f:
            f.write("old")
    with open(os.path.join(older, "model.safetensors.index.json"), "w") as f:  # what loaders read
        json.dump({"weight_map": {f"t{i}": stale[i] for i in range(3)}}, f)
    os.environ["MASTER_PORT"] = _free_port()
    out["export_non_empty"] = _run(export, ["--load", ckpt, "--output", older])
    out["older_after_refusal"] = sorted(os.listdir(older))
    os.environ["MASTER_PORT"] = _free_port()
    out["export_overwrite"] = _run(export, ["--load", ckpt, "--output", older, "--overwrite"])
    out["older_after_overwrite"] = sorted(os.listdir(older))
    from megatron_mile.checkpoint_hf import read_safetensors_shapes

    out["exported_tensors"] = len(read_safetensors_shapes(os.path.join(older,
                                                                       "model.safetensors")))

    # ---- 6d. the import tool on the disagreeing folder: refused before anything is written
    from megatron_mile.cli.import_hf import main as import_hf

    os.environ["MASTER_PORT"] = _free_port()
    imported = os.path.join(root, "imported")
    out["hf_import"] = _run(import_hf, ["--hf", kv, "--output", imported])
    out["hf_import_wrote"] = os.path.exists(imported)

    # ---- 6b. a rendezvous that times out: rank 0 alone hosts the store, rank 1 finds none
    _fresh_world()
    os.environ["WORLD_SIZE"] = "2"
    for case, rank in (("rendezvous_store", "0"), ("rendezvous_client", "1")):
        os.environ.update(RANK=rank, MASTER_PORT=_free_port())
        start = time.monotonic()
        out[case] = _train(*NO_EVAL, "parallel.distributed_timeout_minutes=0.02")  # 1.2 s
        out[f"{case}_s"] = time.monotonic() - start
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inputs"))
    return run_distributed(_inputs, 1, args=(root,), timeout_s=240)[0]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# --------------------------------------------------------------------------- 4. small corpus


@pytest.mark.slow
def test_a_validation_split_without_documents_is_refused(inputs):
    code, stderr = inputs["small_eval"]
    line = _one_line(stderr)
    assert code == 2, line
    assert "DataError: DataConfig.data_path: the validation split of" in line, line
    assert f"small is empty: data.split='969,30,1' gives it documents [12, 12) of the " \
           f"{SMALL_DOCS} in" in line and "small.idx" in line, line
    assert 'e.g. data.split="83,17,0"' in line and "training.eval_iters=0" in line, line


@pytest.mark.slow
def test_splits_a_run_does_not_read_are_dropped(inputs):
    # Without evaluation neither validation nor test is read: both empty, both dropped, and
    # the run trains (the trainer never reads the test split at all).
    assert inputs["small_no_eval"] == (0, "")
    assert inputs["blend_no_eval"] == (0, "")
    # Only training indices were built (megatron-core names its cache files
    # HASH-GPTDataset-SPLIT-...): no validation or test index for either run.
    built = {name.split("-")[2] for name in inputs["cache"]}
    assert built == {"train"}, inputs["cache"]


@pytest.mark.slow
def test_an_empty_split_of_one_blended_prefix_is_refused(inputs):
    code, stderr = inputs["blend_eval"]
    line = _one_line(stderr)
    assert code == 2, line
    assert "the validation split of" in line and "small is empty" in line, line
    assert "big is empty" not in line


# --------------------------------------------------------------------------- 6. one line


@pytest.mark.slow
def test_a_yaml_list_config_is_one_line(inputs):
    code, stderr = inputs["yaml_list"]
    line = _one_line(stderr)
    assert code == 2, line
    assert "listed.yaml: the top level is a YAML list, not a mapping of sections" in line


@pytest.mark.slow
@pytest.mark.parametrize("case, rank", [("rendezvous_store", 0), ("rendezvous_client", 1)])
def test_a_rendezvous_timeout_names_the_setting(inputs, case, rank):
    code, stderr = inputs[case]
    line = _one_line(stderr)
    assert code == 2, line
    assert f"rank {rank}: the process group rendezvous at 127.0.0.1:" in line, line
    assert "did not gather all 2 ranks within parallel.distributed_timeout_minutes=0.02" in line
    assert "Start every rank (WORLD_SIZE=2)" in line
    assert inputs[f"{case}_s"] < 20, inputs[f"{case}_s"]  # the default would be 10 min


@pytest.mark.slow
def test_a_malformed_tokenizer_json_is_the_preprocessing_line(inputs):
    code, stderr = inputs["tokenizer_train"]
    line = _one_line(stderr)
    assert code == 2, line
    prefix = "megatron-mile-train: DataError: "
    assert line.startswith(prefix) and "tok/tokenizer.json is not a Hugging Face " \
        "tokenizer.json: " in line, line
    pre_code, pre_stderr = inputs["tokenizer_preprocess"]
    pre_line = _one_line(pre_stderr)
    assert pre_code == 2 and pre_line == "error: " + line[len(prefix):], (pre_line, line)


@pytest.mark.slow
def test_hf_config_that_disagrees_with_the_weights_is_refused_before_the_model(inputs):
    for case, program in (("hf_train", "megatron-mile-train"),
                          ("hf_import", "megatron-mile-import-hf")):
        code, stderr = inputs[case]
        line = _one_line(stderr)
        assert code == 2, line
        assert line.startswith(f"{program}: CheckpointError: tensor model.layers.0.self_attn."
                               "k_proj.weight has shape [64, 64] in "), line
        assert "kv_heads/model.safetensors but " in line and "kv_heads/config.json implies " \
            "[32, 64] (num_key_value_heads=2 x head_dim=16)" in line, line
        assert "(3 more tensor(s) disagree)" in line  # v_proj, and both of layer 1
    assert not inputs["hf_import_wrote"]


# --------------------------------------------------------------------------- 7. HF files


@pytest.mark.slow
def test_an_index_entry_outside_the_folder_is_refused(inputs):
    code, stderr = inputs["escape_train"]
    line = _one_line(stderr)
    victim, shard = inputs["escape_victim"]
    assert code == 2, line
    assert f"model.safetensors.index.json: tensor {victim} is stored in '../{shard}', a path " \
           "through '..' outside the model folder" in line, line


@pytest.mark.slow
def test_export_into_the_checkpoint_or_a_non_empty_folder_needs_overwrite(inputs):
    assert inputs["trained"][0] == 0
    code, stderr = inputs["export_into_ckpt"]
    line = _one_line(stderr)
    assert code == 2 and "FileExistsError: --output" in line, line
    assert "is the checkpoint folder --load" in line and "--overwrite" in line, line
    assert inputs["ckpt_after"] == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    code, stderr = inputs["export_non_empty"]
    line = _one_line(stderr)
    assert code == 2 and "older is not empty (6 entries)" in line and "--overwrite" in line
    assert len(inputs["older_after_refusal"]) == 6  # untouched


@pytest.mark.slow
def test_export_overwrite_leaves_no_stale_shard_or_index(inputs):
    code, _ = inputs["export_overwrite"]
    assert code == 0
    # The older 3-shard export, its index and its tokenizer are gone; other files stay.
    assert inputs["older_after_overwrite"] == ["config.json", "generation_config.json",
                                               "model.safetensors", "notes.txt"]
    # tiny: 2 layers of 9 tensors, the embedding, the final norm and the (untied) lm_head
    assert inputs["exported_tensors"] == 2 * 9 + 3


# --------------------------------------------------------------------------- unit checks


def test_yaml_list_config_is_a_config_error(tmp_path):
    from megatron_mile.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"the top level is a YAML list, not a mapping"):
        load_config(str(path))


def test_build_datasets_refuses_an_empty_split_and_drops_an_unread_one(tmp_path):
    from megatron_mile.data.config import DataConfig
    from megatron_mile.data.datasets import build_datasets, build_tokenizer
    from megatron_mile.data.integrity import DataError

    prefix = write_corpus(str(tmp_path / "c"), SMALL_DOCS)
    cfg = DataConfig(data_path=[prefix], vocab_size=512, path_to_cache=str(tmp_path / "cache"))
    tok = build_tokenizer(cfg)
    with pytest.raises(DataError, match=r"the test split of .*c is empty: data.split="
                                        r"'969,30,1' gives it documents \[12, 12\) of the 12 "
                                        r".*e\.g\. data\.split=\"66,17,17\""):
        build_datasets(cfg, tok, 16, (8, 0, 2), seed=1)
    assert not (tmp_path / "cache").exists()  # refused before any index was built
    train, valid, test = build_datasets(cfg, tok, 16, (8, 0, 0), seed=1)
    assert len(train) >= 8 and valid is None and test is None
    # A split nobody reads changes nothing in the others: the same training samples.
    cfg_test = DataConfig(data_path=[prefix], vocab_size=512, split="80,10,10",
                          path_to_cache=str(tmp_path / "cache2"))
    kept = build_datasets(cfg_test, tok, 16, (8, 2, 2), seed=1)[0]
    dropped = build_datasets(cfg_test, tok, 16, (8, 0, 0), seed=1)[0]
    assert [kept[i]["tokens"].tolist() for i in range(8)] == \
        [dropped[i]["tokens"].tolist() for i in range(8)]


def test_malformed_tokenizer_files_are_data_errors(tmp_path):
    from megatron_mile.data.integrity import DataError
    from megatron_mile.data.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text(BAD_TOKENIZER)
    with pytest.raises(DataError, match=r"tokenizer.json is not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match=r"is not a Hugging Face tokenizer.json \(not UTF-8"):
        load_tokenizer(str(tmp_path))


def _safetensors_folder(folder) -> str:
    """A real sharded safetensors folder (two files and their index), small."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({"a": torch.zeros(2, 3)}, os.path.join(folder, "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(4)}, os.path.join(folder, "model-00002-of-00002.safetensors"))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                  "b": "model-00002-of-00002.safetensors"}}, f)
    return str(folder)


def _point(folder: str, tensor: str, filename: str) -> None:
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        content = json.load(f)
    content["weight_map"][tensor] = filename
    with open(index, "w") as f:
        json.dump(content, f)


def test_index_files_must_stay_inside_the_folder(tmp_path):
    from megatron_mile.checkpoint_hf import hf_weight_map, read_safetensors_shapes
    from megatron_mile.training import checkpoint

    folder = _safetensors_folder(tmp_path / "model")
    assert hf_weight_map(folder) == {"a": "model-00001-of-00002.safetensors",
                                     "b": "model-00002-of-00002.safetensors"}
    assert read_safetensors_shapes(os.path.join(folder, "model-00001-of-00002.safetensors")) \
        == {"a": (2, 3)}
    outside = _safetensors_folder(tmp_path / "other")
    cases = {
        "../other/model-00002-of-00002.safetensors": "a path through '..'",
        os.path.join(outside, "model-00002-of-00002.safetensors"): "an absolute path",
        "linked.safetensors": "a symbolic link to " + os.path.join(
            os.path.realpath(outside), "model-00002-of-00002.safetensors"),
    }
    os.symlink(os.path.join(outside, "model-00002-of-00002.safetensors"),
               os.path.join(folder, "linked.safetensors"))
    for filename, reason in cases.items():
        _point(folder, "b", filename)
        with pytest.raises(checkpoint.CheckpointError) as err:
            hf_weight_map(folder)
        assert f"tensor b is stored in {filename!r}, {reason} outside the model folder" \
            in str(err.value), str(err.value)
    # A Hugging Face hub cache snapshot links its files into the cache's blobs: allowed.
    snapshot = tmp_path / "hub" / "snapshots" / "rev"
    blobs = tmp_path / "hub" / "blobs"
    os.makedirs(blobs)
    _safetensors_folder(snapshot)
    os.replace(snapshot / "model-00002-of-00002.safetensors", blobs / "0123abcd")
    os.symlink("../../blobs/0123abcd", snapshot / "model-00002-of-00002.safetensors")
    assert hf_weight_map(str(snapshot))["b"] == "model-00002-of-00002.safetensors"


def test_export_target_checks(tmp_path):
    from megatron_mile.evaluation.hf_export import check_export_target

    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000002").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="is the checkpoint folder"):
        check_export_target(str(ckpt), str(ckpt / "hf"), overwrite=False)
    (tmp_path / "out").mkdir()
    check_export_target(str(ckpt), str(tmp_path / "out"), overwrite=False)  # empty: fine
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(FileExistsError, match=r"out is not empty \(1 entries\)"):
        check_export_target(str(ckpt), str(tmp_path / "out"), overwrite=False)
    check_export_target(str(ckpt), str(tmp_path / "out"), overwrite=True)
    check_export_target(str(ckpt), str(ckpt), overwrite=True)
