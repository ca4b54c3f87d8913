#!/usr/bin/env python
"""Evaluate a READ checkpoint (`read_jax.cli.evaluate`): `python evaluate.py --config C --checkpoint D --split
S`."""

import sys

from read_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
