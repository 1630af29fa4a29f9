#!/usr/bin/env python
"""Memory of a Hugging Face import at each stage, per rank (docs/launching.md's table).

    python tools/measure_import_memory.py --make /tmp/hf_168m        # the measured model, once
    python tools/measure_import_memory.py --hf /tmp/hf_168m --output /tmp/imp --dtype bf16
    torchrun --nproc-per-node 2 tools/measure_import_memory.py --hf /tmp/hf_168m \\
        --output /tmp/imp_tp2 --dtype bf16 parallel.tensor_model_parallel_size=2

Prints, from /proc/self/status, RssAnon (private memory), RssFile (mapped files: the
safetensors pages while they are mapped) and VmHWM (peak RSS) before the model is built,
after it is built, after the import and after the checkpoint is written. Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys


def _status(stage: str) -> None:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(line.split()[1]) / 1024  # kB -> MiB
    print(f"rank {os.environ.get('RANK', '0')} {stage:17s} RssAnon {fields['RssAnon']:7.0f} MiB"
          f"  RssFile {fields['RssFile']:6.0f} MiB  peak VmHWM {fields['VmHWM']:6.0f} MiB",
          flush=True)


def _make(folder: str) -> None:
    """The 168.3 M-parameter LlamaForCausalLM of the table (random, fp32, 4 shards)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024,
                                      intermediate_size=2816, num_hidden_layers=8,
                                      num_attention_heads=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make", help="write the measured model into this folder and exit")
    parser.add_argument("--hf")
    parser.add_argument("--output")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.make:
        _make(args.make)
        return 0

    import megatron_mile.hf.importer as importer
    import megatron_mile.training.builders as builders
    from megatron_mile.training import checkpoint
    from megatron_mile.launch import default_single_process_env, initialize_distributed

    def traced(fn, before, after):
        def wrapper(*a, **k):
            if before:
                _status(before)
            out = fn(*a, **k)
            _status(after)
            return out
        return wrapper

    # import_to_checkpoint looks these up at call time: wrap them to report each stage.
    builders.build_model = traced(builders.build_model, "before build", "model built")
    importer.import_hf_weights = traced(importer.import_hf_weights, None,
                                        "weights imported")
    checkpoint.save = traced(checkpoint.save, None,
                             "checkpoint saved")
    default_single_process_env()
    initialize_distributed()
    importer.import_to_checkpoint(args.hf, args.output, dtype=args.dtype,
                                  overrides=args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
