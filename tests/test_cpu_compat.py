"""The CPU compatibility layer: what it patches, that it patches nothing under CUDA, and that it
refuses a megatron-core release it was not written for.

Each case runs ``install_cpu_compat`` in a fresh interpreter (it patches process-wide). That
megatron-core then trains correctly on CPU processes -- every TP/SP/PP/VPP/DP layout giving
the single-process loss curve -- is tests/test_training.py's job, on the product's trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow


# --- install_cpu_compat in a fresh interpreter (it patches process-wide) -----------------------

# Every change PATCHES lists, as (module, attribute; None = a logging filter on that logger).
EXPECTED_TARGETS = [
    ("torch.cuda", "current_device"), ("torch.cuda", "synchronize"),
    ("torch.cuda", "manual_seed"), ("torch.cuda.random", "manual_seed"),
    ("torch.cuda", "get_rng_state"), ("torch.cuda.random", "get_rng_state"),
    ("torch.cuda", "set_rng_state"), ("torch.cuda.random", "set_rng_state"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", None),
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
]

# argv: "cpu" | "cuda" (pretend CUDA is there), then a megatron-core version to pretend, or "".
_PROBE = textwrap.dedent("""
    import importlib, json, logging, os, sys
    import torch
    if sys.argv[1] == "cuda":
        torch.cuda.is_available = lambda: True       # pretend: the layer must not touch anything
    if sys.argv[2]:
        from megatron.core import package_info
        package_info.__version__ = sys.argv[2]
    from megatron_mile import cpu_compat, launch

    def target(patch):
        # What the patch's target holds now: the attribute, or whether the filter is on.
        if patch.attr is None:
            return patch.replacement in logging.getLogger(patch.module).filters
        return getattr(importlib.import_module(patch.module), patch.attr)

    def holds_replacement(patch):
        now = target(patch)
        return now is True if patch.attr is None else now is patch.replacement

    originals = [target(p) for p in cpu_compat.PATCHES]
    out = {"targets": [[p.module, p.attr] for p in cpu_compat.PATCHES],
           "why": [p.why for p in cpu_compat.PATCHES],
           "replaced_before": [i for i, p in enumerate(cpu_compat.PATCHES) if holds_replacement(p)]}
    try:
        cpu_compat.install_cpu_compat()
        cpu_compat.install_cpu_compat()                  # idempotent
    except RuntimeError as err:
        out["error"] = str(err)
    out.update(
        replaced=[i for i, p in enumerate(cpu_compat.PATCHES) if holds_replacement(p)],
        unchanged=[i for i, (p, o) in enumerate(zip(cpu_compat.PATCHES, originals))
                   if target(p) is o],
        filters=len(logging.getLogger("megatron.core.tensor_parallel.random").filters),
        mode_stack=torch._C._len_torch_function_stack(),
        installed=cpu_compat.cpu_compat_installed(),
    )
    if sys.argv[1] == "cpu" and "error" not in out:
        t = torch.zeros(3, device="cuda")
        out["zeros_device"] = str(t.device)
        out["to_cuda"] = str(torch.ones(2).to("cuda:0").device)
        x = torch.ones(2)
        out["cuda_is_self"] = x.cuda() is x
        out["types"] = [torch.ones(1, dtype=d).type()
                        for d in (torch.float32, torch.bfloat16, torch.float16, torch.int64)]
        out["type_cast"] = torch.ones(1).type(torch.float64).dtype == torch.float64
        out["current_device"] = str(torch.cuda.current_device())
        out["synchronize"] = torch.cuda.synchronize() is None
        from megatron.core.transformer.utils import get_default_causal_mask
        out["mask"] = get_default_causal_mask(3).tolist()
        # RNG tracker: forked streams differ from the default one and are reproducible.
        from megatron.core import tensor_parallel
        tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
        before = torch.get_rng_state()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        out["fork_restores_default"] = bool(torch.equal(before, torch.get_rng_state()))
        default = torch.rand(4)
        torch.cuda.manual_seed(5)
        out["default_reseeded"] = bool(torch.equal(torch.rand(4), default))
        out["fork_differs"] = not torch.equal(forked, default)
        # initialize_distributed from a torchrun-like environment.
        os.environ.pop("RANK", None)
        launch.default_single_process_env()
        out["init_device"] = str(launch.initialize_distributed(timeout_minutes=1))
        # RoPE under context parallelism: megatron builds its chunk index with
        # pin_memory=True (dropped by the mode); rank 0 of 1 keeps both halves in order.
        from megatron.core.models.common.embeddings.rope_utils import (
            get_pos_emb_on_this_cp_rank,
        )
        out["pinned"] = get_pos_emb_on_this_cp_rank(
            torch.arange(4.0).view(4, 1), 0, torch.distributed.group.WORLD).flatten().tolist()
        out["backend"] = str(torch.distributed.get_backend())
        torch.distributed.destroy_process_group()
    print("RESULT" + json.dumps(out))
""")


def _run_probe(mode: str, version: str = "") -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode, version], capture_output=True,
                          text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _assert_table_is_the_expected_one(out: dict) -> None:
    assert [tuple(t) for t in out["targets"]] == EXPECTED_TARGETS
    assert all(out["why"]), "every patch says why"
    assert out["replaced_before"] == []


def test_install_is_a_strict_noop_when_cuda_is_available():
    # A megatron-core version the patches were not written for changes nothing with CUDA either.
    for version in ("", "0.17.0"):
        out = _run_probe("cuda", version)
        _assert_table_is_the_expected_one(out)
        assert "error" not in out
        assert out["replaced"] == [] and out["unchanged"] == list(range(len(EXPECTED_TARGETS)))
        assert out["filters"] == 0 and out["mode_stack"] == 0 and out["installed"] is False


def test_install_on_cpu_applies_every_patch_once_and_maps_cuda_to_cpu():
    out = _run_probe("cpu")
    _assert_table_is_the_expected_one(out)
    assert "error" not in out
    assert out["replaced"] == list(range(len(EXPECTED_TARGETS))) and out["unchanged"] == []
    assert out["filters"] == 1 and out["mode_stack"] == 1 and out["installed"] is True
    assert out["zeros_device"] == "cpu" and out["to_cuda"] == "cpu" and out["cuda_is_self"]
    assert out["types"] == ["torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor",
                            "torch.cuda.HalfTensor", "torch.LongTensor"]
    assert out["type_cast"] is True
    assert out["current_device"] == "cpu" and out["synchronize"] is True
    assert out["mask"] == [[False, True, True], [False, False, True], [False, False, False]]
    assert out["fork_restores_default"] and out["default_reseeded"] and out["fork_differs"]
    assert out["init_device"] == "cpu" and out["backend"] == "gloo"
    assert out["pinned"] == [0.0, 1.0, 2.0, 3.0]


def test_install_on_cpu_refuses_another_megatron_core_release():
    out = _run_probe("cpu", "0.17.0")
    assert out["error"] == ("megatron_mile.cpu_compat patches megatron-core 0.16.1 internals but "
                            "megatron-core 0.17.0 is installed: pip install megatron-core==0.16.1")
    assert out["replaced"] == [] and out["unchanged"] == list(range(len(EXPECTED_TARGETS)))
    assert out["mode_stack"] == 0 and out["installed"] is False
