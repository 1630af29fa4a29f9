"""The configuration: shipped configs load, overrides apply, bad values fail with the field
named, and the command line exits early with those messages."""

import importlib.util
import os
import subprocess
import sys

import pytest

from megatron_mile.config import ConfigError, load_config, parse_overrides
from megatron_mile.run_config import load_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = ["model.transformer_impl=local", "data.data_path=[/data/x]",
         "data.tokenizer_model=/data/t.model"]


def test_tiny_loads_with_typed_overrides():
    cfg = load_config("tiny", ["loss.gamma=2", "loss.type=focal", "optimizer.lr=1e-3",
                               "parallel.sequence_parallel=true",
                               "parallel.tensor_model_parallel_size=2"], world_size=2)
    assert cfg.loss.gamma == 2.0 and isinstance(cfg.loss.gamma, float)
    assert cfg.loss.type == "focal" and cfg.optimizer.lr == 1e-3
    assert cfg.parallel.sequence_parallel is True


@pytest.mark.parametrize("name,world,layers,tp", [("llama_468m", 16, 24, 1),
                                                  ("llama_1.2b", 32, 16, 2),
                                                  ("llama_6.7b", 128, 32, 4)])
def test_paper_configs(name, world, layers, tp):
    cfg = load_config(name, LOCAL, world_size=world)
    assert cfg.model.num_layers == layers and cfg.parallel.tensor_model_parallel_size == tp
    assert cfg.model.vocab_size == 32000 and cfg.model.init_method_std == 0.01
    o = cfg.optimizer
    assert (o.lr, o.weight_decay, o.adam_beta1, o.adam_beta2, o.lr_warmup_iters) == \
        (3e-4, 0.1, 0.9, 0.95, 2000)
    assert cfg.loss.type == "mile" and cfg.loss.gamma == 1.0 and cfg.loss.sigma == 1.0


@pytest.mark.parametrize("overrides,world,match", [
    (["model.hidden_size=-8"], 1, r"model.hidden_size=-8 must be > 0"),
    (["model.hidden_sise=64"], 1, r"unknown field\(s\) model.hidden_sise; model has: num_layers"),
    (["loss.gamma=-1"], 1, r"loss.gamma=-1.0 must be a finite number >= 0"),
    (["loss.type=mse"], 1, r"loss.type='mse' is not one of"),
    (["loss.gamma=abc"], 1, r"loss.gamma='abc' must be a number"),
    (["training.train_iters=1.5"], 1, r"training.train_iters=1.5 must be an integer"),
    (["parallel.sequence_parallel=true"], 1, r"sequence_parallel=true needs .*tensor_model_parallel_size > 1"),
    (["parallel.tensor_model_parallel_size=2"], 3, r"world size 3 is not divisible by tensor x pipeline"),
    (["parallel.tensor_model_parallel_size=8"], 8, r"num_attention_heads=4 is not divisible by .*tensor_model_parallel_size=8"),
    (["parallel.pipeline_model_parallel_size=3"], 3, r"num_layers=2 is not divisible by the 3 pipeline stages"),
    (["training.global_batch_size=6"], 1, r"global_batch_size=6 is not divisible by .*micro_batch_size=4"),
    (["precision.fp8=hybrid"], 1, r"needs Transformer Engine|needs model.transformer_impl=transformer_engine"),
    (["precision.dtype=fp64"], 1, r"precision.dtype='fp64' is not one of"),
    (["parallel.context_parallel_size=2", "model.seq_length=66"], 2,
     r"model.seq_length=66 is not divisible by 2 x parallel.context_parallel_size = 4"),
    (["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=4",
      "parallel.sequence_parallel=true", "model.seq_length=36"], 8,
     r"seq_length / parallel.context_parallel_size = 18 is not divisible by .*"
     r"tensor_model_parallel_size=4"),
    (["optimizer.min_lr=1.0"], 1, r"optimizer.min_lr=1.0 must be in \[0, optimizer.lr="),
    (["data.mock=false"], 1, r"data.data_path=\[\]: give at least one dataset prefix"),
    (["bogus"], 1, r"override 'bogus' is not of the form section.field=value"),
])
def test_bad_values_name_the_field(overrides, world, match):
    with pytest.raises(ConfigError, match=match):  # the kernel checks too: as a run sets up
        load_run_config("tiny", overrides, world_size=world)


