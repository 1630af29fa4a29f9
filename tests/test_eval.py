"""Per-token-frequency evaluation: bucketing, accumulation, layouts, and the comparison script.

* Unit tests of the bucket assignment (the paper's 80% / 15% / 5% of training occurrences),
  the per-bucket sums and the validation windows, against hand-made cases.
* ``examples/compare_losses.sh`` with a few steps per loss (the CI version of the
  comparison): the pipeline runs and its numbers are finite and consistent (bucket counts sum
  to the total, overall CE is the count-weighted mean of the bucket CEs).
* One 2-process launch evaluates the script's cross-entropy checkpoint (trained at TP=1) at
  TP=2, PP=2 and DP=2, and against a dense float64 computation from full logits: all must
  equal the script's single-process result.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mile.evaluation.token_frequency import (
    bucket_names,
    bucket_sums,
    check_edges,
    count_token_frequencies,
    frequency_buckets,
    summarize,
    validation_windows,
)
from megatron_mile.testing import run_distributed

ROOT = Path(__file__).resolve().parent.parent
LOSSES = ("cross_entropy", "focal", "mile")
EVAL_SAMPLES = 6
SEQ = 32


# --------------------------------------------------------------------------- units


def test_paper_buckets_follow_cumulative_training_share():
    # 100 occurrences; ids deliberately not in frequency order.
    counts = np.zeros(10, dtype=np.int64)
    counts[[7, 2, 5, 0, 9, 4]] = [50, 30, 10, 5, 3, 2]
    bucket = frequency_buckets(counts, (0.8, 0.95))
    # Shares before each id: 7: 0, 2: .5, 5: .8, 0: .9, 9: .95, 4: .98; unseen ids are rare.
    expected = {7: 0, 2: 0, 5: 1, 0: 1, 9: 2, 4: 2, 1: 2, 3: 2, 6: 2, 8: 2}
    assert {i: int(b) for i, b in enumerate(bucket)} == expected
    assert bucket_names((0.8, 0.95)) == ["0-80%", "80-95%", "95-100%"]
    assert list(frequency_buckets(counts, (0.5,))[[7, 2, 5]]) == [0, 1, 1]


def test_ties_are_broken_by_id_and_edges_are_checked():
    counts = np.array([5, 5, 5, 5], dtype=np.int64)
    assert list(frequency_buckets(counts, (0.5,))) == [0, 0, 1, 1]
    for bad in ((), (0.95, 0.8), (0.0, 0.5), (0.5, 1.0), (0.5, 0.5)):
        with pytest.raises(ValueError):
            check_edges(bad)
    with pytest.raises(ValueError):
        frequency_buckets(np.zeros(4, dtype=np.int64))


def test_bucket_sums_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 20, (8, 3), generator=gen)
    ce, entropy = torch.rand(8, 3, generator=gen) * 5, torch.rand(8, 3, generator=gen) * 3
    mask = (torch.rand(8, 3, generator=gen) > 0.3).float()
    bucket_of = torch.arange(20) % 3
    sums = bucket_sums(ce, entropy, target, mask, bucket_of, 3)
    expected = np.zeros((3, 3))
    for t, c, e, m in zip(target.flatten(), ce.flatten(), entropy.flatten(), mask.flatten()):
        if m:
            expected[int(bucket_of[t])] += [1, float(c), float(e)]
    np.testing.assert_allclose(sums.numpy(), expected, rtol=1e-12)
    out = summarize(sums, ["a", "b", "c"])
    assert out["overall"]["tokens"] == int(mask.sum())
    ce_all = float((ce * mask).double().sum() / mask.sum())
    assert out["overall"]["ce"] == pytest.approx(ce_all, rel=1e-12)
    assert out["buckets"][1]["ppl"] == pytest.approx(math.exp(expected[1, 1] / expected[1, 0]))


def _write_indexed(prefix: str, docs: list[list[int]]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(prefix + ".idx")


def test_counts_and_windows_read_every_token(tmp_path):
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(0, 50, size=n)) for n in (7, 30, 1, 12)]
    stream = np.concatenate(docs)
    _write_indexed(str(tmp_path / "a"), docs[:2])
    _write_indexed(str(tmp_path / "b"), docs[2:])
    blend = [str(tmp_path / "a"), str(tmp_path / "b")]
    np.testing.assert_array_equal(count_token_frequencies(blend, 64),
                                  np.bincount(stream, minlength=64))
    windows = validation_windows(blend, seq_length=8)
    n = (len(stream) - 1) // 8
    assert windows.shape == (n, 9)
    # Each target (column 1..8) is predicted once, in order; inputs are the preceding tokens.
    np.testing.assert_array_equal(windows[:, 1:].reshape(-1), stream[1:n * 8 + 1])
    np.testing.assert_array_equal(windows[:, 0], stream[0:n * 8:8])
    assert validation_windows(blend, 8, max_samples=2).shape == (2, 9)
    with pytest.raises(ValueError, match="id 49|vocab"):
        count_token_frequencies(blend, 40)


# --------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    env = {**os.environ, "OUT_DIR": str(out), "STEPS": "2", "SEEDS": "7", "VOCAB": "600",
           "SEQ": str(SEQ), "MBS": "2", "GBS": "4", "EVAL_SAMPLES": str(EVAL_SAMPLES),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "compare_losses.sh")], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_script_numbers_are_finite_and_consistent(compare_run):
    for loss in LOSSES:
        with open(compare_run / f"{loss}_seed7" / "freq.json", encoding="utf-8") as f:
            r = json.load(f)
        assert r["loss"]["type"] == loss and r["seed"] == 7 and r["iteration"] == 2
        assert [b["name"] for b in r["buckets"]] == ["0-80%", "80-95%", "95-100%"]
        total = r["overall"]["tokens"]
        assert total == EVAL_SAMPLES * SEQ
        assert sum(b["tokens"] for b in r["buckets"]) == total
        assert all(b["tokens"] > 0 for b in r["buckets"])
        weighted = sum(b["tokens"] * b["ce"] for b in r["buckets"]) / total
        assert r["overall"]["ce"] == pytest.approx(weighted, rel=1e-9)
        weighted_h = sum(b["tokens"] * b["entropy"] for b in r["buckets"]) / total
        assert r["overall"]["entropy"] == pytest.approx(weighted_h, rel=1e-9)
        for entry in [r["overall"], *r["buckets"]]:
            assert all(math.isfinite(entry[k]) for k in ("ce", "ppl", "entropy"))
            assert entry["ppl"] == pytest.approx(math.exp(entry["ce"]), rel=1e-12)
            # A barely trained model: CE near log(vocab), entropy in (0, log V].
            assert 0 < entry["entropy"] <= math.log(r["vocab_size"]) + 1e-6
        assert sum(b["vocab_ids"] for b in r["buckets"]) == r["vocab_size"]
        assert sum(b["train_share"] for b in r["buckets"]) == pytest.approx(1.0)
        assert r["buckets"][0]["train_share"] == pytest.approx(0.8, abs=0.02)
    table = (compare_run / "results.md").read_text()
    for loss in LOSSES:
        assert f"| {loss} seed 7 |" in table
    assert "Mean over seeds" in table
    assert (compare_run / "freq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- layouts


def _layouts(rank: int, world_size: int, ckpt: str) -> dict:
    from megatron.core import parallel_state

    from megatron_mile.evaluation.loading import load_inference_model
    from megatron_mile.evaluation.token_frequency import evaluate_checkpoint

    out = {}
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        out[name] = evaluate_checkpoint(ckpt, tp=tp, pp=pp, micro_batch_size=4,
                                        max_samples=EVAL_SAMPLES)
    # Dense float64 reference from full logits (TP=1: every rank holds the whole model).
    loaded = load_inference_model(ckpt, tp=1, pp=1)
    try:
        cfg = loaded.cfg
        windows = torch.from_numpy(validation_windows(cfg.data.valid_data_path,
                                                      cfg.model.seq_length, EVAL_SAMPLES))
        counts = count_token_frequencies(cfg.data.data_path, loaded.vocab_size)
        bucket_of = torch.from_numpy(frequency_buckets(counts))
        tokens, labels = windows[:, :-1], windows[:, 1:]
        with torch.no_grad():
            logits = loaded.model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        # The padded vocabulary rows count nowhere (as in training): the real rows only.
        logp = torch.log_softmax(logits[..., :loaded.tokenizer_vocab_size].double(), dim=-1)
        ce = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        sums = np.zeros((3, 3))
        for b in range(3):
            sel = bucket_of[labels] == b
            sums[b] = [sel.sum().item(), ce[sel].sum().item(), entropy[sel].sum().item()]
        out["dense"] = summarize(sums, bucket_names((0.8, 0.95)))
    finally:
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_layouts_and_dense_reference_agree(compare_run):
    ckpt = str(compare_run / "cross_entropy_seed7" / "ckpt")
    with open(compare_run / "cross_entropy_seed7" / "freq.json", encoding="utf-8") as f:
        single = json.load(f)  # TP=1, one process, from the script
    results = run_distributed(_layouts, 2, args=(ckpt,), timeout_s=300)
    assert results[0] == results[1]  # every rank returns the same dict
    for name, r in results[0].items():
        for got, want in zip([r["overall"], *r["buckets"]],
                             [single["overall"], *single["buckets"]]):
            assert got["tokens"] == want["tokens"], name
            assert got["ce"] == pytest.approx(want["ce"], rel=1e-5), name
            assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-5), name
