"""The model families (docs/models.md) against transformers' own classes: Llama-2 (multi-head),
Llama-3 (GQA, rope_theta 500000, sharded safetensors), Llama-3.1 / 3.2 (llama3 RoPE scaling,
factor 8 / 32, 3.2 tied), Qwen2.5 (q/k/v biases, tied), Qwen3 (q/k norms, head_dim 32 with
hidden 64, tied) and Mistral (a sliding window covering the sequence), each built small and
random by its own config class and save_pretrained.

One 2-process launch runs the whole matrix: every family imported through
checkpoint.init_from_hf into TP=1 (DP=2), TP=2 + SP and PP=2, its fp32 logits and its first
training step's lm_loss and MiLe objective compared with transformers' forward on the same
batch; then import_hf + export_hf of every family, whose tensors must be bit-exact and whose
folder must give transformers' logits bit-exactly. The refusals are single-process and fast.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hf_fixtures import (
    FAMILY_LAYOUTS, FAMILY_MODELS, FAMILY_SEQ, FAMILY_VOCAB, family_matrix_body,
    make_family_model, read_safetensors,
)
from megatron_mile.testing import run_distributed

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LOGITS_ATOL = 1e-5  # fp32; the largest difference seen: 2.4e-6 (printed with -s)
LOSS_TOL = 2e-6  # the largest seen: 6.6e-7
FAMILIES = list(FAMILY_MODELS)
CASES = [(name, layout) for name in FAMILIES for layout in FAMILY_LAYOUTS]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    out = {name: str(tmp / name) for name in FAMILIES}
    for name, folder in out.items():
        make_family_model(folder, name)
    return out


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(3).integers(0, FAMILY_VOCAB, size=(2, FAMILY_SEQ + 1)).tolist()


@pytest.fixture(scope="module")
def matrix(folders, tokens, tmp_path_factory):
    """The one launch: every (family, layout), then every round trip."""
    tmp = str(tmp_path_factory.mktemp("families_round_trip"))
    results = run_distributed(family_matrix_body, 2, args=(folders, tokens, tmp),
                              timeout_s=600)
    merged: dict = {}
    for res in (r["layouts"] for r in results):  # the last stage's ranks carry the logits
        for key, value in res.items():
            merged.setdefault(key, {}).update({k: v for k, v in value.items()
                                               if k == "logits" or None not in v})
    return tmp, merged, results[0]["round_trip"]


@pytest.fixture(scope="module")
def hf_reference(folders, tokens):
    """transformers' fp32 logits of every family on the batch's inputs."""
    inputs = torch.tensor([t[:-1] for t in tokens])
    out = {}
    for name, folder in folders.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert type(model).__name__ == FAMILY_MODELS[name][1]
        with torch.no_grad():
            out[name] = model.eval()(inputs).logits
    return out


def _hf_losses(logits: torch.Tensor, tokens: list) -> tuple[float, float]:
    """lm_loss (mean CE) and the MiLe objective (paper normalisation, gamma = sigma = 1) of
    the batch, from transformers' logits through the dense reference of megatron_mile.loss."""
    from megatron_mile.loss.reference import paper_objective, token_losses

    labels = torch.tensor([t[1:] for t in tokens])
    wce, weight = token_losses(logits.double(), labels, loss_type="mile")
    ce = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), labels.flatten())
    objective = paper_objective([wce.reshape(1, -1)], [weight.reshape(1, -1)],
                                [torch.ones(1, wce.numel())])
    return ce.item(), objective.item()


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_imported_logits_and_first_loss_equal_transformers(matrix, hf_reference, tokens, case):
    name, layout = case
    res = matrix[1][case]
    expected = hf_reference[name]  # [b, s, V]
    assert expected.std() > 0.1  # not vacuous
    logits = torch.tensor(res["logits"])  # [b, s, padded V]
    assert logits.shape == (2, FAMILY_SEQ, 256)
    err = (logits[..., :FAMILY_VOCAB] - expected).abs().max().item()
    lm_loss, objective = _hf_losses(expected, tokens)
    print(f"{name}-{layout}: max |logit - HF| {err:.1e}, |lm_loss - HF| "
          f"{abs(res['lm_loss'][0] - lm_loss):.1e}")  # shown with pytest -s
    assert err <= LOGITS_ATOL, f"{case}: max |megatron - HF| logit = {err}"
    assert abs(res["lm_loss"][0] - lm_loss) <= LOSS_TOL, (res["lm_loss"][0], lm_loss)
    assert abs(res["objective"][0] - objective) <= LOSS_TOL, (res["objective"][0], objective)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_second_step_agrees_across_layouts(matrix, name):
    """The first update (gradients, their TP/SP/PP reductions: Qwen3's q/k norm gradients
    are summed over TP) is the same in every layout, and lowers the loss."""
    second = {layout: matrix[1][(name, layout)]["lm_loss"] for layout in FAMILY_LAYOUTS}
    for layout, (first, after) in second.items():
        assert after < first, (layout, first, after)
    values = [after for _, after in second.values()]
    assert max(values) - min(values) <= 1e-5, second


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_count_is_the_models(matrix, name):
    """model.num_parameters (logs, FLOPs, memory estimates) counts Qwen2's biases, Qwen3's
    q/k norms and head width: the built model's own count."""
    built, counted = matrix[1][(name, "tp1")]["parameters"]
    assert built == counted, (built, counted)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_export_of_import_is_bit_exact(folders, matrix, hf_reference, tokens, name):
    tmp, _, configs = matrix
    exported_folder = os.path.join(tmp, f"export_{name}")
    original = read_safetensors(folders[name])
    exported = read_safetensors(exported_folder)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    with open(os.path.join(folders[name], "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    config = configs[name]
    for key in ("architectures", "model_type", "vocab_size", "hidden_size",
                "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "sliding_window"):
        assert config.get(key) == hf.get(key), key
    assert config["head_dim"] == (hf.get("head_dim") or 64 // 4)  # Qwen2 writes none
    model = transformers.AutoModelForCausalLM.from_pretrained(exported_folder,
                                                              dtype=torch.float32)
    assert model.config.rope_parameters == hf["rope_parameters"]  # Llama-3.x scaling included
    with torch.no_grad():
        logits = model.eval()(torch.tensor([t[:-1] for t in tokens])).logits
    assert torch.equal(logits, hf_reference[name])


# ---------------------------------------------------------------- refusals

BASE = {"vocab_size": FAMILY_VOCAB, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
LLAMA3_1 = {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}}
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32}
MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}

REFUSED = {
    "llama3-low-freq-factor": (
        {**LLAMA3_1, "rope_scaling": {**LLAMA3_1["rope_scaling"], "low_freq_factor": 2.0}},
        "rope_scaling.low_freq_factor=2.0 is not supported"),
    "llama3-original-context": (
        {**LLAMA, "rope_parameters": {**LLAMA3_1["rope_scaling"], "rope_theta": 5e5,
                                      "original_max_position_embeddings": 4096}},
        "rope_parameters.original_max_position_embeddings=4096 is not supported"),
    "llama-yarn": ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                   "rope_scaling.rope_type='yarn' is not supported"),
    "qwen2-llama3-scaling": (
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
         "rope_scaling": LLAMA3_1["rope_scaling"]},
        "rope_scaling.rope_type='llama3' is not supported"),
    "qwen3-bias": ({**QWEN3, "attention_bias": True}, "attention_bias=true is not supported"),
    "qwen3-sliding": ({**QWEN3, "use_sliding_window": True},
                      "use_sliding_window=true is not supported"),
    "qwen3-moe": ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                   "num_experts": 8}, "model_type='qwen3_moe'"),
    "mistral-moe": ({**MISTRAL, "num_local_experts": 8},
                    "num_local_experts=8: mixture-of-experts"),
    "mistral-bias": ({**MISTRAL, "attention_bias": True}, "attention_bias=true"),
    # the tiny config's seq_length is 64: a window of 63 would mask the first token for the last
    "mistral-window": ({**MISTRAL, "sliding_window": 63}, "model.sliding_window=63"),
}


