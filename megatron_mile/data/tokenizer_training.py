"""Train a SentencePiece tokenizer (BPE by default, unigram optional) on text or JSONL.

The defaults give an exact round trip ``detokenize(tokenize(text)) == text`` for any text:
``identity`` normalisation, whitespace kept as is, and byte fallback so that no character
maps to ``<unk>``. Special tokens default to the LLaMA layout ``<unk>=0, <s>=1, </s>=2`` plus
``<pad>=3``; ``</s>`` is the end-of-document token appended by ``megatron-mile-preprocess``.

Only ``sentencepiece`` is imported (not torch, not megatron-core): this runs in a second.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import sentencepiece as spm

from megatron_mile.data.text_input import (
    BadRecord, check_inputs, decode_record, iter_records, resolve_format,
)

logger = logging.getLogger(__name__)

MODEL_TYPES: tuple[str, ...] = ("bpe", "unigram")


@dataclass
class TokenizerTrainingConfig:
    """What to train; every field maps to a ``megatron-mile-train-tokenizer`` flag."""

    vocab_size: int = 32000
    """Number of pieces, special and byte-fallback tokens included. Range: [special + 256 + 1,
    2**31) with byte fallback (it adds 256 byte pieces)."""
    model_type: str = "bpe"
    """``"bpe"`` or ``"unigram"``."""
    byte_fallback: bool = True
    """Spell characters missing from the vocabulary as UTF-8 bytes instead of ``<unk>``."""
    character_coverage: float = 0.9995
    """Fraction of characters covered by single-character pieces; the rarest go to byte
    fallback (or ``<unk>``). Range (0, 1]."""
    unk_id: int = 0
    """Id of ``<unk>`` (required by SentencePiece)."""
    bos_id: int = 1
    """Id of ``<s>``; -1 for none."""
    eos_id: int = 2
    """Id of ``</s>``, the end-of-document token; -1 for none (then the tokenizer cannot be
    used for pretraining data)."""
    pad_id: int = 3
    """Id of ``<pad>``; -1 for none."""
    user_defined_symbols: list[str] = field(default_factory=list)
    """Extra pieces that are never split (e.g. ``<|im_start|>``)."""
    max_sentences: int = 5_000_000
    """At most this many lines are sampled (uniformly, seeded) for training; 0 for all."""
    num_threads: int = max(1, min(16, os.cpu_count() or 1))
    """Trainer threads."""
    seed: int = 1234
    """Seed of SentencePiece's sampling, for reproducible models."""

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: must be one of {MODEL_TYPES}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage={self.character_coverage}: must be in (0, 1]")
        ids = {"unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
               "pad_id": self.pad_id}
        if self.unk_id < 0:
            raise ValueError(f"unk_id={self.unk_id}: SentencePiece requires an <unk> id >= 0")
        used = [v for v in ids.values() if v >= 0]
        if len(set(used)) != len(used):
            raise ValueError(f"special token ids must be distinct (-1 disables one): {ids}")
        n_special = len(used) + len(self.user_defined_symbols)
        minimum = n_special + (256 if self.byte_fallback else 0) + 1
        if not minimum <= self.vocab_size < 2**31:
            raise ValueError(
                f"vocab_size={self.vocab_size}: must be in [{minimum}, 2**31) for "
                f"{n_special} special tokens{' + 256 byte pieces' if self.byte_fallback else ''}")
        if max(used) >= self.vocab_size:
            raise ValueError(f"special token ids {ids} must be < vocab_size={self.vocab_size}")
        if self.max_sentences < 0:
            raise ValueError(f"max_sentences={self.max_sentences}: must be >= 0 (0 = all)")


def iter_training_lines(
    inputs: Sequence[str], input_format: str = "auto", json_key: str = "text",
    text_split: str = "line", bad: list[BadRecord] | None = None,
) -> Iterator[str]:
    """Yield the non-empty lines of every good document; bad records go to ``bad``."""
    for path in inputs:
        fmt = resolve_format(path, input_format)
        for record in iter_records(path, fmt, text_split):  # type: ignore[arg-type]
            text = decode_record(record, fmt, json_key)
            if isinstance(text, BadRecord):
                if bad is not None:
                    bad.append(text)
                continue
            for line in text.splitlines():
                if line.strip():
                    yield line


def train_sentencepiece(
    inputs: Sequence[str], model_prefix: str, cfg: TokenizerTrainingConfig, *,
    input_format: str = "auto", json_key: str = "text", text_split: str = "line",
) -> str:
    """Train a SentencePiece model on ``inputs``; write ``model_prefix.model`` and ``.vocab``.

    The model is written under a temporary name and renamed, so a failed run leaves no
    ``.model`` behind.

    Returns:
        The path of the ``.model`` file.

    Raises:
        ValueError: no usable text, or a vocabulary too large for the corpus.
    """
    inputs = check_inputs(inputs)
    bad: list[BadRecord] = []
    n_lines = 0

    def lines() -> Iterator[str]:
        nonlocal n_lines
        for line in iter_training_lines(inputs, input_format, json_key, text_split, bad):
            n_lines += 1
            yield line

    proto = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)
    kwargs = dict(
        model_type=cfg.model_type, vocab_size=cfg.vocab_size, byte_fallback=cfg.byte_fallback,
        character_coverage=cfg.character_coverage, unk_id=cfg.unk_id, bos_id=cfg.bos_id,
        eos_id=cfg.eos_id, pad_id=cfg.pad_id,
        # Exact round trip: no NFKC, keep runs of spaces, never <unk> for unseen characters.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        input_sentence_size=cfg.max_sentences, shuffle_input_sentence=True,
        num_threads=cfg.num_threads, minloglevel=2, train_extremely_large_corpus=False,
    )
    if cfg.user_defined_symbols:
        kwargs["user_defined_symbols"] = list(cfg.user_defined_symbols)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=proto, **kwargs)
    except RuntimeError as err:
        # An empty corpus (often a wrong --json-key) gets our message, not SentencePiece's.
        if n_lines == 0:
            raise ValueError(_no_text_message(inputs, json_key, bad)) from err
        msg = str(err)
        if "Vocabulary size too high" in msg or "vocab_size" in msg:
            raise ValueError(f"{msg.strip()} -- the corpus ({n_lines} lines) is too small for "
                             f"vocab_size={cfg.vocab_size}: lower --vocab-size") from err
        raise
    if n_lines == 0:
        raise ValueError(_no_text_message(inputs, json_key, bad))
    if bad:
        logger.warning("skipped %d bad records while training the tokenizer; first: %s",
                       len(bad), bad[0])

    model_path = model_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    _write_atomic(model_path, proto.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size()))
    _write_atomic(model_prefix + ".vocab", vocab.encode("utf-8"))
    return model_path


def _no_text_message(inputs: Sequence[str], json_key: str, bad: list[BadRecord]) -> str:
    first = f"; first bad record: {bad[0]}" if bad else ""
    return (f"no usable text in {list(inputs)} ({len(bad)} bad records{first}). "
            f"For JSONL, check that documents sit under --json-key (now {json_key!r}).")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
