#!/usr/bin/env python
"""Megatron-LM habit: ``python tools/import_hf.py ...`` runs ``megatron-mile-import-hf``
(megatron_mile/cli/import_hf.py) from the installed package."""

import sys

from megatron_mile.cli.import_hf import main

if __name__ == "__main__":
    sys.exit(main())
