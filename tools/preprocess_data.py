#!/usr/bin/env python
"""Megatron-LM habit: ``python tools/preprocess_data.py ...`` runs ``megatron-mile-preprocess``
(megatron_mile/cli/preprocess.py) from the installed package."""

import sys

from megatron_mile.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
