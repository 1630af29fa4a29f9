"""megatron-mile-estimate-memory: parameter counts against the paper, the memory arithmetic on
a hand-computed case, and its layouts against examples/slurm/submit.sh's presets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_mile.cli import estimate_memory as em

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, billions", [
    ("llama_468m", 0.468), ("llama_1.2b", 1.2), ("llama_6.7b", 6.7)])
def test_parameter_counts_match_the_paper(name, billions):
    nodes = {config: nodes for config, nodes in em.PRESETS.values()}[name]
    n = em.total_params(em.load_run(name, world_size=nodes * em.GPUS_PER_NODE).shape)
    assert abs(n / 1e9 - billions) / billions < 0.01


def test_memory_of_a_hand_computed_layout():
    # 2 layers, h=8, f=16, 2 heads, s=4, vocab 100 (padded to 128), TP=2, DP=2, micro-batch 3.
    shape = em.Shape("t", layers=2, hidden=8, heads=2, ffn=16, seq=4, vocab=100)
    layout = em.Layout(tp=2, pp=1, dp=2, micro_batch=3)
    v = 256                                               # 128 x TP
    layer = 4 * 8 * 8 + 3 * 8 * 16 + 2 * 8                # 656
    params = 2 * layer / 2 + 2 * v * 8 / 2                # layers and both embeddings over TP
    per_token_layer = (16 * 8 + 6 * 16) / 2               # 112 bytes
    tokens = 3 * 4
    got = em.estimate(shape, layout, "none")
    assert got["params_per_rank"] == params
    assert got["weights_grads"] * em.GiB == pytest.approx(params * 6)
    assert got["optimizer"] * em.GiB == pytest.approx(params * 12 / 2)
    activations = tokens * (2 * per_token_layer) + tokens * 6 * v / 2
    assert got["activations"] * em.GiB == pytest.approx(activations)
    full = em.estimate(shape, layout, "full")["activations"] * em.GiB
    assert full == pytest.approx(tokens * (2 * 2 * 8 / 2 + per_token_layer) + tokens * 6 * v / 2)
    unfused = em.estimate(shape, em.Layout(tp=2, dp=2, micro_batch=3, flash_attention=False))
    assert unfused["activations"] * em.GiB == pytest.approx(activations + tokens * 2 * 2 * 2 * 4 / 2)


def test_presets_match_submit_sh():
    text = (ROOT / "examples" / "slurm" / "submit.sh").read_text()
    for size, (config, nodes) in em.PRESETS.items():
        line = re.search(rf"^\s+{re.escape(size)}\) (.*?);;", text, re.M | re.S).group(1)
        values = dict(re.findall(r'"\$\{(\w+):=([^}]*)\}"', line))
        assert values["CONFIG"] == config
        assert int(values["NODES"]) == (nodes or 1)


@pytest.mark.parametrize("size", ["468m", "1.2b", "6.7b"])
def test_submitted_layouts_are_valid_and_fit_an_80_gib_gpu(size):
    config, nodes = em.PRESETS[size]
    run = em.load_run(config, world_size=nodes * em.GPUS_PER_NODE)  # the config's own checks
    total = em.estimate(run.shape, run.layout, run.recompute)["total"]
    assert total + 8 < 80, (size, total)
