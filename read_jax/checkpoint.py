"""Converted checkpoints on disk: a streaming writer, and the loader that restores them sharded.

A converted checkpoint (written by `convert_weights.py`, read_reference.md §10) is a directory:

    config.json        the read_jax ReadConfig (`read_jax.config.config_to_dict`)
    hf_config.json     the source checkpoint's HF config.json, kept for provenance
    tokenizer/         the tokenizer files, copied
    params/manifest.json
    params/part-00000/ params/part-00001/ ...   orbax PyTree checkpoints, each a subset of the leaves

Why parts: the converter streams the source shard by shard and must never hold the whole model in host
memory twice, but orbax writes a checkpoint from a pytree that is in memory. So converted leaves are buffered
up to `part_bytes` (256 MiB by default) and written as one orbax checkpoint per buffer ("part"); the manifest
records which part holds which leaf, with its shape and dtype. Restoring merges the parts.

Loading into a model (house style §8): `load_model` builds the model abstractly (`nnx.eval_shape`), computes
one `NamedSharding` per leaf from `read_jax.sharding` (FSDP over all devices by default), and lets orbax read
each device's slice of each leaf straight from disk (`ArrayRestoreArgs(sharding=...)`), so the 7B model is
never materialised on one device or on the host. Leaves that the checkpoint does not hold on purpose (LoRA
factors, modules that start from their init, RNG state) are created by a jitted init that returns only
those leaves, already sharded (XLA drops the rest of the init as dead code).

Leaf names are '/'-joined NNX state paths ('llava/language_model/model/layers/0/self_attn/q_proj/kernel').
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from read_jax.tree_util import path_str

log = logging.getLogger(__name__)

FORMAT = "read_jax/converted-params/1"
PARAMS_DIR = "params"
MANIFEST = "manifest.json"
CONFIG = "config.json"
HF_CONFIG = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_PART_BYTES = 256 << 20
# Leaves a checkpoint may lack without error: LoRA factors start from their init (B = 0).
DEFAULT_ALLOW_MISSING = (r"(.*/)?lora_[ab]",)


class CheckpointError(ValueError):
    """A converted checkpoint that is missing, incomplete, or does not fit the model it is loaded into."""


def _nest(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}} (the pytree orbax stores)."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, p + "/"))
        else:
            out[p] = v
    return out


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer()


def _part_writer(compress: bool):
    """A synchronous orbax writer for host numpy trees that does not copy them.

    Synchronous on purpose: an async save would keep the previous part's buffers alive while the next one
    fills. orbax's default NumpyHandler deep-copies every host array before writing (a guard against
    concurrent mutation); the PartWriter never touches a buffered array again, so the copy only doubles the
    memory of a part, and is switched off through a private handler registry (the global one is untouched).
    """
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization.type_handler_registry import create_type_handler_registry

    registry = create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()),  # unused; keeps orbax's array metadata store enabled
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=compress, type_handler_registry=registry)
    return ocp.Checkpointer(handler)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    The part buffers and orbax's write buffers are freed after each part, but glibc keeps freed chunks below
    its (adaptive, up to 32 MiB) mmap threshold in the heap, where fragmentation pins them: measured on the
    convert benchmark, the resident set grew by ~300 MiB over a few parts without this.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def owned_copy(a: np.ndarray) -> np.ndarray:
    """`a` if it owns its (anonymous) memory, else a C-contiguous copy (memmaps, torch-shared views)."""
    if a.base is None and a.flags.c_contiguous and not isinstance(a, np.memmap):
        return a
    return np.array(a, copy=True, order="C")


# ---- atomic outputs ----------------------------------------------------------------------------------------
# Every directory `atomic_directory` installs carries this file: `--overwrite` replaces only such a directory
# (or a converted checkpoint written before the marker existed, recognised by its manifest).
OUTPUT_MARKER = ".read_jax-output.json"
# Temporaries are `.<name>.tmp-<pid>@<host>-<hex>` (and `.old-` for a replaced output being removed): a later
# run into the same parent removes those whose process is gone.
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>.+)-[0-9a-f]{8}")
_LEGACY_TEMP = r"\.{name}\.(?:tmp|old)-[0-9a-f]{{8}}"  # before the pid was part of the name


class Interrupted(BaseException):
    """SIGTERM while an atomic output was being written (SIGINT raises KeyboardInterrupt, as usual)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def is_read_jax_output(path: str | os.PathLike) -> bool:
    """A directory read_jax wrote: it carries `OUTPUT_MARKER`, or it is a converted checkpoint."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    if (p / OUTPUT_MARKER).is_file():
        return True
    try:
        return json.loads((p / PARAMS_DIR / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _inside(a: Path, b: Path) -> bool:
    """`a` is `b` or lies under it (both resolved)."""
    return a == b or b in a.parents


def check_output(
    out_dir: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike | None] = ()
) -> Path:
    """The checks `atomic_directory` makes before anything is written (call it early to fail fast).

    An output may not be an input or contain one; an existing output is replaced only with `overwrite`, only
    when read_jax wrote it (`is_read_jax_output`) and only when it does not lie inside an input; its parent
    must be writable. Returns the absolute output path. Raises FileExistsError / PermissionError /
    ValueError with one line naming the path and what to do.
    """
    out = Path(os.path.abspath(out_dir))
    real = Path(os.path.realpath(out))
    for i in inputs:
        if i is None:
            continue
        src = Path(os.path.realpath(i))
        if _inside(src, real):
            what = "is" if src == real else "contains"
            raise ValueError(
                f"the output {out} {what} the input {i}: writing it would destroy the input; "
                "choose another output directory"
            )
        if overwrite and out.exists() and _inside(real, src):
            raise ValueError(
                f"the output {out} lies inside the input {i}: --overwrite never replaces part of an input; "
                "choose another output directory"
            )
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        if not is_read_jax_output(out):
            what = (
                f"a directory read_jax did not write (no {PARAMS_DIR}/{MANIFEST}, no {OUTPUT_MARKER})"
                if out.is_dir() and not out.is_symlink()
                else "not a directory"
            )
            raise FileExistsError(
                f"{out} exists and is {what}: --overwrite replaces only read_jax outputs; remove it yourself "
                "or choose another output"
            )
    anc = out.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot create {out}: {anc} is not a writable directory; choose another output location"
        )
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(parent: Path, name: str) -> list[Path]:
    """Remove the temporaries of interrupted runs in `parent` (their process on this host is gone); a
    replaced output that was renamed aside and never removed is renamed back if nothing took its place."""
    if not parent.is_dir():
        return []
    host, legacy = socket.gethostname(), re.compile(_LEGACY_TEMP.format(name=re.escape(name)))
    removed = []
    for p in parent.iterdir():
        m = _TEMP.fullmatch(p.name)
        if m is not None:
            if m["host"] != host or _alive(int(m["pid"])):
                continue
            target = parent / m["name"]
            if m["kind"] == "old" and not target.exists():
                os.rename(p, target)  # the crash came between the two renames: the old output is restored
                log.warning("restored %s from %s, left by an interrupted run", target, p.name)
                continue
        elif not legacy.fullmatch(p.name):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        log.warning("removed %s, left by an interrupted run", p)
        removed.append(p)
    return removed


_busy = 0  # > 0 while a writer's threads are writing into a temporary (signals are deferred)
_deferred: list[int] = []


def _raise_for(signum: int):
    raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


def _on_signal(signum, frame):
    if _busy and not _deferred:
        _deferred.append(signum)  # raised when the write in flight is complete (a second signal is not)
        return
    _raise_for(signum)


@contextlib.contextmanager
def writer_section() -> Iterator[None]:
    """Defer SIGINT/SIGTERM while writer threads (orbax's) write into a temporary, so that the cleanup of
    `atomic_directory` never runs while they still write; the signal is raised as soon as they are done."""
    global _busy
    _busy += 1
    try:
        yield
    finally:
        _busy -= 1
    if not _busy and _deferred:
        _raise_for(_deferred.pop())


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise in the main thread (SIGTERM would otherwise end the process without any
    cleanup); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _deferred.clear()


@contextlib.contextmanager
def atomic_directory(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Write a directory atomically: yields a hidden temporary sibling of `out_dir`, renamed to `out_dir` on
    success.

    `check_output` runs first (inputs are never overwritten; an existing `out_dir` is replaced only with
    `overwrite` and only if read_jax wrote it). The swap keeps the old output until the new one is complete:
    old renamed aside, new renamed in, old removed. On any error, SIGINT or SIGTERM included, the temporary
    is removed (after writer threads in flight are done, see `writer_section`); temporaries of interrupted
    runs in the same parent are removed first (`remove_stale_temporaries`).
    """
    out_dir = check_output(out_dir, overwrite=overwrite, inputs=inputs)
    parent = out_dir.parent
    tag = f"{os.getpid()}@{socket.gethostname()}"
    tmp = parent / f".{out_dir.name}.tmp-{tag}-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent, out_dir.name)
        tmp.mkdir()
    except OSError as e:
        raise PermissionError(
            f"cannot create {out_dir}: {e.strerror} ({e.filename}); choose another output location"
        ) from e
    with _signals_raise():
        try:
            yield tmp
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"writer": "read_jax", "time": time.time()}))
            if out_dir.exists():
                old = parent / f".{out_dir.name}.old-{tag}-{uuid.uuid4().hex[:8]}"
                os.rename(out_dir, old)
                os.rename(tmp, out_dir)
                shutil.rmtree(old)
            else:
                os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ---- writing -----------------------------------------------------------------------------------------------
