#!/usr/bin/env python
"""Megatron-LM habit: ``python tools/eval_token_frequency.py ...`` runs
``megatron-mile-eval-frequency`` (megatron_mile/cli/eval_frequency.py) from the installed
package."""

import sys

from megatron_mile.cli.eval_frequency import main

if __name__ == "__main__":
    sys.exit(main())
