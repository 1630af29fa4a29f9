"""Tiny Hugging Face folders built locally with transformers' own classes (no downloads), and
the worker bodies of tests/test_hf_import.py and tests/test_families.py (importable by spawned
workers, unlike a test module)."""

from __future__ import annotations

import itertools
import json
import os

import torch

VOCAB = 1000  # not a multiple of the padding unit (64 x TP in the tiny config)
SEQ = 16
MICRO = 2

# name -> LlamaConfig fields; shapes fit the shipped tiny config (hidden 64, 4 heads,
# ffn 176), layers divisible by PP=2 x VPP=2.
MODELS = {
    "untied_gqa": dict(num_hidden_layers=4, num_key_value_heads=2, tie_word_embeddings=False,
                       rope_theta=50000.0, rms_norm_eps=1e-6),
    "tied": dict(num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=True,
                 rope_theta=10000.0, rms_norm_eps=1e-5),
}


def _randomize(model: torch.nn.Module) -> None:
    """Norm weights around 1, everything else (biases included) N(0, 0.08): a swapped norm
    or bias changes the logits."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)


def make_hf_model(folder: str, name: str, *, sharded: bool = False):
    """Save a random LlamaForCausalLM (fp32) into ``folder``; norm weights are randomised too,
    so a swapped norm changes the logits."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176,
                                      num_attention_heads=4, max_position_embeddings=256,
                                      **MODELS[name])
    torch.manual_seed(len(name))
    model = transformers.LlamaForCausalLM(config).eval()
    _randomize(model)
    model.save_pretrained(folder, max_shard_size="200KB" if sharded else "10GB")
    return model


def hf_logits(folder: str, tokens: list) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


# ---------------------------------------------------------------- worker bodies

LAYOUTS = {
    "tp1-dp2-distopt": ["parallel.use_distributed_optimizer=true"],
    "tp2-sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "pp2-vpp2": ["parallel.pipeline_model_parallel_size=2",
                 "parallel.virtual_pipeline_model_parallel_size=2"],
}


def _overrides(folder: str, layout: str) -> list[str]:
    return [f"checkpoint.init_from_hf={folder}", f"data.vocab_size={VOCAB}",
            f"model.seq_length={SEQ}", f"training.micro_batch_size={MICRO}",
            "training.global_batch_size=4", "training.train_iters=2",
            "training.eval_interval=0", "optimizer.lr_warmup_iters=0", "optimizer.lr=1e-3",
            "loss.type=mile", *LAYOUTS[layout]]


def _batch(tokens_bs: torch.Tensor) -> dict:
    return {"tokens": tokens_bs[:, :-1].contiguous(), "labels": tokens_bs[:, 1:].contiguous(),
            "loss_mask": torch.ones(tokens_bs.shape[0], tokens_bs.shape[1] - 1),
            "position_ids": torch.arange(tokens_bs.shape[1] - 1).expand(tokens_bs.shape[0], -1)
            .contiguous()}


