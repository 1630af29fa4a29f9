"""One call from nothing to training data: corpus -> tokenizer -> indexed datasets.

    from megatron_mile.data.quickstart import prepare_quickstart_data
    data = prepare_quickstart_data("data/quickstart")      # ~5 s on one core, then cached
    cfg = DataConfig(data_path=[data.train_prefix], valid_data_path=[data.valid_prefix],
                     tokenizer_model=data.tokenizer_model)

or ``megatron-mile-prepare-corpus --output-dir data/quickstart --tokenize``.

Steps (see ``docs/data.md``): :func:`~megatron_mile.data.corpus.prepare_corpus` writes
``train.jsonl``/``validation.jsonl`` from the Python standard library's docstrings; a BPE
SentencePiece model is trained on ``train.jsonl``; both splits are tokenized to
``train.{bin,idx}`` and ``validation.{bin,idx}``. A ``quickstart.json`` stamp, written last,
records the parameters and corpus hashes: a second call with the same parameters returns at
once, a call with other parameters (or after an interrupted run) rebuilds.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from megatron_mile.data.corpus import (
    CORPUS_VERSION, TRAIN_FILE, VALID_FILE, _write_json_atomic, prepare_corpus,
)

STAMP_FILE = "quickstart.json"


@dataclass
class QuickstartData:
    """Paths produced by :func:`prepare_quickstart_data`."""

    train_prefix: str
    """Indexed dataset prefix of the training split (``DataConfig.data_path``)."""
    valid_prefix: str
    """Indexed dataset prefix of the validation split (``DataConfig.valid_data_path``)."""
    tokenizer_model: str
    """SentencePiece model (``DataConfig.tokenizer_model``)."""
    vocab_size: int
    """Tokenizer vocabulary size."""


def prepare_quickstart_data(
    output_dir: str, vocab_size: int = 4096, workers: int = 1, force: bool = False,
    progress: TextIO | None = sys.stderr,
) -> QuickstartData:
    """Build (or reuse) the quickstart corpus, tokenizer and indexed datasets in ``output_dir``.

    Args:
        output_dir: created if missing.
        vocab_size: tokenizer vocabulary size (BPE, byte fallback).
        workers: preprocessing processes.
        force: rebuild even if a matching stamp exists.
        progress: where step messages go; None for silence.
    """
    from megatron_mile.data.preprocess import preprocess
    from megatron_mile.data.tokenizer_training import (
        TokenizerTrainingConfig, train_sentencepiece,
    )

    out = Path(output_dir)
    result = QuickstartData(
        train_prefix=str(out / "train"), valid_prefix=str(out / "validation"),
        tokenizer_model=str(out / "tokenizer.model"), vocab_size=vocab_size)
    params = {"corpus_version": CORPUS_VERSION, "vocab_size": vocab_size,
              "python": sys.version.split()[0]}
    stamp_path = out / STAMP_FILE
    if not force and _stamp_matches(stamp_path, params, result):
        _say(progress, f"quickstart data in {out} is up to date")
        return result
    if stamp_path.exists():
        stamp_path.unlink()  # from here on the directory is incomplete

    _say(progress, f"[1/3] corpus: Python standard library docstrings -> {out}")
    manifest = prepare_corpus(str(out))
    _say(progress, f"      {manifest.train_documents} train / {manifest.valid_documents} "
                   f"validation documents, {manifest.train_bytes / 1e6:.1f} MB of train text")
    _say(progress, f"[2/3] tokenizer: BPE, vocab_size={vocab_size}")
    train_sentencepiece([str(out / TRAIN_FILE)], str(out / "tokenizer"),
                        TokenizerTrainingConfig(vocab_size=vocab_size))
    for split, prefix in ((TRAIN_FILE, result.train_prefix), (VALID_FILE, result.valid_prefix)):
        _say(progress, f"[3/3] tokenize {split} -> {prefix}.bin/.idx")
        stats = preprocess([str(out / split)], prefix, result.tokenizer_model, workers=workers,
                           strict=True, overwrite=True, progress=None)
        _say(progress, f"      {stats.documents} documents, {stats.tokens:,} tokens, "
                       f"{stats.mb_per_s:.1f} MB/s")
    _write_json_atomic(stamp_path, {"params": params, "paths": asdict(result),
                                    "corpus_sha256": manifest.sha256})
    return result


def _stamp_matches(stamp_path: Path, params: dict, result: QuickstartData) -> bool:
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = [result.tokenizer_model] + [p + s for p in (result.train_prefix, result.valid_prefix)
                                        for s in (".bin", ".idx")]
    return stamp.get("params") == params and all(os.path.isfile(f) for f in files)


def _say(out: TextIO | None, msg: str) -> None:
    if out is not None:
        print(msg, file=out, flush=True)
