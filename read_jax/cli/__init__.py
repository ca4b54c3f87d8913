"""The command-line tools, one module each, all of one shape: a docstring that is the help, an argparse parser
(`common.parser`), `main(argv=None) -> int`, input errors printed as one line (`--debug` for the traceback).

`train.py`, `evaluate.py` and `convert_weights.py` at the repository root call `train.main`, `evaluate.main`
and
`convert.main`; the chat command is `python -m read_jax.cli.chat`.
"""
