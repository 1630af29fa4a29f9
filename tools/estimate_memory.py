#!/usr/bin/env python
"""Megatron-LM habit: ``python tools/estimate_memory.py ...`` runs ``megatron-mile-estimate-memory``
(megatron_mile/cli/estimate_memory.py) from the installed package."""

import sys

from megatron_mile.cli.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
