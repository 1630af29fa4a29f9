"""The Qwen2 / Qwen2.5 family (megatron_mile/models/qwen2.py) against transformers' own
Qwen2ForCausalLM, built small and random (qkv biases, tied embeddings as in the small Qwen2.5
sizes, GQA, rope_theta 1e6): imported through checkpoint.init_from_hf at TP=1 (DP=2) and TP=2
+ SP in one 2-process launch, its fp32 logits equal HF's within 1e-4, and import_hf then
export_hf give back the same tensors and a Qwen2 config.json."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hf_fixtures import SEQ, VOCAB, hf_logits, layout_body, make_qwen2_model, read_safetensors
from megatron_mile.testing import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LOGITS_ATOL = 1e-4
CASES = [("qwen2", "tp1-dp2-distopt"), ("qwen2", "tp2-sp")]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen2")
    folder = str(tmp / "qwen2")
    make_qwen2_model(folder)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, SEQ + 1)).tolist()
    out = str(tmp_path_factory.mktemp("qwen2_round_trip"))
    results = run_distributed(layout_body, 2, args=({"qwen2": folder}, tokens, out, CASES),
                              timeout_s=600)
    return folder, tokens, out, results


def test_family_is_inferred_and_biases_accepted(qwen2):
    from megatron_mile.hf.safetensors import HFCheckpoint
    from megatron_mile.models import QWEN2
    from megatron_mile.run_config import load_run_config

    folder = qwen2[0]
    cfg = load_run_config("tiny", [f"checkpoint.init_from_hf={folder}"])
    assert cfg.model.family == "qwen2" and cfg.model.untie_embeddings is False
    assert cfg.model.rotary_base == 1000000 and cfg.model.num_query_groups == 2
    HFCheckpoint(folder, QWEN2).close()  # its q/k/v biases are in the family's table


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_imported_logits_equal_transformers(qwen2, case):
    folder, tokens, _, results = qwen2
    merged: dict = {}
    for res in (r["layouts"] for r in results):
        for key, value in res.items():
            merged.setdefault(key, {}).update({k: v for k, v in value.items() if k == "logits"})
    expected = hf_logits(folder, [t[:-1] for t in tokens])
    logits = torch.tensor(merged[case]["logits"])[..., :VOCAB]
    assert expected.std() > 0.1  # not vacuous
    err = (logits - expected).abs().max().item()
    assert err <= LOGITS_ATOL, f"{case}: max |megatron - HF| logit = {err}"


@pytest.mark.slow
def test_export_of_import_is_bit_exact_and_qwen2(qwen2):
    folder, _, out, results = qwen2
    config = results[0]["round_trip"]["qwen2"]
    original = read_safetensors(folder)
    exported = read_safetensors(os.path.join(out, "export_qwen2"))
    assert sorted(exported) == sorted(original)
    assert any(k.endswith("q_proj.bias") for k in original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "tie_word_embeddings"):
        assert config[key] == hf[key], key
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "export_qwen2"))
    assert type(model).__name__ == "Qwen2ForCausalLM"
