"""READ's hybrid training mixture: each example draws a source with probability proportional to its rate.

PyTorch reference: `rui-qian/READ@2549240` `dataloaders/trainval_dataset.py:69-163` (`HybridDataset`):
`__getitem__` ignores its index, draws a dataset with `np.random.choice(p=rates / sum)`, and returns a
random item of it; each source then samples up to 3 classes / sentences per image and mixes in false
premises (`readers.py`). read_reference.md §6.3.

Determinism and checkpointing: the draw for global example `index` uses its own generator,
`np.random.default_rng([seed, index, attempt])`, so an example depends only on (seed, index) and not on
what ran before: the data state to checkpoint is just the position in the index stream (grain's iterator
state), per-host shards see disjoint indices, and worker processes need no shared RNG. `attempt` > 0 only
when a drawn item turned out unusable (`SampleError`, bad image): the pipeline redraws and counts it.

Sources are anything with `sample(rng) -> Example` and `__len__` (a `Reader` or a `ReaderGroup`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from read_jax.data import readers as R

# The reference's source names, in the order of train_read.sh's `--dataset` string.
SOURCES = ("sem_seg", "refer_seg", "correct_refer_seg", "vqa", "neg_refer_seg", "reason_seg")

# read_reference.md §6.3 / train_read.sh:58-60 / README.
RATE_PRESETS: dict[str, dict[str, float]] = {
    # READ-7B, continued from SESAME (the released ReasonSeg model).
    "read_7b": dict(zip(SOURCES, (10, 1, 1, 1, 1, 10))),
    # SESAME's default and READ-13B's first stage; READ-13B's second stage.
    "read_13b_stage1": dict(zip(SOURCES, (10, 10, 2, 3, 1, 1))),
    "read_13b_stage2": dict(zip(SOURCES, (3, 10, 2, 3, 1, 10))),
    # The FP-RefCOCO ("ReferSeg") model: no sem_seg, no reason_seg.
    "refer_seg": {"refer_seg": 12, "correct_refer_seg": 2, "vqa": 2, "neg_refer_seg": 1},
}


def resolve_rates(rates: str | Mapping[str, float]) -> dict[str, float]:
    """A preset name or a {source: rate} mapping -> validated {source: rate} (rates > 0)."""
    if isinstance(rates, str):
        if rates not in RATE_PRESETS:
            raise ValueError(f"unknown mixture preset {rates!r}; known: {sorted(RATE_PRESETS)}")
        rates = RATE_PRESETS[rates]
    rates = {k: float(v) for k, v in rates.items()}
    if not rates:
        raise ValueError("a mixture needs at least one source")
    bad = {k: v for k, v in rates.items() if not v > 0 or not np.isfinite(v)}
    if bad:
        raise ValueError(f"mixture rates must be positive and finite, got {bad}")
    return rates


class Mixture:
    """Draw (source, example) pairs with probability proportional to the rates.

    Args:
      sources: {name: source}; every name in `rates` must be present (extra sources are ignored).
      rates: a preset name from RATE_PRESETS or {name: rate}.
      seed: the mixture seed.
    """

    def __init__(self, sources: Mapping[str, object], rates: str | Mapping[str, float], seed: int = 0):
        rates = resolve_rates(rates)
        missing = sorted(set(rates) - set(sources))
        if missing:
            raise ValueError(f"mixture rates name sources that were not given: {missing}")
        self.names = tuple(rates)
        self.sources = [sources[n] for n in self.names]
        w = np.asarray([rates[n] for n in self.names], np.float64)
        self.probs = w / w.sum()
        self.seed = seed

    def rng(self, index: int, attempt: int = 0) -> np.random.Generator:
        """The generator of global example `index` (and retry `attempt`)."""
        return np.random.default_rng([self.seed, int(index), int(attempt)])

    def choose(self, rng: np.random.Generator) -> int:
        """Index into `self.names` of the source to draw from."""
        return int(rng.choice(len(self.probs), p=self.probs))

    def sample(self, rng: np.random.Generator) -> tuple[str, R.Example]:
        k = self.choose(rng)
        return self.names[k], self.sources[k].sample(rng)

    def source_counts(self, indices: Sequence[int]) -> dict[str, int]:
        """How many of `indices` draw each source (first attempt): for checking the rates."""
        counts = np.zeros(len(self.names), np.int64)
        for i in indices:
            counts[self.choose(self.rng(i))] += 1
        return dict(zip(self.names, counts.tolist()))


# The sub-datasets of each source: the defaults of the reference's `--sem_seg_data`, `--refer_seg_data`,
# `--neg_refer_seg_data` and `--correct_refer_seg_data` (train_read.py:55-74; read_reference.md §6.3).
SUB_DATASETS: dict[str, tuple[str, ...]] = {
    "sem_seg": ("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary"),
    "refer_seg": ("refclef", "refcoco", "refcoco+", "refcocog"),
    "neg_refer_seg": R.NEG_REFER_SETS,
    "correct_refer_seg": R.FP_REFER_SETS,
}


def parse_sub_datasets(text: str) -> tuple[str, ...]:
    """The reference's "a||b||c" flag syntax -> ("a", "b", "c")."""
    return tuple(p.strip() for p in str(text).split("||") if p.strip())


