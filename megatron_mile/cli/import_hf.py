"""Convert a Hugging Face model folder of a known model family (LlamaForCausalLM; see
docs/models.md) into a megatron-mile checkpoint.

    megatron-mile-import-hf --hf /models/llama-2-7b --output ckpt/llama2-7b-import
    megatron-mile-train --config llama_6.7b checkpoint.init_from_hf=/models/llama-2-7b \\
        checkpoint.load=ckpt/llama2-7b-import checkpoint.load_optimizer=false ...

Reads config.json and the safetensors (single or sharded) of a LOCAL folder, memory-mapped,
and writes iteration 0 (weights only) with the model shape of config.json; the checkpoint
loads into any TP/PP layout. ``checkpoint.init_from_hf`` in the trainer does the same import
at start without this step; this tool runs it once, on one node (under torchrun with
``parallel.*`` overrides each rank holds only its slice). Bad input: one line, exit 2.
Also ``python -m megatron_mile.cli.import_hf`` and ``python tools/import_hf.py``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``megatron-mile-import-hf``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="megatron-mile-import-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="local Hugging Face model folder")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--config", default=None,
                        help="config file or shipped name the non-shape fields come from "
                             "(saved with the checkpoint; default: the built-in defaults)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="parameter dtype (default: config.json's torch_dtype)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from megatron_mile.hf.importer import import_to_checkpoint
    from megatron_mile.errors import INPUT_ERRORS, cli_error
    from megatron_mile.launch import default_single_process_env, initialize_distributed

    default_single_process_env()
    try:
        initialize_distributed()
        cfg = import_to_checkpoint(args.hf, args.output, config=args.config,
                                   overrides=args.overrides, dtype=args.dtype)
    except INPUT_ERRORS as e:
        return cli_error(parser.prog, e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        m = cfg.model
        print(f"imported {args.hf} to {args.output}: {m.num_layers} layers, hidden "
              f"{m.hidden_size}, heads {m.num_attention_heads}/{m.num_query_groups}, vocab "
              f"{m.vocab_size}, {'untied' if m.untie_embeddings else 'tied'}, "
              f"{cfg.precision.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
