"""Evaluation of trained checkpoints: per-token-frequency losses and Hugging Face export.

``loading.py`` rebuilds a model of any TP/PP layout from a checkpoint of any other layout,
``token_frequency.py`` buckets validation losses by training-corpus token frequency (the
paper's analysis), ``hf_export.py`` maps the weights to ``LlamaForCausalLM``. The command
lines are ``megatron-mile-eval-frequency`` and ``megatron-mile-export-hf`` (docs/evaluation.md).
"""