def build_reference_sources(
    root: str,
    names: Sequence[str] = SOURCES,
    max_convs: int = R.MAX_CONVS,
    seed: int = 0,
    reason_seg_dir: str | None = None,
    reason_seg_false_premise: float | None = None,
    sub_datasets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, object]:
    """The reference's sources read from a SESAME-style `dataset/` root (read_reference.md §9).

    sem_seg = ade20k, cocostuff, pascal_part, paco_lvis, mapillary; refer_seg = refclef, refcoco, refcoco+,
    refcocog; neg_refer_seg = R-refcoco(+/g); correct_refer_seg = fprefcoco(+/g) (`SUB_DATASETS`; a source
    named in `sub_datasets` reads those instead, as the reference's `--sem_seg_data` etc. do: e.g. the
    generated shapes mix, `make_shapes.SUB_DATASETS`); vqa = llava_instruct_150k; reason_seg = ReasonSeg|train
    (or `reason_seg_dir`). `reason_seg_false_premise`: the share of ReasonSeg samples drawn as false-premise
    corrections (None: SESAME's 0.15, `readers.REASON_SEG_MODE_WEIGHTS`).
    """
    if reason_seg_false_premise is not None and not 0.0 <= reason_seg_false_premise <= 1.0:
        raise ValueError(f"reason_seg_false_premise must be in [0, 1], got {reason_seg_false_premise}")
    subs = {**SUB_DATASETS, **{k: tuple(v) for k, v in (sub_datasets or {}).items()}}
    unknown = sorted(set(subs) - set(SUB_DATASETS))
    if unknown:
        raise ValueError(
            f"sub_datasets names sources without sub-datasets: {unknown}; known: {sorted(SUB_DATASETS)}"
        )
    empty = sorted(k for k in names if k in subs and not subs[k])
    if empty:
        raise ValueError(f"sources {empty} are in the mixture but their sub-dataset lists are empty")
    kw = dict(max_convs=max_convs, seed=seed)
    out: dict[str, object] = {}
    for n in names:
        if n == "sem_seg":
            out[n] = R.sem_seg_group(root, subs[n], **kw)
        elif n in ("refer_seg", "neg_refer_seg", "correct_refer_seg"):
            out[n] = R.refer_group(root, subs[n], n, **kw)
        elif n == "vqa":
            out[n] = R.VqaReader(
                os.path.join(root, "llava_dataset", "llava_instruct_150k.json"),
                os.path.join(root, "coco", "train2017"),
                seed=seed,
            )
        elif n == "reason_seg":
            fp = (
                {}
                if reason_seg_false_premise is None
                else {"mode_weights": (1.0 - reason_seg_false_premise, reason_seg_false_premise)}
            )
            out[n] = R.ReasonSegReader(
                reason_seg_dir or os.path.join(root, "reason_seg", "ReasonSeg"), "train", **kw, **fp
            )
        else:
            raise ValueError(f"unknown source {n!r}; known: {SOURCES}")
    return out
