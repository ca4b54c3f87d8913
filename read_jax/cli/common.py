"""What every read_jax command shares: run-config files with `--config.<section>.<key>=value` overrides,
logging,
and one-line errors (a traceback only with `--debug`)."""

from __future__ import annotations

import argparse
import ast
import difflib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from ml_collections import ConfigDict

from read_jax.config import ConfigError
from read_jax.train import config as run_config

OVERRIDE_PREFIX = "--config."


def parser(prog: str, doc: str, *, config: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with the module docstring as its help, `--debug`, and (config=True) `--config`."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if config:
        p.add_argument(
            "--config",
            required=True,
            metavar="FILE[:ARG]",
            help="a configs/*.py file (optionally `file.py:arg`); override any field with "
            "--config.<section>.<key>=value",
        )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """argv -> (the other arguments, [(dotted key, value)]) for `--config.a.b=v` and `--config.a.b v`."""
    rest, overrides = [], []
    it = iter(argv)
    for a in it:
        if not a.startswith(OVERRIDE_PREFIX):
            rest.append(a)
            continue
        key, eq, value = a[len(OVERRIDE_PREFIX) :].partition("=")
        if not eq:
            value = next(it, None)
            if value is None:
                raise ConfigError(f"{a} needs a value")
        overrides.append((key, value))
    return rest, overrides


def _parse_value(text: str, current):
    """The override's text as the type of the value it replaces (literal syntax for tuples, dicts, None)."""
    if isinstance(current, bool):
        low = text.lower()
        if low not in ("true", "false", "1", "0"):
            raise ValueError(f"want true/false, got {text!r}")
        return low in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def apply_overrides(config: ConfigDict, overrides: Sequence[tuple[str, str]]) -> ConfigDict:
    """Set each dotted key of `config`; a key the config does not have is an error naming it."""
    for key, text in overrides:
        *path, leaf = key.split(".")
        node = config
        for i, part in enumerate(path):
            if not isinstance(node, (ConfigDict, dict)) or part not in node:
                raise ConfigError(f"--config.{key}: the config has no section {'.'.join(path[: i + 1])!r}")
            node = node[part]
        if not isinstance(node, (ConfigDict, dict)) or leaf not in node:
            near = difflib.get_close_matches(leaf, list(node.keys()) if hasattr(node, "keys") else [], 1)
            hint = f" (did you mean {'.'.join([*path, near[0]])!r}?)" if near else ""
            raise ConfigError(f"--config.{key}: unknown config key{hint}")
        try:
            node[leaf] = _parse_value(text, node[leaf])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--config.{key}={text}: {e}") from e
    return config


def load_run_config(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ConfigDict:
    """A `--config FILE[:ARG]` file with its overrides applied, validated (unknown keys are errors)."""
    config = apply_overrides(run_config.load_config_file(spec), overrides)
    run_config.validate(config)
    return config


def setup_logging() -> None:
    # force: importing absl (through grain) has already put a handler on the root logger.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Errors that describe the user's input or environment: printed as one line (exit 2) unless --debug.
USER_ERRORS = (ConfigError, ValueError, OSError)


def absolute(path: str | None) -> str | None:
    """A path argument resolved against the working directory at the command's boundary (orbax, and any
    later `chdir`, see only absolute paths); None stays None."""
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def run_main(prog: str, body: Callable[[], int], debug: bool) -> int:
    """Run a command's body; an input error becomes `prog: error: ...` on stderr and exit status 2 (errors
    that list several keys or files keep their list), an interruption (SIGINT, SIGTERM) one line and exit
    status 128 + the signal number; `--debug` shows the traceback instead.

    First, on the CPU, the XLA options that keep a 7B model's memory plan near one copy of the weights
    (`read_jax.xla_flags`; they must be set before JAX initialises a backend).
    """
    from read_jax import xla_flags
    from read_jax.checkpoint import Interrupted

    xla_flags.apply_cpu_memory_flags()
    try:
        return body()
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        if debug:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        print(
            f"{prog}: interrupted ({signal.Signals(signum).name}); partial outputs were removed",
            file=sys.stderr,
        )
        return 128 + int(signum)


def stage_main(prog: str, doc: str, argv, *, outputs: str, stage: str, module: str, summary) -> int:
    """The command of a from-scratch pretraining stage (`pretrain_sam`, `pretrain_vision`): `--config`,
    `--workdir`, `--no-eval`, `--stop-at`, overrides; `module` (imported late, jax with it) has `validate`
    and `run(config, workdir, evaluate=, stop_at=)`; `summary(out)` is the finished stage's last line.
    Exit status: 0 done (or stopped at `--stop-at`), 2 bad input, 3 a non-finite training step."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rest, overrides = split_overrides(argv)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    p = parser(prog, doc, config=True)
    p.add_argument("--workdir", required=True, help=f"run directory: {outputs}")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument(
        "--stop-at", type=int, default=None, metavar="STEP", help="stop after this step (rerun to continue)"
    )
    args = p.parse_args(rest)

    def body() -> int:
        import importlib

        from read_jax.train import NonFiniteLossError
        from read_jax.train.config import load_config_file

        mod = importlib.import_module(module)
        config = apply_overrides(load_config_file(args.config), overrides)
        mod.validate(config)
        try:
            out = mod.run(config, absolute(args.workdir), evaluate=not args.no_eval, stop_at=args.stop_at)
        except NonFiniteLossError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 3
        if out["final_step"] < out["total_steps"]:
            print(f"{stage}: stopped at step {out['final_step']} of {out['total_steps']}; rerun to continue")
            return 0
        print(
            f"{stage}: step {out['final_step']}, {out['wall_s']:.0f}s; weights {out['export']}" + summary(out)
        )
        return 0

    setup_logging()
    return run_main(prog, body, args.debug)
