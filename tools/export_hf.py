#!/usr/bin/env python
"""Megatron-LM habit: ``python tools/export_hf.py ...`` runs ``megatron-mile-export-hf``
(megatron_mile/cli/export_hf.py) from the installed package."""

import sys

from megatron_mile.cli.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
