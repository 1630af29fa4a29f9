"""Convert a megatron-mile checkpoint (any TP/PP layout) to a Hugging Face model folder of its
model family (model.family; LlamaForCausalLM for llama, docs/models.md).

    megatron-mile-export-hf --load runs/mile --output hf/mile
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/mile')"

Writes config.json, model.safetensors, generation_config.json and the tokenizer files (the
SentencePiece tokenizer.model + tokenizer_config.json, or the Hugging Face tokenizer.json with
its config) into --output, a new or empty folder outside --load (--overwrite replaces the
Hugging Face files of an existing one, an older export's shards and index included; bad input:
one line, exit 2). The vocabulary is cut to the real one (training leaves the rows
padded for TP out of the softmax); --no-trim-vocab keeps the padded rows. See
megatron_mile/hf/export.py and the family's megatron_mile/models/<family>.py for the name map
and conventions, docs/evaluation.md for
lm-evaluation-harness. Needs `safetensors`.
Also ``python -m megatron_mile.cli.export_hf`` and ``python tools/export_hf.py``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``megatron-mile-export-hf``; returns the exit status."""
    from megatron_mile.cpu_compat import cuda_available
    from megatron_mile.log_filters import install_warning_filters

    install_warning_filters(cuda=cuda_available())  # before megatron-core is imported
    parser = argparse.ArgumentParser(prog="megatron-mile-export-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint.save directory of a run")
    parser.add_argument("--output", required=True, help="HF model folder to write")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="weights dtype (default: the training dtype)")
    parser.add_argument("--trim-vocab", action=argparse.BooleanOptionalAction, default=True,
                        help="cut the padded embedding/output rows to the real vocabulary (the "
                             "default, the faithful export: training leaves padded rows out of "
                             "the softmax); --no-trim-vocab keeps them")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow an --output that is not empty or lies in the checkpoint "
                             "folder; its Hugging Face files (weights, index, config, tokenizer) "
                             "are replaced, none of an older export is left")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. data.tokenizer_model=/new/path/tok.model")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from megatron_mile.errors import INPUT_ERRORS, cli_error
    from megatron_mile.hf.export import export_checkpoint
    from megatron_mile.launch import default_single_process_env

    default_single_process_env()
    try:
        config = export_checkpoint(args.load, args.output, dtype=args.dtype,
                                   trim_vocab=args.trim_vocab, iteration=args.iteration,
                                   overrides=args.overrides, overwrite=args.overwrite)
    except INPUT_ERRORS as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        return cli_error(parser.prog, e)
    if dist.get_rank() == 0:
        info = config["megatron_mile"]
        print(f"exported iteration {info['iteration']} of {args.load} ({info['loss']}) to "
              f"{args.output}: vocab_size {config['vocab_size']} (tokenizer "
              f"{info['tokenizer_vocab_size']}), dtype {config['torch_dtype']}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
