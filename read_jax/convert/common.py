"""The conversion engine: a regex key table applied strictly to a stream of (key, array) pairs.

Every family (LLaMA, CLIP, projector, fcs, SAM, PEFT LoRA) is a table of `Rule(source_regex, target_template,
transform)`. `Converter` fills an abstract target tree (from `nnx.eval_shape`) one key at a time, so a
checkpoint can be streamed shard by shard, and raises **one** `ConversionError` at `finish()` listing
every unmatched source key, every unfilled target leaf and every shape/dtype mismatch. Keys that are
legitimately dropped are listed explicitly in `ignore` (never a silent `continue`, house style §3.9).

This module is numpy-only: torch is needed only to *read* a `.bin`/`.pth` (`read_jax.convert.io`), and the
tests feed torch state dicts through these same tables ("one mapping, not two").

Target paths are '/'-joined NNX state paths, e.g. 'language_model/model/layers/3/self_attn/q_proj/kernel'.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from read_jax.tree_util import abstract_leaves, load_leaves, path_str  # noqa: F401 - re-exported for key-table users

Array = np.ndarray
Transform = Callable[[Array], Array]

# Where each part of a READ checkpoint lives in `read_jax.read_model.ReadModel` ('/'-joined NNX paths).
LANGUAGE_MODEL = "llava/language_model/"
VISION_TOWER = "llava/vision_tower/"
MM_PROJECTOR = "llava/mm_projector/"
VISUAL_MODEL = "visual_model/"


# ---- transforms (PyTorch layout -> Flax layout) -----------------------------------------------------
def identity(x: Array) -> Array:
    return x


def linear(x: Array) -> Array:
    """torch Linear.weight [out, in] -> Flax kernel [in, out]."""
    return np.ascontiguousarray(x.T)


def conv(x: Array) -> Array:
    """torch Conv2d.weight [O, I, kh, kw] -> Flax Conv kernel [kh, kw, I, O]."""
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def conv_transpose(x: Array) -> Array:
    """torch ConvTranspose2d.weight [I, O, kh, kw] -> Flax ConvTranspose kernel [kh, kw, I, O].

    Flax's ConvTranspose (transpose_kernel=False) is a dilated-input convolution, which applies the kernel
    spatially flipped relative to torch's scatter formulation, hence the flip.
    """
    return np.ascontiguousarray(x.transpose(2, 3, 0, 1)[::-1, ::-1])


def squeeze0(x: Array) -> Array:
    """[1, D] embedding tables stored as a vector (e.g. SAM's single-token embeddings)."""
    return x.reshape(x.shape[1:]) if x.shape[:1] == (1,) else x


INVERSE: dict[Transform, Transform] = {
    identity: identity,
    linear: linear,
    conv: lambda x: np.ascontiguousarray(x.transpose(3, 2, 0, 1)),
    conv_transpose: lambda x: np.ascontiguousarray(x[::-1, ::-1].transpose(2, 3, 0, 1)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """`source` is a full-match regex over source keys; `target` a template with \\1-style groups."""

    source: str
    target: str
    transform: Transform = identity

    def __post_init__(self):
        object.__setattr__(self, "_re", re.compile(self.source))

    def match(self, key: str) -> str | None:
        m = self._re.fullmatch(key)  # type: ignore[attr-defined]
        return None if m is None else m.expand(self.target)


class ConversionError(ValueError):
    """Everything that went wrong in one conversion, listed at once."""


def prefixed(rules: Sequence[Rule], src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """The same table under other key prefixes (e.g. SAM inside a READ checkpoint)."""
    return [
        Rule(re.escape(src_prefix) + r.source if src_prefix else r.source, dst_prefix + r.target, r.transform)
        for r in rules
    ]


class Converter:
    """Fill `target` (path -> ShapeDtypeStruct-like) from (key, array) pairs through `rules`.

    Args:
      rules: the key table; the first matching rule wins.
      target: abstract leaves; every one must be filled unless it matches `allow_unfilled`.
      ignore: regexes of source keys dropped on purpose (e.g. rotary inv_freq, SAM mask_downscaling).
      allow_unfilled: regexes of target paths that legitimately keep their init (LoRA, new modules).
      dtype: cast every leaf to this dtype; default: the target leaf's dtype.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        target: Mapping[str, Any],
        *,
        ignore: Sequence[str] = (),
        allow_unfilled: Sequence[str] = (),
        dtype=None,
    ):
        self.rules = list(rules)
        self.target = dict(target)
        self.ignore = [re.compile(p) for p in ignore]
        self.allow_unfilled = [re.compile(p) for p in allow_unfilled]
        self.dtype = dtype
        self.out: dict[str, Array] = {}
        self.unmatched: list[str] = []
        self.ignored: list[str] = []
        self.errors: list[str] = []

    def map_key(self, key: str) -> str | None:
        for r in self.rules:
            t = r.match(key)
            if t is not None:
                return t
        return None

    def add(self, key: str, value: Array) -> None:
        """Map, transform, check and store one source tensor (already a numpy array)."""
        if any(p.fullmatch(key) for p in self.ignore):
            self.ignored.append(key)
            return
        rule = next((r for r in self.rules if r.match(key) is not None), None)
        if rule is None:
            self.unmatched.append(key)
            return
        dst = rule.match(key)
        if dst not in self.target:
            self.errors.append(f"{key} -> {dst}: no such target leaf")
            return
        if dst in self.out:
            self.errors.append(f"{key} -> {dst}: target filled twice")
            return
        arr = rule.transform(np.asarray(value))
        want = self.target[dst]
        if tuple(arr.shape) != tuple(want.shape):
            self.errors.append(f"{key} -> {dst}: shape {tuple(arr.shape)} != expected {tuple(want.shape)}")
            return
        dtype = self.dtype or want.dtype
        self.out[dst] = np.asarray(arr).astype(dtype, copy=False)

    def add_all(self, items: Mapping[str, Array] | Iterable[tuple[str, Array]]) -> Converter:
        for k, v in items.items() if isinstance(items, Mapping) else items:
            self.add(k, v)
        return self

    def missing(self) -> list[str]:
        return sorted(
            p
            for p in self.target
            if p not in self.out and not any(r.fullmatch(p) for r in self.allow_unfilled)
        )

    def finish(self) -> dict[str, Array]:
        """The filled leaves; raises one ConversionError listing every problem."""
        problems = []
        if self.unmatched:
            problems.append(
                f"{len(self.unmatched)} source keys match no rule and no ignore pattern:\n  "
                + "\n  ".join(sorted(self.unmatched))
            )
        if self.errors:
            problems.append(f"{len(self.errors)} mapping errors:\n  " + "\n  ".join(self.errors))
        miss = self.missing()
        if miss:
            problems.append(f"{len(miss)} target leaves were not filled:\n  " + "\n  ".join(miss))
        if problems:
            raise ConversionError("\n".join(problems))
        return self.out


def convert(
    source: Mapping[str, Array], rules: Sequence[Rule], target: Mapping[str, Any], **kw
) -> dict[str, Array]:
    """One-shot `Converter(...).add_all(source).finish()`."""
    return Converter(rules, target, **kw).add_all(source).finish()


def export_leaves(
    leaves: Mapping[str, Array],
    rules: Sequence[Rule],
    inverse: Mapping[str, tuple[str, Transform]] | None = None,
) -> dict[str, Array]:
    """Invert a table for export: target path -> source key, using INVERSE transforms.

    Works for rules whose source regex is a literal pattern with groups that appear in the target
    template in the same order (all of read_jax's tables are written that way).
    """
    out = {}
    for path, arr in leaves.items():
        for r in rules:
            src = _invert_rule(r, path)
            if src is not None:
                inv = INVERSE.get(r.transform)
                if inv is None:
                    raise ConversionError(f"no inverse transform for {r.transform} ({path})")
                out[src] = inv(np.asarray(arr))
                break
    return out


def _invert_rule(rule: Rule, path: str) -> str | None:
    # Turn the target template into a regex and the source regex into a template.
    groups = re.findall(r"\(([^)]*)\)", rule.source)
    tpat = ""
    parts = re.split(r"(\\\d)", rule.target)
    for p in parts:
        m = re.fullmatch(r"\\(\d)", p)
        if m:
            tpat += f"(?P<g{m.group(1)}>{groups[int(m.group(1)) - 1]})"
        else:
            tpat += re.escape(p)
    m = re.fullmatch(tpat, path)
    if m is None:
        return None
    src, k = "", 0
    for tok in re.split(r"(\([^)]*\))", rule.source):
        if tok.startswith("(") and tok.endswith(")"):
            k += 1
            src += m.group(f"g{k}")
        else:
            src += tok.replace("\\.", ".").replace("\\", "")
    return src
