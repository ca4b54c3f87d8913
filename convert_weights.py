#!/usr/bin/env python
"""Convert released READ checkpoints to read_jax and back (`read_jax.cli.convert`): see `--help`."""

import sys

from read_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