def _config_folder(tmp_path, changes: dict) -> str:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**BASE, **changes}))
    return str(folder)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_models_are_refused_naming_the_field(tmp_path, capsys, monkeypatch, case):
    from megatron_mile.train import main

    changes, message = REFUSED[case]
    folder = _config_folder(tmp_path, changes)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)  # a world of one, restored after the test
    code = main(["--config", "tiny", f"checkpoint.init_from_hf={folder}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert message in lines[0], lines[0]
    assert "config.json" in lines[0] or "sliding_window" in lines[0], lines[0]


def test_family_fields_come_from_config_json(tmp_path):
    """Llama-3.1's scaling factor, Qwen3's head width and a Mistral window that covers the
    run's sequence become model fields; the export writes them back."""
    from megatron_mile.hf.config import export_hf_config
    from megatron_mile.run_config import load_run_config

    cases = {"llama3.1": (LLAMA3_1, ("rope_scaling_factor", 8.0)),
             "qwen3": (QWEN3, ("head_dim", 32)),
             "mistral": ({**MISTRAL, "sliding_window": 64}, ("sliding_window", 64))}
    for name, (changes, (field, value)) in cases.items():
        (tmp_path / name).mkdir()
        folder = _config_folder(tmp_path / name, changes)
        cfg = load_run_config("tiny", [f"checkpoint.init_from_hf={folder}"])
        assert getattr(cfg.model, field) == value, name
        exported = export_hf_config(cfg, FAMILY_VOCAB, {})
        assert exported["architectures"] == changes["architectures"]
        for key in ("rope_scaling", "head_dim", "sliding_window"):
            if key in changes:
                assert exported[key] == changes[key], (name, key)
