"""megatron_mile.evaluation.hf_export (megatron-mile-export-hf): a TP=2 checkpoint exported to
LlamaForCausalLM gives megatron's logits.

One 2-process launch trains the tiny model at TP=2 with grouped-query attention (4 heads, 2
kv groups: a q/k/v or gate/up mix-up changes the logits) for a few fp32 steps, saves, and
records the TP=2 model's full logits (all-gathered over the vocabulary shards) on fixed
inputs. One 1-process launch exports it (merging the shards at TP=1), padded and trimmed.
``transformers`` then loads each folder in this process; its fp32 logits must equal the
recorded ones to 1e-4. Needs the test dependencies ``transformers`` and ``safetensors``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from megatron_mile.testing import run_distributed

pytestmark = pytest.mark.slow  # checkpoints written by multi-process trainer runs

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TOKENIZER_VOCAB = 400  # padded to 512 at TP=2 (2 x 64 rows per rank multiple)
SEQ = 16
ATOL = 1e-4


def _train_and_record(rank: int, world_size: int, tmp: str, tokenizer: str, tokens: list):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_mile.config import load_config
    from megatron_mile.training.trainer import Trainer

    cfg = load_config("tiny", [
        "parallel.tensor_model_parallel_size=2", "model.num_query_groups=2",
        "data.vocab_size=null", f"data.tokenizer_model={tokenizer}",
        "training.train_iters=3", "training.eval_interval=0", "optimizer.lr_warmup_iters=1",
        f"checkpoint.save={tmp}/ckpt"], world_size=world_size)
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        trainer.train()
        model = trainer.model[0]
        model.eval()
        tokens_bs = torch.tensor(tokens)
        position_ids = torch.arange(tokens_bs.shape[1]).expand_as(tokens_bs)
        with torch.no_grad():
            logits_bsv = model(tokens_bs, position_ids, None)  # [b, s, v/tp]
        shards = [torch.empty_like(logits_bsv) for _ in range(2)]
        dist.all_gather(shards, logits_bsv, group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat(shards, dim=-1).tolist()  # [b, s, v] full vocabulary
    finally:
        trainer.shutdown()


def _export(rank: int, world_size: int, tmp: str) -> list:
    from megatron_mile.evaluation.hf_export import export_checkpoint

    return [export_checkpoint(f"{tmp}/ckpt", f"{tmp}/hf", trim_vocab=False),
            export_checkpoint(f"{tmp}/ckpt", f"{tmp}/hf_trim")]  # trimmed: the default


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from data_fixtures import train_small_tokenizer

    tmp = tmp_path_factory.mktemp("export")
    tokenizer = train_small_tokenizer(tmp, vocab_size=TOKENIZER_VOCAB)
    tokens = np.random.default_rng(0).integers(0, TOKENIZER_VOCAB, size=(2, SEQ)).tolist()
    logits = run_distributed(_train_and_record, 2, args=(str(tmp), tokenizer, tokens),
                             timeout_s=300)[0]
    configs = run_distributed(_export, 1, args=(str(tmp),), timeout_s=300)[0]
    return {"tmp": tmp, "tokenizer": tokenizer, "tokens": tokens,
            "logits": torch.tensor(logits), "configs": configs}


def _hf_logits(folder, tokens) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


def test_exported_logits_equal_megatron_tp2_forward(exported):
    expected = exported["logits"]
    assert expected.shape == (2, SEQ, 512)
    actual = _hf_logits(exported["tmp"] / "hf", exported["tokens"])
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"max |HF - megatron| = {err}"
    # Not vacuous: the trained logits vary across the vocabulary and the positions.
    assert expected.std().item() > 1e-2


def test_trimmed_export_keeps_the_tokenizer_rows(exported):
    actual = _hf_logits(exported["tmp"] / "hf_trim", exported["tokens"])
    assert actual.shape == (2, SEQ, TOKENIZER_VOCAB)
    err = (actual - exported["logits"][..., :TOKENIZER_VOCAB]).abs().max().item()
    assert err <= ATOL, err


def test_config_records_the_architecture(exported):
    with open(exported["tmp"] / "hf" / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["vocab_size"] == 512 and config["num_key_value_heads"] == 2
    assert config["megatron_mile"]["tokenizer_vocab_size"] == TOKENIZER_VOCAB
    assert config["megatron_mile"]["iteration"] == 3
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is False
    assert exported["configs"][1]["vocab_size"] == TOKENIZER_VOCAB
    assert sorted(os.listdir(exported["tmp"] / "hf")) == [
        "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]


def test_tokenizer_matches_sentencepiece(exported):
    from megatron_mile.data.tokenizer import SentencePieceTokenizer
    from data_fixtures import make_documents

    ours = SentencePieceTokenizer(exported["tokenizer"])
    hf = transformers.AutoTokenizer.from_pretrained(str(exported["tmp"] / "hf"))
    # Documents that do not start with whitespace: there HF's Metaspace("first") and
    # SentencePiece's dummy prefix differ (docs/evaluation.md).
    docs = [d.lstrip() for d in make_documents(50, seed=3)]
    for doc in docs:
        assert hf(doc)["input_ids"] == ours.tokenize(doc), doc
        assert hf.decode(ours.tokenize(doc)) == doc
