#!/usr/bin/env python
"""Train READ (`read_jax.cli.train`): `python train.py --config configs/tiny.py:read --workdir DIR`."""

import sys

from read_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
