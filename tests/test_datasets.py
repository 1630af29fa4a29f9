"""DataConfig validation, GPT datasets from preprocessed files, the resumable DP sampler."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data_fixtures import make_documents
from megatron_mile.data.config import DataConfig, parse_blend
from megatron_mile.data.datasets import (
    PretrainingSampler, build_data_loader, build_datasets, build_tokenizer,
)
from megatron_mile.data.integrity import DataError, summarize_indexed_dataset
from megatron_mile.testing import run_distributed

SEQ = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory, model_path) -> dict[str, str]:
    """Tokenizer + two preprocessed datasets ("a": 150 documents, "b": 60)."""
    from megatron_mile.data.preprocess import preprocess

    tmp = tmp_path_factory.mktemp("data")
    model = model_path
    out = {"model": model, "dir": str(tmp)}
    for name, n, seed in (("a", 150, 5), ("b", 60, 6)):
        corpus = tmp / f"{name}.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n"
                                  for d in make_documents(n, seed)), encoding="utf-8")
        preprocess([str(corpus)], str(tmp / name), model, progress=None)
        out[name] = str(tmp / name)
    return out


def _cfg(data, **kw) -> DataConfig:
    kw.setdefault("data_path", [data["a"]])
    kw.setdefault("tokenizer_model", data["model"])
    kw.setdefault("path_to_cache", os.path.join(data["dir"], "cache"))
    return DataConfig(**kw)


def _stream(ds) -> np.ndarray:
    """The token stream a GPTDataset cuts samples from: its documents in shuffled order."""
    return np.concatenate([np.array(ds.dataset[int(d)]) for d in ds.document_index])


# --- DataConfig ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(split="90,x,1"), r"DataConfig\.split='90,x,1': must be 1 to 3"),
    (dict(split="0,1,0"), r"DataConfig\.split='0,1,0': the train weight must be > 0"),
    (dict(split="1,2,3,4"), r"DataConfig\.split='1,2,3,4'"),
    (dict(data_path=[]), r"DataConfig\.data_path=\[\]: give at least one"),
    (dict(data_path=["0.7", "a", "b"]), r"DataConfig\.data_path=.*alternating weight"),
    (dict(data_path=["0", "a"]), r"weight 0\.0 must be a positive"),
    (dict(vocab_size=100), r"tokenizer_model='tok.model' and vocab_size=100: set only one"),
    (dict(tokenizer_model=None), r"tokenizer_model=None and vocab_size=None"),
    (dict(tokenizer_model=None, vocab_size=1), r"DataConfig\.vocab_size=1: .*\[2, 2\*\*31\)"),
    (dict(num_workers=-1), r"DataConfig\.num_workers=-1: must be an integer in \[0, 64\]"),
    (dict(eod_mask_loss="yes"), r"DataConfig\.eod_mask_loss='yes': must be true or false"),
    (dict(reset_attention_mask=True), r"reset_attention_mask=True needs create_attention_mask"),
    (dict(mock=True), r"DataConfig\.mock=True but data_path=\['a'\]"),
    (dict(test_data_path=["t"]), r"test_data_path=\['t'\] needs valid_data_path"),
    (dict(path_to_cache=""), r"DataConfig\.path_to_cache='': must be a directory"),
    (dict(mid_level_dataset_surplus=2.0), r"mid_level_dataset_surplus=2\.0: must be in \[0, 1\]"),
])
def test_config_rejects_bad_values(kwargs, match):
    base = dict(data_path=["a"], tokenizer_model="tok.model")
    with pytest.raises(ValueError, match=match):
        DataConfig(**{**base, **kwargs})


def test_config_blends():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    cfg = DataConfig(data_path=[0.7, "a", "0.3", "b"], vocab_size=10)  # YAML gives floats
    assert cfg.blend() == (["a", "b"], [0.7, 0.3])
    assert DataConfig(data_path="a", vocab_size=10).data_path == ["a"]
    assert DataConfig(data_path=["a"], vocab_size=10, split="98,2").split_vector() == [
        0.98, 0.02, 0.0]
    per = DataConfig(data_path=["a"], valid_data_path=["v"], vocab_size=10).blend_per_split()
    assert per == [(["a"], None), (["v"], None), None]


# --- datasets --------------------------------------------------------------------------------

def test_samples_are_exact_windows_of_the_data(data):
    cfg = _cfg(data, split="1,0,0")
    tok = build_tokenizer(cfg)
    train, valid, test = build_datasets(cfg, tok, SEQ, (40, 0, 0), seed=7)
    assert valid is None and test is None and len(train) >= 40
    stream = _stream(train)
    for i in range(len(train)):
        s = train[i]
        assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert s["tokens"].shape == s["labels"].shape == (SEQ,)
        k = int(train.shuffle_index[i])
        window = stream[k * SEQ:(k + 1) * SEQ + 1]
        assert s["tokens"].tolist() == window[:-1].tolist()
        assert s["labels"].tolist() == window[1:].tolist()
        assert torch.equal(s["loss_mask"], torch.ones(SEQ))
        assert torch.equal(s["position_ids"], torch.arange(SEQ))
    # Same seed, same order; another seed, another order.
    again = build_datasets(cfg, tok, SEQ, (40, 0, 0), seed=7)[0]
    other = build_datasets(cfg, tok, SEQ, (40, 0, 0), seed=8)[0]
    assert torch.equal(again[3]["tokens"], train[3]["tokens"])
    assert any(not torch.equal(other[i]["tokens"], train[i]["tokens"]) for i in range(10))


def test_document_boundaries_masks_and_positions(data):
    cfg = _cfg(data, split="1,0,0", eod_mask_loss=True, reset_position_ids=True,
               reset_attention_mask=True, create_attention_mask=True)
    tok = build_tokenizer(cfg)
    train = build_datasets(cfg, tok, 64, (20, 0, 0), seed=1)[0]
    s = next(train[i] for i in range(len(train)) if (train[i]["tokens"][:-1] == tok.eod).any())
    tokens, eod = s["tokens"], tok.eod
    assert torch.equal(s["loss_mask"], (tokens != eod).float())
    j = int((tokens == eod).nonzero()[0])  # first EOD in the sample
    assert s["position_ids"][j + 1] == 0 and torch.equal(s["position_ids"][:j + 1],
                                                          torch.arange(j + 1))
    mask = s["attention_mask"]  # [1, s, s], True = masked
    assert mask.shape == (1, 64, 64) and mask.dtype == torch.bool
    assert mask[0, j + 1, j] and not mask[0, j, j] and not mask[0, j + 1, j + 1]


def test_split_by_weights_and_separate_validation(data):
    tok = build_tokenizer(_cfg(data))
    tr, va, te = build_datasets(_cfg(data, split="80,20,0"), tok, SEQ, (10, 5, 0), seed=1)
    assert te is None
    assert not set(tr.indices.tolist()) & set(va.indices.tolist())  # disjoint documents
    cfg = _cfg(data, valid_data_path=[data["b"]])
    tr, va, te = build_datasets(cfg, tok, SEQ, (10, 5, 0), seed=1)
    assert tr.dataset.path_prefix == data["a"] and va.dataset.path_prefix == data["b"]
    assert len(tr.indices) == 150 and te is None


def test_weighted_blend(data):
    from megatron.core.datasets.blended_dataset import BlendedDataset

    cfg = _cfg(data, data_path=["3", data["a"], "1", data["b"]], split="1,0,0")
    train = build_datasets(cfg, build_tokenizer(cfg), SEQ, (200, 0, 0), seed=1)[0]
    assert isinstance(train, BlendedDataset) and len(train) == 200
    share = np.bincount(np.asarray(train.dataset_index), minlength=2) / 200
    assert abs(share[0] - 0.75) < 0.02


def test_mock_data_needs_no_files():
    cfg = DataConfig(mock=True, vocab_size=64)
    tok = build_tokenizer(cfg)
    assert tok.vocab_size == 64 and tok.eod == 63
    train, valid, test = build_datasets(cfg, tok, SEQ, (8, 4, 4), seed=1)
    batch = next(iter(build_data_loader(train, 0, 4, 0, 1, 0)))
    assert batch["tokens"].shape == batch["labels"].shape == (4, SEQ)
    assert int(batch["tokens"].max()) < 64 and len(valid) >= 4 and len(test) >= 4


def test_missing_data_path_fails_early_with_the_fix(data, tmp_path):
    tok = build_tokenizer(_cfg(data))
    cfg = _cfg(data, data_path=[str(tmp_path / "nothing")],
               path_to_cache=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"no indexed dataset at prefix '.*nothing'.*"
                                                r"megatron-mile-preprocess --input"):
        build_datasets(cfg, tok, SEQ, (10, 1, 1), seed=1)
    assert not (tmp_path / "cache").exists()  # failed before building any index
    with pytest.raises(FileNotFoundError, match=r"without \.bin/\.idx: use '.*a'"):
        build_datasets(_cfg(data, data_path=[data["a"] + ".bin"]), tok, SEQ, (10, 1, 1), 1)


def test_data_from_another_tokenizer_is_refused(data):
    cfg = DataConfig(data_path=[data["a"]], vocab_size=50)  # data holds ids up to ~400
    with pytest.raises(ValueError, match=r"holds token id \d+ but the tokenizer has "
                                         r"vocab_size=50"):
        build_datasets(cfg, build_tokenizer(cfg), SEQ, (10, 1, 1), seed=1)


def _damaged_copy(data, tmp_path, damage) -> str:
    """Copy dataset "a" into ``tmp_path`` and apply ``damage(prefix)``."""
    import shutil

    prefix = str(tmp_path / "a")
    for ext in (".bin", ".idx"):
        shutil.copyfile(data["a"] + ext, prefix + ext)
    damage(prefix)
    return prefix


def _patch(path: str, offset: int, raw: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


def _resize(path: str, delta: int) -> None:
    os.truncate(path, os.path.getsize(path) + delta)


def _empty(prefix: str) -> None:
    import struct

    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 0, 1) + struct.pack("<q", 0))
    open(prefix + ".bin", "wb").close()


@pytest.mark.parametrize("damage, match", [
    (lambda p: _resize(p + ".bin", -10), r"a\.bin has \d+ bytes but .*a\.idx describes 150 "
                                          r"sequences ending at byte \d+: the \.bin is truncated"),
    (lambda p: _resize(p + ".bin", 6), r"the \.bin is longer than its index"),
    (lambda p: _patch(p + ".idx", 18, (10**6).to_bytes(8, "little")),
     r"a\.idx declares 1000000 sequences .* it is truncated"),
    (_empty, r"a\.idx holds no sequence: the dataset is empty"),
    (lambda p: _patch(p + ".idx", 0, b"NOTANIDX!"), r"a\.idx is not a Megatron index file"),
    (lambda p: _patch(p + ".idx", 17, bytes([99])), r"a\.idx has token dtype code 99"),
    (lambda p: _patch(p + ".idx", 9, (2).to_bytes(8, "little")), r"index version 2"),
])
def test_malformed_dataset_is_one_clear_error(data, tmp_path, damage, match):
    """Each of these ended in a megatron-core assert or a numpy error without a file name."""
    prefix = _damaged_copy(data, tmp_path, damage)
    cfg = _cfg(data, data_path=[prefix], path_to_cache=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"DataConfig\.data_path: .*" + match + r".*"
                                        r"megatron-mile-preprocess"):
        build_datasets(cfg, build_tokenizer(cfg), SEQ, (10, 1, 1), seed=1)
    assert not (tmp_path / "cache").exists()  # refused before building any index


def test_dataset_summary_is_cached_and_invalidated(data, tmp_path):
    prefix = _damaged_copy(data, tmp_path, lambda p: None)
    summary = summarize_indexed_dataset(prefix)
    tokens = np.fromfile(prefix + ".bin", dtype=np.dtype(summary.dtype))
    assert summary.max_token_id == int(tokens.max()) and summary.num_tokens == len(tokens)
    cache = prefix + ".summary.json"
    # The cache is what later starts read: an edited maximum is believed ...
    cached = json.loads(open(cache).read())
    cached["summary"]["max_token_id"] = 10**6
    open(cache, "w").write(json.dumps(cached))
    assert summarize_indexed_dataset(prefix).max_token_id == 10**6
    # ... until the data files change, which forces a new scan.
    os.utime(prefix + ".bin", ns=(1, 1))
    assert summarize_indexed_dataset(prefix) == summary


def test_dataset_smaller_than_one_sequence_warns(data, tmp_path, caplog):
    from megatron_mile.data.datasets import _check_prefix

    prefix = _damaged_copy(data, tmp_path, lambda p: None)
    n = summarize_indexed_dataset(prefix).num_tokens
    with caplog.at_level("WARNING"):
        _check_prefix("data_path", prefix, vocab_size=10**6, seq_length=n)
    assert f"holds {n} tokens, fewer than one sample" in caplog.text


# --- sampler and loader ----------------------------------------------------------------------

def test_sampler_resumes_exactly_and_splits_dp_ranks():
    total, mbs = 103, 3
    for dp in (1, 2, 4):
        per_rank = [list(PretrainingSampler(total, 0, mbs, r, dp)) for r in range(dp)]
        steps = len(per_rank[0])
        assert steps == total // (mbs * dp)
        for step in range(steps):  # each step: the ranks' slices tile one contiguous range
            flat = [i for r in range(dp) for i in per_rank[r][step]]
            assert flat == list(range(step * mbs * dp, (step + 1) * mbs * dp))
        for consumed_steps in (1, steps // 2):
            resumed = list(PretrainingSampler(total, consumed_steps * mbs * dp, mbs, 1 % dp, dp))
            assert resumed == per_rank[1 % dp][consumed_steps:]


@pytest.mark.parametrize("kwargs, match", [
    (dict(consumed_samples=10), r"consumed_samples=10: must be in \[0, 10\).*num_samples\[0\]"),
    (dict(data_parallel_rank=2), r"data_parallel_rank=2: must be in \[0, 2\)"),
    (dict(micro_batch_size=0), r"micro_batch_size=0"),
])
def test_sampler_rejects_bad_arguments(kwargs, match):
    args = dict(total_samples=10, consumed_samples=0, micro_batch_size=2,
                data_parallel_rank=0, data_parallel_size=2)
    with pytest.raises(ValueError, match=match):
        PretrainingSampler(**{**args, **kwargs})


def test_loader_resume_gives_the_same_batches(data):
    cfg = _cfg(data, split="1,0,0")
    train = build_datasets(cfg, build_tokenizer(cfg), SEQ, (48, 0, 0), seed=3)[0]
    full = [b["tokens"] for b in build_data_loader(train, 0, 4, 1, 2, 0)]
    resumed = [b["tokens"] for b in build_data_loader(train, 16, 4, 1, 2, 2)]  # 2 workers
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[2:]))
    assert full[0].shape == (4, SEQ)
    assert build_data_loader(None, 0, 4, 0, 1, 0) is None


# --- multi-process ---------------------------------------------------------------------------

def _distributed_body(rank: int, world_size: int, data: dict[str, str], cache: str):
    import torch.distributed as dist

    # 1. Data missing on rank 1 only: every rank raises, none waits in a barrier.
    bad = [data["a"] if rank == 0 else data["a"] + "_missing"]
    cfg = DataConfig(data_path=bad, tokenizer_model=data["model"], path_to_cache=cache)
    try:
        build_datasets(cfg, build_tokenizer(cfg), SEQ, (32, 4, 0), seed=5)
        missing_error = None
    except FileNotFoundError as err:
        missing_error = str(err)
    # 2. Normal build: rank 0 writes the index cache, rank 1 reads it; each DP rank gets its
    #    own slice of every global micro-batch.
    cfg = DataConfig(data_path=[data["a"]], tokenizer_model=data["model"], path_to_cache=cache,
                     split="90,10,0")
    train = build_datasets(cfg, build_tokenizer(cfg), SEQ, (32, 4, 0), seed=5)[0]
    loader = build_data_loader(train, 8, 2, rank, world_size, 0)
    batches = [b["tokens"].tolist() for b in loader]  # plain lists: tensors cannot outlive
    # their rank process in the harness's result queue
    gathered = [None] * world_size
    dist.all_gather_object(gathered, batches)
    return missing_error, gathered, train.unique_description_hash


@pytest.mark.slow
def test_multiprocess_build_and_dp_slices(data, tmp_path):
    cache = str(tmp_path / "cache")
    results = run_distributed(_distributed_body, 2, args=(data, cache), timeout_s=240)
    for rank, (missing_error, _, _) in enumerate(results):
        assert missing_error is not None and "a_missing" in missing_error, rank
        assert "reported by rank 1" in missing_error
    (_, gathered, h0), (_, _, h1) = results
    assert h0 == h1 and any(h0 in f for f in os.listdir(cache))

    cfg = DataConfig(data_path=[data["a"]], tokenizer_model=data["model"], path_to_cache=cache,
                     split="90,10,0")
    train = build_datasets(cfg, build_tokenizer(cfg), SEQ, (32, 4, 0), seed=5)[0]
    single = [b["tokens"] for b in build_data_loader(train, 8, 4, 0, 1, 0)]
    assert len(gathered[0]) == len(gathered[1]) == len(single)
    for step, batch in enumerate(single):  # rank 0 + rank 1 slices == the single-rank batch
        assert gathered[0][step] + gathered[1][step] == batch.tolist()
