"""The package's command-line tools, installed as console scripts (setup.py ``entry_points``).

=================================  ==========================================================
``megatron-mile-train``            pretraining (megatron_mile/train.py)
``megatron-mile-prepare-corpus``   the embedded quickstart corpus, tokenizer and .bin/.idx
``megatron-mile-train-tokenizer``  a SentencePiece tokenizer from text or JSONL
``megatron-mile-preprocess``       text or JSONL -> Megatron indexed dataset (.bin/.idx)
``megatron-mile-eval-frequency``   validation loss by training-frequency bucket, comparisons
``megatron-mile-export-hf``        a checkpoint -> Hugging Face folder of its model family
``megatron-mile-import-hf``        a Hugging Face folder (a known model family) -> a checkpoint
``megatron-mile-estimate-memory``  parameters and GPU memory per rank of a configuration
=================================  ==========================================================

Each module has ``main(argv) -> int`` (the exit status) and runs as ``python -m
megatron_mile.cli.<module>`` too; ``tools/*.py`` keeps Megatron-LM's names for them.
"""

from __future__ import annotations

import argparse


def add_text_input_arguments(parser: argparse.ArgumentParser) -> None:
    """--input-format, --json-key and --text-split: how megatron_mile.data.text_input reads
    the files of ``megatron-mile-train-tokenizer`` and ``megatron-mile-preprocess`` alike."""
    from megatron_mile.data.text_input import INPUT_FORMATS, TEXT_SPLITS

    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                        help="auto: .jsonl/.json/.ndjson are JSONL, anything else plain text")
    parser.add_argument("--json-key", default="text", help="JSONL key holding the document text")
    parser.add_argument("--text-split", choices=TEXT_SPLITS, default="line",
                        help="plain text: what one document is")
