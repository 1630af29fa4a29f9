"""Train a SentencePiece tokenizer (BPE by default) on plain text or JSONL.

    megatron-mile-train-tokenizer --input data/train.jsonl --model-prefix data/tok \
        --vocab-size 8000                       # writes data/tok.model and data/tok.vocab

Defaults: byte fallback on, identity normalisation (exact round trip), special tokens
<unk>=0 <s>=1 </s>=2 <pad>=3 (``--pad-id -1`` etc. to drop one). ``</s>`` is the
end-of-document token. Bad records (invalid JSON, missing key, non-UTF-8, empty) are skipped
and counted. Also ``python -m megatron_mile.cli.train_tokenizer`` and
``python tools/train_tokenizer.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from megatron_mile.cli import add_text_input_arguments
from megatron_mile.data.tokenizer_training import (
    MODEL_TYPES, TokenizerTrainingConfig, train_sentencepiece,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``megatron-mile-train-tokenizer``."""
    d = TokenizerTrainingConfig()
    p = argparse.ArgumentParser(prog="megatron-mile-train-tokenizer",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    add_text_input_arguments(p)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--model-type", choices=MODEL_TYPES, default=d.model_type)
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction,
                   default=d.byte_fallback)
    p.add_argument("--character-coverage", type=float, default=d.character_coverage)
    p.add_argument("--unk-id", type=int, default=d.unk_id)
    p.add_argument("--bos-id", type=int, default=d.bos_id, help="-1 for no <s>")
    p.add_argument("--eos-id", type=int, default=d.eos_id, help="</s> = end of document")
    p.add_argument("--pad-id", type=int, default=d.pad_id, help="-1 for no <pad>")
    p.add_argument("--user-defined-symbols", nargs="*", default=[],
                   help="extra pieces never split")
    p.add_argument("--max-sentences", type=int, default=d.max_sentences,
                   help="lines sampled for training, 0 = all")
    p.add_argument("--num-threads", type=int, default=d.num_threads)
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``megatron-mile-train-tokenizer``; returns 0, or 2 for bad input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = TokenizerTrainingConfig(
            vocab_size=args.vocab_size, model_type=args.model_type,
            byte_fallback=args.byte_fallback, character_coverage=args.character_coverage,
            unk_id=args.unk_id, bos_id=args.bos_id, eos_id=args.eos_id, pad_id=args.pad_id,
            user_defined_symbols=args.user_defined_symbols, max_sentences=args.max_sentences,
            num_threads=args.num_threads, seed=args.seed)
        t0 = time.perf_counter()
        path = train_sentencepiece(args.input, args.model_prefix, cfg,
                                   input_format=args.input_format, json_key=args.json_key,
                                   text_split=args.text_split)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({cfg.model_type}, vocab_size={cfg.vocab_size}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