class PartWriter:
    """Write leaves to `directory` (the `params/` folder) as a sequence of orbax parts of <= `part_bytes`.

    Usage: `w = PartWriter(dir); w.add(path, array) ...; manifest = w.close(extra={...})`. Arrays are host
    numpy (any dtype orbax handles, bf16 included); `add` copies arrays that do not own their memory, so the
    caller may hand in views of memory-mapped files.
    """

    def __init__(
        self, directory: str | os.PathLike, part_bytes: int = DEFAULT_PART_BYTES, *, compress: bool = True
    ):
        self.directory = Path(os.path.abspath(directory))  # orbax refuses relative paths
        self.directory.mkdir(parents=True, exist_ok=False)
        self.part_bytes = int(part_bytes)
        self.compress = compress
        self.buffer: dict[str, np.ndarray] = {}
        self.buffered = 0
        self.parts: list[dict] = []
        self.leaves: dict[str, dict] = {}
        self.written_bytes = 0

    def add(self, path: str, array: np.ndarray) -> None:
        if path in self.leaves or path in self.buffer:
            raise CheckpointError(f"leaf {path} written twice")
        a = owned_copy(np.asarray(array))
        if self.buffer and self.buffered + a.nbytes > self.part_bytes:
            self.flush()  # keep a part within budget (a single larger leaf gets a part of its own)
        self.buffer[path] = a
        self.buffered += a.nbytes
        if self.buffered >= self.part_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"part-{len(self.parts):05d}"
        with writer_section():
            _part_writer(self.compress).save(self.directory / name, _nest(self.buffer))
        for p, a in self.buffer.items():
            self.leaves[p] = {"shape": list(a.shape), "dtype": str(a.dtype), "part": name}
        self.parts.append({"dir": name, "leaves": sorted(self.buffer), "bytes": self.buffered})
        self.written_bytes += self.buffered
        self.buffer, self.buffered = {}, 0
        _release_freed_memory()

    def close(self, extra: Mapping[str, Any] | None = None) -> dict:
        """Flush and write `manifest.json` (extra keys merged in); returns the manifest."""
        self.flush()
        manifest = {
            "format": FORMAT,
            "parts": self.parts,
            "leaves": dict(sorted(self.leaves.items())),
            **dict(extra or {}),
        }
        (self.directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return manifest


# ---- reading -----------------------------------------------------------------------------------------------
def params_dir(directory: str | os.PathLike) -> Path:
    """`directory/params` for a converted checkpoint, or `directory` itself if it is the params folder; as an
    absolute path (orbax refuses relative ones)."""
    d = Path(os.path.abspath(directory))
    return d if (d / MANIFEST).is_file() else d / PARAMS_DIR


def read_manifest(directory: str | os.PathLike) -> dict:
    path = params_dir(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {directory} a converted read_jax checkpoint?)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_config(directory: str | os.PathLike):
    """The ReadConfig stored with a converted checkpoint."""
    from read_jax.config import read_config_from_dict

    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    return read_config_from_dict(json.loads(path.read_text()))


def _restore_part(part_dir: Path, want: Mapping[str, Any], restore_args: Mapping[str, Any]) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    out = _checkpointer().restore(
        part_dir,
        args=ocp.args.PyTreeRestore(item=_nest(want), restore_args=_nest(restore_args), partial_restore=True),
    )
    return _flatten(out)


def iter_parts(directory: str | os.PathLike, dtype=None) -> Iterator[dict[str, np.ndarray]]:
    """Host numpy leaves, one part at a time (what export streams through). `dtype` casts on read."""
    import orbax.checkpoint as ocp

    pdir = params_dir(directory)
    manifest = read_manifest(directory)
    for part in manifest["parts"]:
        want = {p: np.zeros((), np.float32) for p in part["leaves"]}  # only the tree structure is used
        args = {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype) for p in part["leaves"]}
        yield _restore_part(pdir / part["dir"], want, args)


