"""The XLA options read_jax sets for itself, in one place: XLA:CPU's memory plan for 7B-sized models.

On the CPU, XLA materialises an fp32 copy of every bf16 weight that a loop or a long program reads, and keeps
them all live at once:
  * `while-loop-invariant-code-motion` hoists each layer's bf16 -> fp32 convert out of the decoding
    `while_loop` (`read_jax.llama_generate.generate`), so every converted weight lives for the whole loop;
  * the concurrency-optimised scheduler orders a forward so that many of those converts run early and stay
    live together (the teacher-forced forward of `predict`, evaluation's encode stage).
Measured at 7B (13.5 GB of bf16 LLaMA weights, issue 16): temporaries of 25.6 GiB (generate), 28.4 GiB (the
full forward) and 28.3 GiB (evaluation's encode) with the defaults; 0.8 / 2.1 GiB with `CPU_MEMORY_FLAGS`, and
`chat` then completes at ~20 GiB peak host memory instead of being OOM-killed on a 24 GB machine. The issue
was measured on XLA:CPU only, so other backends keep XLA's defaults (loop-invariant code motion is a useful
pass where memory allows it).

XLA reads `XLA_FLAGS` once, when JAX initialises its first backend: `apply_cpu_memory_flags()` must run
before anything touches a device. Every command calls it first (`read_jax.cli.common.run_main`); a library
user on the CPU calls it at the top of the program (or sets the flags in `XLA_FLAGS` by hand). A flag already
present in `XLA_FLAGS` is left as the user set it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import MutableMapping

CPU_MEMORY_FLAGS = (
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "--xla_disable_hlo_passes=while-loop-invariant-code-motion",
)


def _backends_initialised() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def _accelerator_plugin_installed() -> bool:
    """A PJRT plugin (CUDA, ROCm, ...) or libtpu is installed: JAX may pick an accelerator."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins  # the namespace package older plugins install into
    except ImportError:
        return False
    import pkgutil

    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def runs_on_cpu(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether JAX will run this process on the CPU, decided without initialising a backend.

    `JAX_PLATFORMS` (or `jax.config.jax_platforms`) decides when set: its first entry is JAX's default
    platform. Otherwise the CPU is the platform exactly when no accelerator plugin is installed (with one
    installed but no device present JAX falls back to the CPU; set JAX_PLATFORMS=cpu to get the flags then).
    """
    import jax

    platforms = environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not _accelerator_plugin_installed()


def apply_cpu_memory_flags(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Append `CPU_MEMORY_FLAGS` to `XLA_FLAGS` when this process will run on the CPU.

    Returns whether any flag was added: False on an accelerator, when every flag is already set (by the user,
    or by an earlier call), and when a backend is already initialised (too late for XLA_FLAGS to act).
    """
    if _backends_initialised() or not runs_on_cpu(environ):
        return False
    current = environ.get("XLA_FLAGS", "")
    present = {f.split("=", 1)[0] for f in current.split()}
    new = [f for f in CPU_MEMORY_FLAGS if f.split("=", 1)[0] not in present]
    if new:
        environ["XLA_FLAGS"] = " ".join([current.strip(), *new]).strip()
    return bool(new)
