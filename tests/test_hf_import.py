"""Hugging Face LlamaForCausalLM -> megatron-mile (checkpoint.init_from_hf, import_hf) and back.

Tiny LlamaForCausalLM models are built from a LlamaConfig and saved locally (no downloads):
GQA + untied + sharded safetensors + rope_theta 50000 + eps 1e-6, and tied multi-head; both
with a vocabulary of 1000 (padded to 1024). One 2-process launch imports them into TP=1 x DP=2
(distributed optimizer), TP=2 + SP, PP=2 and PP=2 x VPP=2 through the trainer and records the
logits, CE and a few training steps, then writes import_hf's checkpoints and exports them
back. The refusals are single-process and fast.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hf_fixtures import (
    LAYOUTS, SEQ, VOCAB, hf_logits, layout_body, make_hf_model, read_safetensors,
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
def launch(folders, tokens, tmp_path_factory):
    """The one 2-process launch: every layout, then the round trip."""
    tmp = str(tmp_path_factory.mktemp("round_trip"))
    results = run_distributed(layout_body, 2, args=(folders, tokens, tmp), timeout_s=600)
    return tmp, results


@pytest.fixture(scope="module")
def layouts(launch):
    merged: dict = {}
    for res in (r["layouts"] for r in launch[1]):  # the last stage's ranks carry the numbers
        for key, value in res.items():
            slot = merged.setdefault(key, {})
            for k, v in value.items():
                if k == "train_lm_loss":
                    if all(x is not None for x in v):
                        slot[k] = v
                else:
                    slot[k] = v
    return merged


CASES = [("untied_gqa", layout) for layout in LAYOUTS] + [("tied", "pp2")]  # tied: PP splits it


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
    print(f"{'-'.join(case)}: max |logit - HF| {err:.2e}, |mean CE - HF| "
          f"{(ce.mean() - ce_hf.mean()).abs().item():.2e}, max |entropy - HF| "
          f"{(entropy - entropy_hf).abs().max().item():.2e}")  # shown with pytest -s


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
def round_trip(launch):
    tmp, results = launch
    return tmp, results[0]["round_trip"]


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


# ---------------------------------------------------------------- refusals

BASE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
               "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 176,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
               "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}

REFUSED = {
    "attention_bias": ({"attention_bias": True}, "attention_bias=true is not supported"),
    "mlp_bias": ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    "rope_scaling": ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
                     "rope_scaling.rope_type='linear' is not supported"),
    "rope_parameters": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
                        "rope_parameters.rope_type='yarn' is not supported"),
    "architecture": ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]},
                     "model_type='gemma'"),
    "moe": ({"num_local_experts": 8}, "num_local_experts=8: mixture-of-experts"),
    "sliding_window": ({"sliding_window": 4096}, "sliding_window=4096 is not supported"),
    "activation": ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
}


def _config_folder(tmp_path, changes: dict) -> str:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**BASE_CONFIG, **changes}))
    return str(folder)


def _train_main(capsys, monkeypatch, overrides: list[str]) -> tuple[int, list[str]]:
    from megatron_mile.train import main

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)  # a world of one, restored after the test

    code = main(["--config", "tiny", *overrides])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_models_are_refused_naming_the_field(tmp_path, capsys, monkeypatch, case):
    changes, message = REFUSED[case]
    folder = _config_folder(tmp_path, changes)
    code, lines = _train_main(capsys, monkeypatch, [f"checkpoint.init_from_hf={folder}"])
    assert code == 2 and len(lines) == 1, lines
    assert message in lines[0] and "config.json" in lines[0], lines[0]


def test_explicit_shape_that_disagrees_names_both(tmp_path, capsys, monkeypatch):
    folder = _config_folder(tmp_path, {})
    code, lines = _train_main(capsys, monkeypatch, [
        f"checkpoint.init_from_hf={folder}", "model.hidden_size=128", "model.num_query_groups=4"])
    assert code == 2 and len(lines) == 1, lines
    assert "model.hidden_size=128 (config) vs 64 (from hidden_size)" in lines[0]
    assert "model.num_query_groups=4 (config) vs 2 (from num_key_value_heads)" in lines[0]


def test_shape_fields_come_from_config_json(tmp_path):
    from megatron_mile.run_config import load_run_config

    folder = _config_folder(tmp_path, {"rope_theta": 500000.0, "tie_word_embeddings": True})
    cfg = load_run_config("tiny", [f"checkpoint.init_from_hf={folder}"])
    m = cfg.model
    assert (m.num_query_groups, m.norm_epsilon, m.rotary_base, m.vocab_size) == \
        (2, 1e-6, 500000, VOCAB)
    assert m.untie_embeddings is False and m.ffn_size == 176


def test_missing_folder_and_bias_tensors(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from megatron_mile.checkpoint_hf import HFCheckpoint
    from megatron_mile.training import checkpoint

    code, lines = _train_main(capsys, monkeypatch,
                              [f"checkpoint.init_from_hf={tmp_path}/absent"])
    assert code == 2 and len(lines) == 1 and "no such directory" in lines[0], lines
    folder = _config_folder(tmp_path, {})
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
              os.path.join(folder, "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="q_proj.bias is a bias"):
        HFCheckpoint(folder)


@pytest.mark.slow
def test_cli_refusal_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    folder = _config_folder(tmp_path, {"attention_bias": True})
    proc = subprocess.run([sys.executable, "-m", "megatron_mile.cli.import_hf", "--hf", folder,
                           "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("megatron-mile-import-hf: ConfigError:") and \
        "attention_bias" in lines[-1], lines
