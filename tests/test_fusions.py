"""Fused kernels: each megatron-core fusion flag is on exactly where its kernel can run.

The ``llama_6.7b`` config's TransformerConfig is built in a subprocess where CUDA, Transformer
Engine and apex are faked (``torch.cuda.is_available`` patched, the extension modules
registered as importable, megatron's TE-provided fused RoPE stubbed, since megatron checks for
it when the config is built), as on NVIDIA's container, on a GPU without TE and on CPU. The
values must match the table in docs/launching.md, which users read.

The subprocess imports torch and megatron-core once (most of its time), then forks one child
per scenario: each fakes its own machine in a copy of that process, so no scenario's fakes
reach another's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mile.fusions import (
    FUSIONS,
    Kernels,
    fusion_settings,
    kernel_notice,
    resolve_transformer_impl,
)

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("gpu_te", "gpu", "cpu")  # the table's columns, in order

_PROBE = r"""
import importlib.machinery, json, os, sys, traceback, types
import torch
import megatron.core.models.common.embeddings.rope_utils as rope_utils
from megatron_mile.config import load_config
from megatron_mile.fusions import FUSIONS, Kernels, resolve_transformer_impl
from megatron_mile.model import transformer_config


def probe(scenario):
    if scenario != "cpu":
        torch.cuda.is_available = lambda: True
    if scenario == "gpu_te":  # NVIDIA's PyTorch container: Transformer Engine and apex
        for name in ("transformer_engine", "fused_weight_gradient_mlp_cuda",
                     "scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                     "apex", "apex.contrib", "apex.contrib.layer_norm"):
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module
        rope_utils.fused_apply_rotary_pos_emb = lambda *args, **kwargs: None  # TE's kernel

    cfg = load_config("llama_6.7b", ["data.data_path=[/data/x]",
                                     "data.tokenizer_model=/data/t.model"], world_size=128)
    config = transformer_config(cfg, use_cpu_initialization=scenario == "cpu")
    kernels = Kernels.detect()
    return {"transformer_impl": resolve_transformer_impl(cfg.model.transformer_impl, kernels),
            **{f.field: getattr(config, f.field) for f in FUSIONS}}


for scenario in sys.argv[1:]:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the child fakes its machine, prints one line and exits
        try:
            print(json.dumps({"scenario": scenario, **probe(scenario)}), flush=True)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"scenario {scenario} failed")
"""


@pytest.fixture(scope="module")
def built() -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *SCENARIOS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    out = {line.pop("scenario"): line for line in lines}
    assert list(out) == list(SCENARIOS), proc.stdout[-3000:]
    return out


def _docs_table() -> dict[str, list[str]]:
    """docs/launching.md's fusion table: field -> [GPU+TE, GPU, CPU, Megatron-LM] cells."""
    text = (REPO / "docs" / "launching.md").read_text()
    section = text[text.index("## Fused kernels"):]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        m = re.match(r"\|\s*`(\w+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_llama_6_7b_on_a_gpu_with_transformer_engine(built):
    gpu_te = dict(built["gpu_te"])
    assert gpu_te.pop("transformer_impl") == "transformer_engine"
    # Everything Megatron-LM turns on for these LLaMA arguments, except megatron's CE fusion,
    # which the project's own loss replaces.
    assert gpu_te == {f.field: f.field != "cross_entropy_loss_fusion" for f in FUSIONS}


def test_gpu_without_transformer_engine_keeps_the_jit_fusions_only(built):
    gpu = dict(built["gpu"])
    assert gpu.pop("transformer_impl") == "local"
    on = {field for field, value in gpu.items() if value}
    assert on == {"bias_activation_fusion", "bias_dropout_fusion"}


def test_cpu_runs_every_path_unfused(built):
    cpu = dict(built["cpu"])
    assert cpu.pop("transformer_impl") == "local"
    assert not any(cpu.values()), cpu


def test_the_documented_table_is_what_the_code_does(built):
    table = _docs_table()
    assert set(table) == {f.field for f in FUSIONS} | {"transformer_impl"}, table.keys()
    for field, cells in table.items():
        for scenario, cell in zip(SCENARIOS, cells):
            value = built[scenario][field]
            expected = value if isinstance(value, str) else ("on" if value else "off")
            assert cell.split()[0].strip("`") == expected, (field, scenario, cell)


def test_auto_picks_transformer_engine_only_with_cuda():
    def kernels(cuda, te):
        return Kernels(cuda=cuda, transformer_engine=te, apex_gradient_accumulation=False,
                       apex_masked_softmax=False, apex_persist_layer_norm=False)

    assert resolve_transformer_impl("auto", kernels(True, True)) == "transformer_engine"
    assert resolve_transformer_impl("auto", kernels(False, True)) == "local"
    assert resolve_transformer_impl("auto", kernels(True, False)) == "local"
    assert resolve_transformer_impl("local", kernels(True, True)) == "local"
    # Without apex's softmax kernels, the local spec must not ask for the fused softmax.
    assert not fusion_settings("local", kernels(True, False))["masked_softmax_fusion"]


def test_one_kernel_line_on_a_gpu_with_something_missing_none_on_cpu():
    def kernels(cuda, te, apex):
        return Kernels(cuda=cuda, transformer_engine=te, apex_gradient_accumulation=apex,
                       apex_masked_softmax=apex, apex_persist_layer_norm=apex)

    line = kernel_notice("local", kernels(True, False, False))
    assert line.startswith("kernels: Transformer Engine (") and "apex (" in line, line
    assert "gradient_accumulation_fusion, apply_rope_fusion, masked_softmax_fusion, " \
           "persist_layer_norm stay off" in line, line
    assert "\n" not in line
    assert kernel_notice("local", kernels(False, False, False)) is None  # CPU: expected
    assert kernel_notice("transformer_engine", kernels(True, True, True)) is None
