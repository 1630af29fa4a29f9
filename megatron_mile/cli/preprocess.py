"""Tokenize text or JSONL into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

    megatron-mile-preprocess --input data/train.jsonl --output-prefix data/train \
        --tokenizer-model data/tok.model --workers 4

--tokenizer-model takes a SentencePiece .model, a Hugging Face tokenizer.json (e.g. LLaMA-3's
byte-level BPE) or a folder holding one. Each document gets the tokenizer's EOS (</s>,
<|end_of_text|>) appended as end-of-document. Bad records (invalid
JSON, missing --json-key, non-UTF-8 bytes, empty text) are skipped, counted and the first few
printed with file:line; --strict stops at the first. Prints a progress line every
--log-interval seconds and a summary at the end. Output appears only when complete: an
interrupted run leaves no PREFIX.idx. Exit status: 0 done, 1 interrupted or a worker killed
(the OOM killer: lower --workers or --chunk-mb), 2 bad input/usage.
Pass the prefix to training as data_path. Also ``python -m megatron_mile.cli.preprocess`` and
``python tools/preprocess_data.py`` (Megatron-LM's name).
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

from megatron_mile.cli import add_text_input_arguments


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``megatron-mile-preprocess``."""
    p = argparse.ArgumentParser(prog="megatron-mile-preprocess",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="text or JSONL files, processed in order; '-' reads stdin")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model, Hugging Face tokenizer.json, or a folder with one")
    add_text_input_arguments(p)
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="input MB per unit of work")
    p.add_argument("--log-interval", type=float, default=5.0,
                   help="seconds between progress lines (0: after every chunk)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run ``megatron-mile-preprocess``; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, job schedulers) unwinds like Ctrl-C, so temporary files are removed.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(args)
    finally:  # given back, for a caller that runs main() in its own process
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron_mile.data.preprocess import (
        BadInputError, WorkerDiedError, preprocess, token_dtype,
    )

    try:
        stats = preprocess(
            args.input, args.output_prefix, args.tokenizer_model,
            input_format=args.input_format, json_key=args.json_key,
            text_split=args.text_split, workers=args.workers, strict=args.strict,
            overwrite=args.overwrite, chunk_bytes=max(1, int(args.chunk_mb * 1e6)),
            log_interval_s=args.log_interval, progress=None if args.quiet else sys.stderr)
    except BadInputError as err:
        print(f"error: bad input (--strict): {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WorkerDiedError as err:
        print(f"error: {err}; nothing written to {args.output_prefix}.idx", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing written to {args.output_prefix}.idx", file=sys.stderr)
        return 1
    from megatron_mile.data.tokenizer import load_tokenizer
    vocab = load_tokenizer(args.tokenizer_model).vocab_size
    print(stats.summary(args.output_prefix, token_dtype(vocab).__name__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