def _pipeline_outputs(trainer, batch: dict, with_labels: bool, seq: int = SEQ) -> list:
    """The last stage's model outputs for one micro-batch through megatron's schedule (so
    PP and VPP work): logits ``[b, s, v/tp]`` or, with labels, the loss statistics, once
    per micro-batch (the same batch twice)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs = []

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], None,
                    labels=b["labels"] if with_labels else None)

        def loss_func(output):
            outputs.append(output)
            return torch.zeros(()), {}

        return out, loss_func

    iterators = [iter([batch, batch]) for _ in trainer.model]  # 2: interleaving needs >= PP
    for chunk in trainer.model:
        chunk.eval()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=trainer.model, num_microbatches=2, seq_length=seq, micro_batch_size=MICRO,
        forward_only=True)
    for chunk in trainer.model:
        chunk.train()
    return outputs


def layout_body(rank: int, world_size: int, folders: dict, tokens: list, tmp: str,
                cases: list | None = None) -> dict:
    """For each (model, layout) of ``cases`` (None: LLaMA's, every layout): full-vocabulary
    logits and per-token CE of the imported model on ``tokens`` (last stage, TP-gathered),
    then three training steps on repeated data. Then the round trip
    (:func:`round_trip_body`) in the same launch."""

    from megatron_mile.config import load_config
    from megatron_mile.training.trainer import Trainer

    tokens_bs = torch.tensor(tokens)
    batch = _batch(tokens_bs)
    results = {}
    if cases is None:
        cases = [("untied_gqa", layout) for layout in LAYOUTS] + [("tied", "pp2")]
    for name, layout in cases:
        cfg = load_config("tiny", _overrides(folders[name], layout), world_size=world_size)
        trainer = Trainer(cfg)
        trainer.setup()
        try:
            res = {}
            # Every stage joins both schedules; only the last one gets outputs.
            logits = _pipeline_outputs(trainer, {k: v.clone() for k, v in batch.items()},
                                       False)
            stats = _pipeline_outputs(trainer, {k: v.clone() for k, v in batch.items()}, True)
            if logits:  # last stage
                res["logits"] = _full_vocabulary(logits[0])
                res["ce"] = stats[0].ce.tolist()
                res["entropy"] = stats[0].entropy.tolist()
            trainer.train_iterator = ([itertools.repeat(batch) for _ in trainer.model]
                                      if len(trainer.model) > 1 else itertools.repeat(batch))
            res["train_lm_loss"] = [trainer.train_step().get("lm_loss") for _ in range(3)]
            results[(name, layout)] = res
        finally:
            trainer.shutdown()
    return {"layouts": results, "round_trip": round_trip_body(rank, world_size, folders, tmp)}


def round_trip_body(rank: int, world_size: int, folders: dict, tmp: str,
                    overrides: tuple = ()) -> dict:
    """import_to_checkpoint then export_checkpoint(trim_vocab) for each model (TP=1, the
    ranks are data-parallel)."""
    from megatron_mile.checkpoint_hf import import_to_checkpoint
    from megatron_mile.evaluation.hf_export import export_checkpoint

    out = {}
    for name, folder in folders.items():
        ckpt = os.path.join(tmp, f"ckpt_{name}")
        import_to_checkpoint(folder, ckpt, dtype="fp32",  # the default config
                             overrides=list(overrides))
        out[name] = export_checkpoint(ckpt, os.path.join(tmp, f"export_{name}"),
                                      trim_vocab=True)
    return out


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values()))
             if os.path.isfile(index) else ["model.safetensors"])
    out = {}
    for f in files:
        out.update(load_file(os.path.join(folder, f)))
    return out


# ---------------------------------------------------------------- the family matrix

FAMILY_VOCAB = 200  # padded to 256 (128 x TP rows): the padded rows count nowhere
FAMILY_SEQ = 32  # long enough that Llama-3.1's factor 8 vs 3.2's 32 moves the logits ~1e-3
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

FAMILY_MODELS = {
    # name: (transformers config class, model class, its fields); hidden 64, 4 heads, 2 layers
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=4, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=16384,
        rope_parameters={**LLAMA3_ROPE, "factor": 8.0})),
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=16384,
        rope_parameters={**LLAMA3_ROPE, "factor": 32.0})),
    "qwen2.5": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(  # 4 heads x 32 != hidden 64
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(  # the window covers the sequence
        num_key_value_heads=2, tie_word_embeddings=False, sliding_window=FAMILY_SEQ,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
"""The families of docs/models.md as transformers builds them, small and random; llama3 is
saved as sharded safetensors."""

FAMILY_LAYOUTS = {
    "tp1": [],  # DP=2
    "tp2-sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
}


def make_family_model(folder: str, name: str) -> dict:
    """Save transformers' own model of family ``name`` (fp32, random; norms, biases and q/k
    norms randomised too) into ``folder``; returns its config.json."""
    import transformers

    config_cls, model_cls, fields = FAMILY_MODELS[name]
    fields = {"max_position_embeddings": 256, **fields}
    config = getattr(transformers, config_cls)(
        vocab_size=FAMILY_VOCAB, hidden_size=64, intermediate_size=176, num_attention_heads=4,
        num_hidden_layers=2, rms_norm_eps=1e-6, **fields)
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, model_cls)(config).eval()
    _randomize(model)
    model.save_pretrained(folder, max_shard_size="100KB" if name == "llama3" else "10GB")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def family_matrix_body(rank: int, world_size: int, folders: dict, tokens: list, tmp: str) -> dict:
    """For each layout of :data:`FAMILY_LAYOUTS`, each family of ``folders``: the imported
    model's full-vocabulary logits on ``tokens`` (last stage, TP-gathered) and the lm_loss and
    objective of two training steps on them, through the trainer; then the round trip of
    each folder (:func:`round_trip_body`)."""

    from megatron_mile.config import load_config
    from megatron_mile.training.trainer import Trainer

    batch = _batch(torch.tensor(tokens))
    results = {}
    for layout, extra in FAMILY_LAYOUTS.items():
        for name, folder in folders.items():
            cfg = load_config("tiny", [
                f"checkpoint.init_from_hf={folder}", f"data.vocab_size={FAMILY_VOCAB}",
                f"model.seq_length={FAMILY_SEQ}", f"training.micro_batch_size={MICRO}",
                "training.global_batch_size=4", "training.train_iters=2",
                "training.eval_interval=0", "optimizer.lr_warmup_iters=0", "optimizer.lr=1e-3",
                "loss.type=mile", *extra], world_size=world_size)
            trainer = Trainer(cfg)
            trainer.setup()
            try:
                res = {}
                logits = _pipeline_outputs(trainer, {k: v.clone() for k, v in batch.items()},
                                           False, FAMILY_SEQ)
                if logits:  # last stage
                    res["logits"] = _full_vocabulary(logits[0])
                trainer.train_iterator = ([itertools.repeat(batch) for _ in trainer.model]
                                          if len(trainer.model) > 1 else itertools.repeat(batch))
                steps = [trainer.train_step() for _ in range(2)]
                res["lm_loss"] = [s.get("lm_loss") for s in steps]
                res["objective"] = [s.get("objective") for s in steps]
                if layout == "tp1":  # the whole model on each rank
                    from megatron_mile.model import num_parameters

                    res["parameters"] = [
                        sum(p.numel() for chunk in trainer.model for p in chunk.parameters()),
                        num_parameters(cfg, trainer.vocab_size)["total"]]
                results[(name, layout)] = res
            finally:
                trainer.shutdown()
    # the tiny Mistral's window is the sequence: the default config's 128 tokens would not fit
    round_trip = round_trip_body(rank, world_size, folders, tmp,
                                 (f"model.seq_length={FAMILY_SEQ}",))
    return {"layouts": results, "round_trip": round_trip}


def _full_vocabulary(logits_bsv) -> list:
    """``[b, s, v/tp]`` logits of this TP rank -> the whole vocabulary's ``[b, s, v]`` as a
    list (one all-gather over the tensor-parallel group)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    logits_bsv = logits_bsv.detach().contiguous()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits_bsv) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(shards, logits_bsv, group=tp_group)
    return torch.cat(shards, dim=-1).tolist()
