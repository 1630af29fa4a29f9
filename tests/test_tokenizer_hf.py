"""Hugging Face tokenizer.json (the ``tokenizers`` library) wherever a SentencePiece model is
accepted: a LLaMA-3-style byte-level BPE is built locally (no downloads) on the embedded
corpus, preprocesses it, trains, and is exported with the model."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from megatron_mile.testing import run_distributed

tokenizers = pytest.importorskip("tokenizers")

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
BPE_VOCAB = 998  # + BOS, EOS = 1000 ids: not a multiple of the padding unit

ROUND_TRIP = [
    "plain words of the corpus",
    "  leading spaces, double  spaces and trailing ",
    "lines\nwith\n\nnewlines\tand tabs\n",
    "unseen characters: Ωμέγα, 東京, emoji 🙂, control \x01",
    "",
]


def make_byte_level_bpe(folder: str, texts) -> str:
    """A LLaMA-3-style tokenizer folder: byte-level BPE, BOS/EOS as the LAST ids, named in
    tokenizer_config.json; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([BOS, EOS])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
                   "eos_token": EOS, "clean_up_tokenization_spaces": False}, f)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_mile.data.corpus import prepare_corpus

    out = tmp_path_factory.mktemp("corpus")
    prepare_corpus(str(out))
    return out


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """Trained on generated words (a fraction of a second): the unit tier needs no corpus. The slow tests preprocess and train on the embedded corpus with it."""
    import random

    rng = random.Random(2)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(3000)]
    texts = [" ".join(rng.choice(words[:rng.randint(50, 3000)]) for _ in range(200))
             for _ in range(300)]
    folder = tmp_path_factory.mktemp("bpe")
    return make_byte_level_bpe(str(folder), texts)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(bpe, text):
    from megatron_mile.data.tokenizer import load_tokenizer

    tok = load_tokenizer(bpe)
    ids = tok.tokenize(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.detokenize(ids) == text


def test_special_ids_and_paths(bpe, model_path):
    from megatron_mile.data.tokenizer import (
        HFTokenizer, SentencePieceTokenizer, load_tokenizer,
    )

    tok = load_tokenizer(bpe)  # the folder
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 1000
    assert (tok.bos, tok.eos, tok.eod) == (998, 999, 999)  # LLaMA-3 layout: specials last
    assert (tok.pad, tok.unk) == (-1, -1)
    assert 998 not in tok.tokenize("hello") and 999 not in tok.tokenize("hello")
    assert tok.detokenize(tok.tokenize("hello") + [999]) == "hello"  # specials decode to ""
    same = load_tokenizer(os.path.join(bpe, "tokenizer.json"))
    assert same.unique_identifiers == tok.unique_identifiers
    restored = pickle.loads(pickle.dumps(tok))
    assert restored.tokenize("pickled text") == tok.tokenize("pickled text")
    assert isinstance(load_tokenizer(model_path), SentencePieceTokenizer)


def test_eos_from_known_names_and_missing_eos(bpe, tmp_path):
    import shutil

    from megatron_mile.data.tokenizer import load_tokenizer

    shutil.copyfile(os.path.join(bpe, "tokenizer.json"), tmp_path / "tokenizer.json")
    assert load_tokenizer(str(tmp_path)).eos == 999  # no tokenizer_config: <|end_of_text|>
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="no end-of-text token"):
        load_tokenizer(str(tmp_path))


def test_missing_tokenizers_library_is_a_clear_error(bpe, monkeypatch):
    import builtins

    from megatron_mile.data.tokenizer import load_tokenizer

    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ImportError, match=r"pip install 'megatron-mile\[hf\]'"):
        load_tokenizer(bpe)


@pytest.fixture(scope="module")
def preprocessed(corpus, bpe):
    """The validation split (43 documents, 130 kB; the training split is 2 MB) with two
    workers and small chunks, so the tokenizer crosses to pool processes."""
    from megatron_mile.data.preprocess import preprocess

    return preprocess([str(corpus / "validation.jsonl")], str(corpus / "bpe_validation"), bpe,
                      workers=2, chunk_bytes=20_000, progress=None)


@pytest.mark.slow
def test_preprocess_with_tokenizer_json(corpus, bpe, preprocessed):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_mile.data.tokenizer import load_tokenizer

    tok = load_tokenizer(bpe)
    ds = IndexedDataset(str(corpus / "bpe_validation"))
    with open(corpus / "validation.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(ds) == len(texts) == preprocessed.documents
    for i in (0, len(ds) // 2, len(ds) - 1):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod == 999
        assert tok.detokenize(ids) == texts[i]  # EOS decodes to nothing


def _train_and_export(rank: int, world_size: int, corpus: str, bpe: str) -> dict:
    from megatron_mile.config import load_config
    from megatron_mile.evaluation.hf_export import export_checkpoint
    from megatron_mile.training.trainer import Trainer

    cfg = load_config("tiny", [
        # Trains (and evaluates) on the small validation split: enough to see learning.
        "data.mock=false", "data.vocab_size=null", f"data.data_path=[{corpus}/bpe_validation]",
        f"data.valid_data_path=[{corpus}/bpe_validation]", f"data.tokenizer_model={bpe}",
        "training.train_iters=20", "training.eval_interval=20", "training.eval_iters=2",
        "optimizer.lr_warmup_iters=5", f"checkpoint.save={corpus}/ckpt"], world_size=1)
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        start = trainer.evaluate()
        out = trainer.train()
    finally:
        trainer.shutdown()
    config = export_checkpoint(f"{corpus}/ckpt", f"{corpus}/exported", trim_vocab=True)
    return {"start": start, "end": out["history"][-1]["valid_lm_loss"],
            "vocab": trainer.tokenizer.vocab_size, "padded": trainer.vocab_size,
            "config": config}


@pytest.mark.slow
def test_trains_and_exports_with_tokenizer_json(corpus, bpe, preprocessed):
    import math

    transformers = pytest.importorskip("transformers")
    res = run_distributed(_train_and_export, 1, args=(str(corpus), bpe), timeout_s=300)[0]
    assert res["vocab"] == 1000 and res["padded"] == 1024
    # Untrained: near uniform over the 1000 REAL ids, log(1000) = 6.908; counting the 24
    # padded rows would give log(1024) = 6.931.
    assert res["start"] == pytest.approx(math.log(1000), abs=0.01), res
    assert res["end"] < res["start"] - 0.5, res
    exported = corpus / "exported"
    with open(os.path.join(bpe, "tokenizer.json"), "rb") as a, \
            open(exported / "tokenizer.json", "rb") as b:
        assert a.read() == b.read()
    config = res["config"]
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == \
        (998, 999, 1000)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    from megatron_mile.data.tokenizer import load_tokenizer

    ours = load_tokenizer(bpe)
    for text in ROUND_TRIP[:4]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (998, 999)
    model = transformers.LlamaForCausalLM.from_pretrained(str(exported))
    assert model.config.vocab_size == 1000
