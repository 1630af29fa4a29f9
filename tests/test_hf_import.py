"""Hugging Face LlamaForCausalLM -> megatron-mile (checkpoint.init_from_hf, import_hf) and back.

Tiny LlamaForCausalLM models are built from a LlamaConfig and saved locally (no downloads):
GQA + untied + sharded safetensors + rope_theta 50000 + eps 1e-6, and tied multi-head; both
with a vocabulary of 1000 (padded to 1024). One 2-process launch imports them into TP=1 x DP=2
(distributed optimizer), TP=2 + SP, PP=2 and PP=2 x VPP=2 through the trainer and records the
logits, CE and a few training steps; one more exports import_hf's checkpoints back. The
refusals are single-process and fast.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hf_fixtures import (
    LAYOUTS, SEQ, VOCAB, hf_logits, layout_body, make_hf_model, read_safetensors,
    round_trip_body,
)
from megatron_mile.testing import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LOGITS_ATOL = 1e-4
CE_TOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    out = {}
    for name in ("untied_gqa", "tied"):
        out[name] = str(tmp / name)
        make_hf_model(out[name], name, sharded=name == "untied_gqa")
    assert os.path.isfile(os.path.join(out["untied_gqa"], "model.safetensors.index.json"))
    return out


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ + 1)).tolist()


@pytest.fixture(scope="module")
def layouts(folders, tokens):
    results = run_distributed(layout_body, 2, args=(folders, tokens), timeout_s=600)
    merged: dict = {}
    for res in results:  # the last stage's ranks carry the numbers
        for key, value in res.items():
            slot = merged.setdefault(key, {})
            for k, v in value.items():
                if k == "train_lm_loss":
                    if all(x is not None for x in v):
                        slot[k] = v
                else:
                    slot[k] = v
    return merged


CASES = [("untied_gqa", layout) for layout in LAYOUTS] + [("tied", "pp2"), ("tied", "tp2-sp")]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_imported_logits_and_ce_equal_transformers(folders, tokens, layouts, case):
    name, _ = case
    res = layouts[case]
    expected = hf_logits(folders[name], [t[:-1] for t in tokens])  # [b, s, V]
    logits = torch.tensor(res["logits"])  # [b, s, padded V]
    assert logits.shape == (2, SEQ, 1024)
    err = (logits[..., :VOCAB] - expected).abs().max().item()
    assert err <= LOGITS_ATOL, f"{case}: max |megatron - HF| logit = {err}"
    assert expected.std() > 0.1  # not vacuous
    # CE over the real vocabulary (the padded rows count nowhere): equal to HF's.
    labels = torch.tensor([t[1:] for t in tokens])
    ce_hf = torch.nn.functional.cross_entropy(expected.double().reshape(-1, VOCAB),
                                              labels.reshape(-1), reduction="none")
    ce = torch.tensor(res["ce"], dtype=torch.float64).reshape(-1)
    assert (ce.mean() - ce_hf.mean()).abs().item() <= CE_TOL, (ce.mean(), ce_hf.mean())
    assert (ce - ce_hf).abs().max().item() <= 1e-4
    p = torch.softmax(expected.double(), -1)
    entropy_hf = -(p * p.log()).sum(-1).reshape(-1)
    entropy = torch.tensor(res["entropy"], dtype=torch.float64).reshape(-1)
    assert (entropy - entropy_hf).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_training_steps_lower_the_loss_on_repeated_data(layouts, case):
    losses = layouts[case]["train_lm_loss"]
    assert losses[2] < losses[1] < losses[0], losses


@pytest.mark.slow
def test_layouts_start_from_the_same_loss(layouts):
    first = [layouts[c]["train_lm_loss"][0] for c in CASES if c[0] == "untied_gqa"]
    assert max(first) - min(first) <= 1e-5, first


@pytest.fixture(scope="module")
def round_trip(folders, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("round_trip"))
    configs = run_distributed(round_trip_body, 1, args=(folders, tmp), timeout_s=300)[0]
    return tmp, configs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["untied_gqa", "tied"])
def test_export_of_import_is_bit_exact(folders, round_trip, name):
    tmp, configs = round_trip
    original = read_safetensors(folders[name])
    exported = read_safetensors(os.path.join(tmp, f"export_{name}"))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype == torch.float32, key
        assert torch.equal(exported[key], tensor), key
    with open(os.path.join(folders[name], "config.json")) as f:
        hf = json.load(f)
    config = configs[name]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "tie_word_embeddings"):
        assert config[key] == hf[key], key
    assert config["rope_theta"] == hf["rope_parameters"]["rope_theta"]
