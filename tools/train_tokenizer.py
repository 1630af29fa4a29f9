#!/usr/bin/env python
"""Megatron-LM habit: ``python tools/train_tokenizer.py ...`` runs ``megatron-mile-train-tokenizer``
(megatron_mile/cli/train_tokenizer.py) from the installed package."""

import sys

from megatron_mile.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
