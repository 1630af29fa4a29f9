"""megatron_mile.memory and megatron-mile-estimate-memory: parameter counts against the paper,
the memory arithmetic on a hand-computed case, the submitted layouts against
examples/slurm/submit.sh's presets, and the command line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_mile.cli import estimate_memory as cli
from megatron_mile.config import config_from_dict
from megatron_mile.memory import GiB, Run, estimate, load_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, billions", [
    ("llama_468m", 0.468), ("llama_1.2b", 1.2), ("llama_6.7b", 6.7)])
def test_parameter_counts_match_the_paper(name, billions):
    nodes = {config: nodes for config, nodes in cli.PRESETS.values()}[name]
    n = load_run(name, world_size=nodes * cli.GPUS_PER_NODE).parameters()
    assert abs(n / 1e9 - billions) / billions < 0.01


def _hand_run(untie: bool = True, impl: str = "transformer_engine") -> Run:
    # 2 layers, h=8, f=16, 2 heads, s=4, vocab 100 (padded to 128 x TP), TP=2, DP=2, micro-batch 3.
    cfg = config_from_dict({
        "model": {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2,
                  "ffn_hidden_size": 16, "seq_length": 4, "vocab_size": 100,
                  "untie_embeddings": untie},
        "parallel": {"tensor_model_parallel_size": 2},
        "training": {"micro_batch_size": 3, "global_batch_size": 6},
        "data": {"mock": True, "vocab_size": 100}})
    cfg.validate(4)
    return Run("t", cfg, world_size=4, flash_attention=impl == "transformer_engine")


def test_memory_of_a_hand_computed_layout():
    run = _hand_run()
    assert (run.tp, run.pp, run.dp, run.micro_batches, run.padded_vocab) == (2, 1, 2, 1, 256)
    v = 256
    layer = 4 * 8 * 8 + 3 * 8 * 16 + 2 * 8                # 656: q, k, v, proj; SwiGLU; 2 norms
    assert run.parameters() == 2 * layer + 2 * v * 8 + 8  # + both vocabulary matrices, final norm
    params = 2 * layer / 2 + 2 * v * 8 / 2                # layers and both embeddings over TP
    per_token_layer = (16 * 8 + 6 * 16) / 2               # 112 bytes
    tokens = 3 * 4
    got = estimate(run, "none")
    assert got.params_per_rank == params
    assert got.weights_grads_gib * GiB == pytest.approx(params * 6)
    assert got.optimizer_gib * GiB == pytest.approx(params * 12 / 2)
    activations = tokens * (2 * per_token_layer) + tokens * 6 * v / 2
    assert got.activations_gib * GiB == pytest.approx(activations)
    assert got.total_gib * GiB == pytest.approx(params * 6 + params * 6 + activations)
    full = estimate(run, "full").activations_gib * GiB
    assert full == pytest.approx(tokens * (2 * 2 * 8 / 2 + per_token_layer) + tokens * 6 * v / 2)
    unfused = estimate(_hand_run(impl="local"), "none")
    assert unfused.activations_gib * GiB == pytest.approx(activations + tokens * 2 * 2 * 2 * 4 / 2)
    # Tied embeddings: one V x h matrix on the single stage.
    assert estimate(_hand_run(untie=False)).params_per_rank == 2 * layer / 2 + v * 8 / 2


def test_presets_match_submit_sh():
    text = (ROOT / "examples" / "slurm" / "submit.sh").read_text()
    for size, (config, nodes) in cli.PRESETS.items():
        line = re.search(rf"^\s+{re.escape(size)}\) (.*?);;", text, re.M | re.S).group(1)
        values = dict(re.findall(r'"\$\{(\w+):=([^}]*)\}"', line))
        assert values["CONFIG"] == config
        assert int(values["NODES"]) == (nodes or 1)


@pytest.mark.parametrize("size", ["468m", "1.2b", "6.7b"])
def test_submitted_layouts_are_valid_and_fit_an_80_gib_gpu(size):
    config, nodes = cli.PRESETS[size]
    run = load_run(config, world_size=nodes * cli.GPUS_PER_NODE)  # the config's own checks
    assert run.flash_attention  # the configs ask for transformer_engine
    assert estimate(run).total_gib + 8 < 80, (size, estimate(run))


def test_command_line_table_and_bad_layout(capsys):
    assert cli.main(["--markdown"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [f"| {size}: {config}"
                                                     for size, (config, _) in cli.PRESETS.items()]
    assert "| 6.7b: llama_6.7b | 6.741 B | 16 x 8 | 4/1/32 | 16 x 2048 | 4 | full |" in rows[-1]
    assert cli.main(["--config", "llama_6.7b", "--gpus", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-mile-estimate-memory: configuration error: world size 6 ")
    assert err.count("\n") == 1
