"""Small generated corpora and tokenizers shared by the data tests (no network, < 1 s)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his "
         "from at which but have an they you were her she there one all we their über naïve "
         "日本 code() x=1").split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` random documents, some multi-line, with unicode and repeated spaces."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
                 for _ in range(rng.randint(1, 4))]
        docs.append(("  " if i % 7 == 0 else "") + "\n".join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": 0}, ensure_ascii=False) + "\n")
    return path


def train_small_tokenizer(tmp: Path, vocab_size: int = 400, **overrides) -> str:
    """Train a BPE model on generated text; returns the .model path."""
    from megatron_mile.data.tokenizer_training import (
        TokenizerTrainingConfig, train_sentencepiece,
    )
    corpus = write_jsonl(tmp / "tok_corpus.jsonl", make_documents(400, seed=1))
    cfg = TokenizerTrainingConfig(vocab_size=vocab_size, num_threads=1, **overrides)
    return train_sentencepiece([str(corpus)], str(tmp / "tok"), cfg)