def restore_leaves(
    directory: str | os.PathLike, targets: Mapping[str, Any], shardings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Restore the leaves named in `targets` (path -> ShapeDtypeStruct-like) from a converted checkpoint.

    With `shardings` (path -> jax.sharding.Sharding) every leaf becomes a jax.Array laid out that way, each
    device reading only its slice from disk; without, host numpy arrays. Leaves are cast to the target dtype.
    Raises CheckpointError listing every target leaf the checkpoint lacks and every shape mismatch.
    """
    import orbax.checkpoint as ocp

    pdir = params_dir(directory)
    manifest = read_manifest(directory)
    stored = manifest["leaves"]
    problems = [f"{p}: not in the checkpoint" for p in sorted(targets) if p not in stored]
    problems += [
        f"{p}: checkpoint shape {tuple(stored[p]['shape'])} != model shape {tuple(t.shape)}"
        for p, t in sorted(targets.items())
        if p in stored and tuple(stored[p]["shape"]) != tuple(t.shape)
    ]
    if problems:
        raise CheckpointError(f"{pdir}: {len(problems)} problems:\n  " + "\n  ".join(problems))
    by_part: dict[str, list[str]] = {}
    for p in targets:
        by_part.setdefault(stored[p]["part"], []).append(p)
    out: dict[str, Any] = {}
    for part, paths in by_part.items():
        want, args = {}, {}
        for p in paths:
            t = targets[p]
            want[p] = t
            if shardings is not None:
                args[p] = ocp.ArrayRestoreArgs(
                    sharding=shardings[p], global_shape=tuple(t.shape), dtype=t.dtype
                )
            else:
                args[p] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype)
        out.update(_restore_part(pdir / part, want, args))
    return out


def leaf_shardings(
    abstract: Mapping[str, Any],
    mesh,
    strategy=None,
    *,
    param_paths: Sequence[str] | None = None,
    min_fsdp_bytes: int = 1 << 20,
) -> dict[str, Any]:
    """NamedSharding per '/'-path: `read_jax.sharding` rules for checkpointed leaves (`param_paths`),
    replicated for everything else (RNG keys and counters: typed keys have no itemsize to shard by)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from read_jax import sharding as shd

    strategy = shd.DEFAULT_STRATEGY if strategy is None else strategy
    params = set(abstract if param_paths is None else param_paths)
    out = {}
    for p, t in abstract.items():
        if p in params:
            out[p] = NamedSharding(mesh, shd.spec_for(p, t.shape, t.dtype, mesh, strategy, min_fsdp_bytes))
        else:
            out[p] = NamedSharding(mesh, P())
    return out


def restore_model(
    directory: str | os.PathLike,
    model_fn: Callable[[], Any],
    *,
    mesh=None,
    strategy=None,
    allow_missing: Sequence[str] | None = None,
):
    """The model `model_fn` builds, with every leaf restored from a converted checkpoint into its sharding.

    `read_jax.build.load_model` is the public loader; this is its converted-checkpoint half.

    Args:
      directory: a converted checkpoint (the output of `convert_weights.py`).
      model_fn: builds the model eagerly (`read_jax.build.model_fn(cfg)`); only traced here (abstractly, and
        under jit for the leaves the checkpoint lacks).
      mesh: default: every device on the `fsdp` axis (`read_jax.sharding.make_mesh(1, -1)`).
      strategy: `read_jax.sharding` parameter rules (default FSDP on everything large).
      allow_missing: regexes of parameter paths the checkpoint may lack (they keep their init). Default: LoRA
        factors plus the leaves the converter recorded as left to init (`manifest["uninitialized"]`).
    Returns:
      The NNX model with sharded jax.Array leaves.
    """
    import jax
    from flax import nnx

    from read_jax import sharding as shd

    mesh = shd.make_mesh(1, -1) if mesh is None else mesh
    manifest = read_manifest(directory)
    if allow_missing is None:
        recorded = [re.escape(p) for p in manifest.get("uninitialized", [])]
        allow_missing = list(DEFAULT_ALLOW_MISSING) + recorded
    allow = [re.compile(p) for p in allow_missing]

    abstract = nnx.eval_shape(model_fn)
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    leaves = {path_str(p): v.get_value() for p, v in flat}
    # Checkpointed: every variable but RNG state (params, LoRA factors, buffers such as SAM's Gaussian PE).
    params = {path_str(p) for p, v in flat if not isinstance(v, nnx.RngState)}
    shardings = leaf_shardings(leaves, mesh, strategy, param_paths=sorted(params))

    stored = manifest["leaves"]
    from_ckpt = {p: leaves[p] for p in params if p in stored}
    absent = sorted(p for p in params if p not in stored)
    bad = [p for p in absent if not any(r.fullmatch(p) for r in allow)]
    if bad:
        raise CheckpointError(
            f"{directory}: {len(bad)} model parameters are not in the checkpoint:\n  " + "\n  ".join(bad)
        )
    extra = sorted(set(stored) - set(leaves))
    if extra:
        raise CheckpointError(
            f"{directory}: {len(extra)} checkpoint leaves have no place in the model:\n  "
            + "\n  ".join(extra)
        )
    values = restore_leaves(directory, from_ckpt, {p: shardings[p] for p in from_ckpt})

    need = sorted(set(leaves) - set(values))
    if need:

        def init_subset():
            fl = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model_fn()))}
            return {p: fl[p] for p in need}

        values.update(jax.jit(init_subset, out_shardings={p: shardings[p] for p in need})())

    for p, v in flat:
        v.set_value(values[path_str(p)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
