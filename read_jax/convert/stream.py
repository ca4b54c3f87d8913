"""The converter's streaming parts: where tensors come from (`Source`) and the stages they pass through
before the key table (`LoraMerger`: unmerged PEFT LoRA folded into its base weight; `resize_vocab_rows`:
`--resize-vocab`). Used by `read_jax.convert.read.convert_read_checkpoint`.

Shape letters: V vocabulary, C LLM width, R LoRA rank, I/O Linear in/out features.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from read_jax import config as rc
from read_jax.checkpoint import owned_copy
from read_jax.convert import io
from read_jax.convert.common import ConversionError

PEFT_PREFIX = "base_model.model."
_PEFT = r"(?:base_model\.model\.)?"
# HF 4.31 `resize_token_embeddings` initialises new rows with `_init_weights`: normal(0, initializer_range).
RESIZE_INIT_STD = 0.02


# ---- sources -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    """One stream of tensors: its files, and each file's keys when known without reading tensors."""

    name: str  # "checkpoint" | "clip" | "sam"
    files: tuple[Path, ...]
    expected_keys: dict[Path, set[str]] | None  # from an index json or safetensors headers; None: unknown

    @property
    def keys(self) -> set[str] | None:
        return None if self.expected_keys is None else set().union(*self.expected_keys.values())

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def hf_source(name: str, directory: Path) -> Source:
    """The weight files of an HF directory; raises CheckpointFileError naming missing shards."""
    found = io.find_checkpoint_files(directory)
    for f in found.files:
        io.check_weights_file(f)  # text, LFS pointers, empty files: refused before anything is written
    expected: dict[Path, set[str]] = {}
    for f in found.files:
        keys = found.keys_of(f)
        if keys is None:
            listed = io.tensor_keys(f)
            if listed is None:
                return Source(name, found.files, None)
            keys = set(listed)
        expected[f] = keys
    return Source(name, found.files, expected)


def file_source(name: str, path: Path) -> Source:
    io.check_weights_file(path)
    keys = io.tensor_keys(path)
    return Source(name, (path,), None if keys is None else {path: set(keys)})


# ---- stream stages -----------------------------------------------------------------------------------------
LORA_KEY = re.compile(_PEFT + r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight")
BASE_KEY = re.compile(_PEFT + r"(.+?)(?:\.base_layer)?\.weight")
# The embedding and the lm_head (group 1: which), in the READ/LLaVA, PEFT and llava-hf layouts.
_VOCAB_KEYS = re.compile(
    _PEFT + r"(?:language_model\.)?(?:model\.(?:language_model\.)?(embed_tokens)|(lm_head))\.weight"
)


class LoraMerger:
    """Fold unmerged PEFT LoRA into base weights while streaming: W [O, I] += (alpha / r) B [O, R] @ A [R, I].

    A base weight of a module that (may) have LoRA is held until both factors arrive (PEFT state dicts store
    them next to each other, so at most a few tensors wait). `lora_modules` (known from an index) says which
    modules have factors; without it, every attention projection of a PEFT dump is held until its factors or
    the end of the stream.
    """

    def __init__(self, alpha: float, lora_modules: set[str] | None):
        self.alpha = alpha
        self.lora_modules = lora_modules
        self.pending: dict[str, dict[str, Any]] = {}
        self.merged: list[str] = []

    def _maybe_lora(self, key: str, module: str) -> bool:
        if self.lora_modules is not None:
            return module in self.lora_modules
        return key.startswith(PEFT_PREFIX) and re.fullmatch(r".*\.self_attn\.[qkvo]_proj", module) is not None

    def feed(self, key: str, arr: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """(key, array) pairs ready for the converter: nothing while a triplet is incomplete."""
        m = LORA_KEY.fullmatch(key)
        if m:
            self.pending.setdefault(m.group(1), {})[m.group(2)] = owned_copy(arr)
            yield from self._try(m.group(1))
            return
        m = BASE_KEY.fullmatch(key)
        if m and self._maybe_lora(key, m.group(1)):
            self.pending.setdefault(m.group(1), {})["base"] = (key, owned_copy(arr))
            yield from self._try(m.group(1))
            return
        yield key, arr

    def _try(self, module: str) -> Iterator[tuple[str, np.ndarray]]:
        p = self.pending[module]
        if not {"base", "lora_A", "lora_B"} <= set(p):
            return
        (key, w), a, b = p["base"], p["lora_A"], p["lora_B"]
        del self.pending[module]
        r = a.shape[0]
        if b.shape != (w.shape[0], r) or a.shape != (r, w.shape[1]):
            raise ConversionError(f"{module}: LoRA shapes A {a.shape}, B {b.shape} do not fit W {w.shape}")
        # fp32 product, one rounding to W's dtype (peft merges in the model dtype; this is at least as exact).
        delta = (b.astype(np.float32) @ a.astype(np.float32)) * np.float32(self.alpha / r)
        self.merged.append(module)
        yield key, (w.astype(np.float32) + delta).astype(w.dtype)

    def finish(self) -> Iterator[tuple[str, np.ndarray]]:
        """Release base weights that turned out to have no LoRA; factors without a base are an error."""
        orphans = []
        for module, p in list(self.pending.items()):
            if "base" in p and not {"lora_A", "lora_B"} & set(p):
                yield p["base"]
            else:
                have = sorted(k for k in p if k != "base") or "no LoRA factors"
                orphans.append(f"{module}: has {have}{' and' if 'base' in p else ' but no'} base weight")
        self.pending.clear()
        if orphans:
            raise ConversionError("incomplete LoRA (base weight, lora_A, lora_B):\n  " + "\n  ".join(orphans))


def resize_rows(arr: np.ndarray, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """Append `vocab - V` rows ~ N(0, 0.02) to an embedding / lm_head matrix [V, C] (HF 4.31 resize)."""
    new = rng.normal(0.0, RESIZE_INIT_STD, size=(vocab - arr.shape[0], arr.shape[1])).astype(arr.dtype)
    return np.concatenate([np.asarray(arr), new], axis=0)


def resize_vocab_rows(key: str, arr: np.ndarray, source_vocab: int, vocab: int, seed: int) -> np.ndarray:
    """`--resize-vocab` on one tensor: the embedding / lm_head of `source_vocab` rows keeps LLaMA's 32000
    (llava-hf's added rows above them are dropped, `read_jax.convert.llava_hf`) and gets `vocab - 32000` new
    rows from its own stream of `seed` (embedding 0, lm_head 1: the same rows whatever the key order of the
    files). Any other tensor is returned as is."""
    m = _VOCAB_KEYS.fullmatch(key)
    if m is None or arr.ndim != 2 or arr.shape[0] != source_vocab or source_vocab == vocab:
        return arr
    rng = np.random.default_rng([seed, 0 if m.group(1) else 1])
    return resize_rows(np.asarray(arr)[: rc.SEG_TOKEN_ID], vocab, rng)
