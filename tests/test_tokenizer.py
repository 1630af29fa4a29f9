"""Tokenizer training and the megatron-core tokenizer classes."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import sentencepiece as spm

from data_fixtures import make_documents, train_small_tokenizer, write_jsonl
from megatron_mile.data.tokenizer import NullTokenizer, SentencePieceTokenizer
from megatron_mile.data.tokenizer_training import TokenizerTrainingConfig, train_sentencepiece

ROUND_TRIP = [
    "plain words of the corpus",
    "  leading spaces, double  spaces and trailing ",
    "lines\nwith\n\nnewlines\tand tabs\n",
    "unseen characters: Ωμέγα, 東京, emoji 🙂, control \x01",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(model_path, text):
    tok = SentencePieceTokenizer(model_path)
    ids = tok.tokenize(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.detokenize(ids) == text


def test_special_tokens_and_vocab(model_path):
    tok = SentencePieceTokenizer(model_path)
    assert tok.vocab_size == 400
    assert (tok.unk, tok.bos, tok.eos, tok.pad) == (0, 1, 2, 3)
    assert tok.eod == tok.eos == 2
    assert tok.inv_vocab[2] == "</s>" and tok.vocab["<pad>"] == 3
    # byte fallback: an unseen character becomes byte pieces, never <unk>
    assert tok.unk not in tok.tokenize("Ωμέγα 🙂")


def test_is_a_megatron_core_tokenizer_and_pickles(model_path):
    from megatron.core.tokenizers import MegatronTokenizerBase

    tok = SentencePieceTokenizer(model_path)
    assert isinstance(tok, MegatronTokenizerBase)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(ROUND_TRIP[3]) == tok.tokenize(ROUND_TRIP[3])
    assert clone.unique_identifiers == tok.unique_identifiers
    json.dumps(tok.unique_identifiers)  # hashed into megatron-core's dataset cache key


def test_cache_identity_follows_model_content(model_path, tmp_path):
    other = train_small_tokenizer(tmp_path, vocab_size=420)
    a, b = SentencePieceTokenizer(model_path), SentencePieceTokenizer(other)
    assert a.unique_identifiers != b.unique_identifiers


def test_options_pad_disabled_and_unigram(tmp_path):
    path = train_small_tokenizer(tmp_path, vocab_size=320, model_type="unigram", pad_id=-1)
    tok = SentencePieceTokenizer(path)
    assert tok.pad == -1 and tok.eod == 2 and tok.vocab_size == 320
    assert tok.detokenize(tok.tokenize(ROUND_TRIP[2])) == ROUND_TRIP[2]


def test_existing_model_not_made_by_our_tool(tmp_path):
    """A model with SentencePiece's own defaults (as LLaMA's: no <pad>, NFKC) loads too."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_documents(300)),
                                   model_writer=proto, vocab_size=70, minloglevel=2)
    path = tmp_path / "foreign.model"
    path.write_bytes(proto.getvalue())
    tok = SentencePieceTokenizer(str(path))
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (70, 2, 1, -1)
    assert tok.detokenize(tok.tokenize("the code")) == "the code"


def test_missing_model_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model.*megatron-mile-train-tokenizer --input"):
        SentencePieceTokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceTokenizer(str(bad))


def test_null_tokenizer_vocab_includes_eod():
    tok = NullTokenizer(50)
    assert tok.vocab_size == 50 and tok.eod == 49 and tok.pad == -1
    assert tok.tokenize("3 1 4") == [3, 1, 4] and tok.detokenize([3, 1, 4]) == "3 1 4"
    with pytest.raises(ValueError, match="vocab_size=1"):
        NullTokenizer(1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=100), r"vocab_size=100: must be in \[261,"),
    (dict(bos_id=2), "must be distinct"),
    (dict(model_type="wordpiece"), "model_type='wordpiece'"),
    (dict(character_coverage=0.0), "character_coverage=0.0"),
])
def test_training_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenizerTrainingConfig(**kwargs)


def test_training_reports_wrong_json_key_and_small_corpus(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(50))
    with pytest.raises(ValueError, match="no usable text.*--json-key.*'body'"):
        train_sentencepiece([str(corpus)], str(tmp_path / "t"),
                            TokenizerTrainingConfig(vocab_size=300), json_key="body")
    with pytest.raises(ValueError, match="lower --vocab-size"):
        train_sentencepiece([str(corpus)], str(tmp_path / "t"),
                            TokenizerTrainingConfig(vocab_size=50000))
    assert not (tmp_path / "t.model").exists()


def test_cli_writes_model_and_vocab(tmp_path, capsys):
    from megatron_mile.cli import train_tokenizer as cli
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(200))
    rc = cli.main(["--input", str(corpus), "--model-prefix", str(tmp_path / "m"),
                   "--vocab-size", "320", "--num-threads", "1"])
    assert rc == 0, capsys.readouterr().err
    assert SentencePieceTokenizer(str(tmp_path / "m.model")).vocab_size == 320
    assert len((tmp_path / "m.vocab").read_text(encoding="utf-8").splitlines()) == 320
    assert cli.main(["--input", str(tmp_path / "missing.txt"), "--model-prefix", "x"]) == 2
    assert "input file not found" in capsys.readouterr().err
