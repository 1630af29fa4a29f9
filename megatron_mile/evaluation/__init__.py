"""Evaluation of trained checkpoints: per-token-frequency losses.

``loading.py`` rebuilds a model of any TP/PP layout from a checkpoint of any other layout,
``token_frequency.py`` buckets validation losses by training-corpus token frequency (the
paper's analysis); ``hf_export.py`` re-exports the Hugging Face export, which lives in
:mod:`megatron_mile.hf.export`. The command lines are ``megatron-mile-eval-frequency`` and
``megatron-mile-export-hf`` (docs/evaluation.md).
"""
