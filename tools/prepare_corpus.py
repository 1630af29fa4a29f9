#!/usr/bin/env python
"""Megatron-LM habit: ``python tools/prepare_corpus.py ...`` runs ``megatron-mile-prepare-corpus``
(megatron_mile/cli/prepare_corpus.py) from the installed package."""

import sys

from megatron_mile.cli.prepare_corpus import main

if __name__ == "__main__":
    sys.exit(main())
