"""The converter's checks of what would otherwise convert silently or fail deep inside a library, each as one
error naming the file, key or flag and what to do: non-finite weights, a config.json without its sizes, a
tokenizer.model that is not one, added tokens READ's vocabulary has no row for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from read_jax.config import ConfigError
from read_jax.convert.common import ConversionError

# Written into every LLaMA/LLaVA config.json by transformers (model attributes are never diffed away).
SIZE_ATTRIBUTES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_CHUNK = 1 << 24  # elements per isfinite pass: bounded temporary memory on a 32003 x 5120 matrix


def require_sizes(hf: Mapping[str, Any], path: str | os.PathLike) -> None:
    """A config.json must state the model's sizes: a default (LLaMA-7B's) would only show up later as a
    shape error on every weight."""
    missing = [k for k in SIZE_ATTRIBUTES if k not in hf]
    if missing:
        raise ConfigError(
            f"{path}: no {', '.join(missing)}; transformers writes the sizes into every LLaMA/LLaVA "
            "config.json, so this one is incomplete or not the checkpoint's (use the release's config.json)"
        )


def load_sentencepiece(path: str | os.PathLike):
    """A SentencePieceProcessor, or a ConfigError naming the file (sentencepiece raises RuntimeError)."""
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"{path}: not a readable SentencePiece model ({first}); copy tokenizer.model from the release "
            "again"
        ) from e


def refuse_extra_added_tokens(
    found: Mapping[str, tuple[int, str]], allowed: Mapping[str, int], base: int, tok_dir: Path
) -> None:
    """Added tokens besides READ's: every entry of added_tokens.json (read_jax's tokenizer refuses others at
    load), and any added token of tokenizer_config.json / tokenizer.json at an id >= `base` (the model's
    vocabulary has no row for it)."""
    for tok, (idx, where) in sorted(found.items()):
        if tok in allowed or (where != "added_tokens.json" and idx < base):
            continue
        raise ConfigError(
            f"{tok_dir / where}: added token {tok!r}={idx} is not one of READ's {list(allowed)}; the model "
            f"has {base + len(allowed)} embedding rows and read_jax's tokenizer takes no other added token: "
            f"remove it from {where}"
        )


def count_nonfinite(a: np.ndarray) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a floating array, in bounded chunks."""
    flat = np.asarray(a).reshape(-1)
    nan = inf = 0
    for i in range(0, flat.size, _CHUNK):
        c = flat[i : i + _CHUNK]
        fin = np.isfinite(c)
        if not fin.all():
            n = int(np.isnan(c).sum())
            nan, inf = nan + n, inf + int(c.size - fin.sum()) - n
    return nan, inf


@dataclasses.dataclass
class NonFinite:
    """The converted leaves holding NaN or ±Inf: an error listing each (or, allowed, a record of them)."""

    found: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def check(self, key: str, path: str, leaf: np.ndarray, where: Path) -> None:
        nan, inf = count_nonfinite(leaf)
        if nan or inf:
            self.found[path] = {"source": key, "file": where.name, "nan": nan, "inf": inf, "size": leaf.size}

    def lines(self) -> list[str]:
        return [
            f"{r['source']} -> {p}: {r['nan'] + r['inf']} of {r['size']} values are not finite "
            f"({r['nan']} NaN, {r['inf']} Inf) (in {r['file']})"
            for p, r in sorted(self.found.items())
        ]

    def error(self) -> ConversionError:
        return ConversionError(
            f"{len(self.found)} converted leaves hold non-finite values (a corrupt or diverged checkpoint; "
            "--allow-nonfinite converts them anyway):\n  " + "\n  ".join(self.lines())
        )

    def warning(self) -> str:
        return "warning: non-finite values converted (--allow-nonfinite): " + json.dumps(
            {p: {"nan": r["nan"], "inf": r["inf"]} for p, r in sorted(self.found.items())}
        )