def test_transformer_engine_missing_is_a_config_error():
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ConfigError, match=r"precision.fp8='e4m3' needs Transformer Engine"):
        load_run_config("tiny", ["model.transformer_impl=transformer_engine", "precision.fp8=e4m3"],
                    world_size=1)


def test_context_parallel_runs_on_the_local_spec_without_transformer_engine():
    """CP no longer needs TE: the local spec has its own CP attention (test_context_parallel)."""
    cfg = load_config("tiny", ["parallel.context_parallel_size=2",
                               "model.transformer_impl=local"], world_size=4)
    assert cfg.parallel.context_parallel_size == 2 and cfg.data_parallel_size(4) == 2


def test_unknown_config_name():
    with pytest.raises(ConfigError, match=r"config 'huge' is neither a file nor a shipped "
                                          r"config \(shipped: .*llama_6.7b, quickstart, tiny"):
        load_config("huge")


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=[x, 0.5]", "a.c=true", "d=null"]) == \
        {"a": {"b": ["x", 0.5], "c": True}, "d": None}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "megatron_mile.train", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_bad_value_exits_2_before_building_anything():
    proc = _cli("--config", "tiny", "loss.sigma=-1", "loss.gamma=0.5")
    assert proc.returncode == 2, proc.stderr
    assert "configuration error: loss.sigma=-1.0 < 0 needs an integer loss.gamma" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_missing_data_path_fails_fast_with_the_fix(tmp_path):
    missing = tmp_path / "nope" / "corpus_text_document"
    proc = _cli("--config", "tiny", "data.mock=false", f"data.data_path=[{missing}]")
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "megatron-mile-preprocess --input" in proc.stderr, proc.stderr[-2000:]
    assert "iteration" not in proc.stdout  # failed before training


def test_configuration_reference_is_generated_and_current():
    # The script documents the megatron_mile that Python imports: this checkout's.
    proc = subprocess.run([sys.executable, "tools/gen_config_docs.py", "--check"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_config_field_has_a_docstring():
    import dataclasses
    import typing

    spec = importlib.util.spec_from_file_location("gen_config_docs",
                                                  os.path.join(REPO, "tools", "gen_config_docs.py"))
    gen_config_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_config_docs)

    from megatron_mile.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    missing = [f"{s.name}.{f.name}" for s in dataclasses.fields(TrainConfig)
               for f in dataclasses.fields(hints[s.name])
               if not gen_config_docs.field_docs(hints[s.name]).get(f.name)]
    assert not missing, f"fields without a docstring: {missing}"


@pytest.mark.slow
def test_cli_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = _cli("--config", "tiny", f"checkpoint.load={missing}", "training.train_iters=2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "CheckpointError" in proc.stderr and str(missing) in proc.stderr
    assert "iteration" not in proc.stdout  # no silent fresh start


# What importing the configuration may load of the package: itself, its error types and the
# data section's dataclass (megatron_mile.data imports nothing). Anything else (the Hugging
# Face code, the model, the kernels, training) is imported where a run is set up.
CONFIG_LEAF_MODULES = {"megatron_mile", "megatron_mile.config", "megatron_mile.errors",
                       "megatron_mile.data", "megatron_mile.data.config"}


def test_config_is_a_leaf_module():
    """A fresh interpreter that imports only megatron_mile.config loads nothing else of the
    package, nor torch or megatron-core: no import cycle through the HF, kernel or training
    modules (issue 19)."""
    code = ("import json, sys; import megatron_mile.config; "
            "print(json.dumps(sorted(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(__import__("json").loads(proc.stdout.splitlines()[-1]))
    ours = {m for m in loaded if m == "megatron_mile" or m.startswith("megatron_mile.")}
    assert ours - CONFIG_LEAF_MODULES == set(), sorted(ours - CONFIG_LEAF_MODULES)
    assert "megatron_mile.config" in ours
    heavy = {m for m in loaded if m.split(".")[0] in ("torch", "megatron", "safetensors",
                                                       "transformers")}
    assert heavy == set(), sorted(heavy)[:10]
