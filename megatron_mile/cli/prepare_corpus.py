"""Prepare the built-in quickstart corpus (Python standard library docstrings) as JSONL.

    megatron-mile-prepare-corpus --output-dir data/quickstart             # train/validation.jsonl
    megatron-mile-prepare-corpus --output-dir data/quickstart --tokenize  # + tokenizer + .bin/.idx

Needs nothing beyond Python itself; the output is identical on every run with the same Python
version (corpus.json records the version and file hashes). See docs/data.md for why this text.
Also ``python -m megatron_mile.cli.prepare_corpus`` and ``python tools/prepare_corpus.py``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_mile.data.corpus import prepare_corpus


def main(argv: list[str] | None = None) -> int:
    """Run ``megatron-mile-prepare-corpus``; returns 0, or 2 for bad input."""
    p = argparse.ArgumentParser(prog="megatron-mile-prepare-corpus",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--valid-permille", type=int, default=50,
                   help="thousandths of documents held out for validation")
    p.add_argument("--tokenize", action="store_true",
                   help="also train the tokenizer and write train/validation .bin/.idx "
                        "(megatron_mile.data.quickstart)")
    p.add_argument("--vocab-size", type=int, default=4096, help="with --tokenize")
    p.add_argument("--workers", type=int, default=1, help="with --tokenize")
    p.add_argument("--force", action="store_true", help="with --tokenize: rebuild even if "
                   "up to date")
    args = p.parse_args(argv)
    try:
        if args.tokenize:
            if args.valid_permille != 50:
                p.error("--valid-permille is fixed at 50 with --tokenize")
            warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
            from megatron_mile.data.quickstart import prepare_quickstart_data
            data = prepare_quickstart_data(args.output_dir, vocab_size=args.vocab_size,
                                           workers=args.workers, force=args.force)
            print(f"data_path: [{data.train_prefix}]\nvalid_data_path: [{data.valid_prefix}]\n"
                  f"tokenizer_model: {data.tokenizer_model}")
        else:
            m = prepare_corpus(args.output_dir, args.valid_permille)
            print(f"wrote {args.output_dir}/train.jsonl ({m.train_documents} documents, "
                  f"{m.train_bytes / 1e6:.2f} MB) and validation.jsonl ({m.valid_documents} "
                  f"documents, {m.valid_bytes / 1e6:.2f} MB) from Python {m.python_version}'s "
                  f"standard library")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
