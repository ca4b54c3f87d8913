"""What every reader shares: the `Example` it yields, the `Reader` base class, reader groups, constants.

PyTorch reference: `rui-qian/READ@2549240` (= SESAME's loaders) `dataloaders/data_processing.py`,
`sem_seg_dataset.py` (`select_samples`, the false-premise mode weights), `reason_seg_dataset.py`. Sampling
and false-premise mixing: read_reference.md §6.3; eval: §8.

Every reader is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose items are `Example`s:
an image path, up to `max_convs` `Conversation`s (question, answer, has_seg, exists) and the GT masks that
go with them (uint8 [M, H, W] at the original image size). `__getitem__(i)` is deterministic (its random
choices are seeded by (seed, i)); `example(i, rng)` and `sample(rng)` take the caller's generator, which
is what the training mixture uses.

Modes:
- "train": SESAME's training sampling: up to `max_convs` classes / sentences per image, our own random
  templates (`templates.py`), false-premise mixing, masks binary (ReasonSeg's 255 "ignore" -> 0, as the
  reference's `mask == 1`), and masks only for conversations whose answer has a [SEG].
- "eval": the evaluation protocol: ReasonSeg uses `text[0]` with LISA's fixed templates and keeps the 255
  pixels; RefCOCO-style sets yield every sentence of the image, with an all-zero GT for false premises.
  `eval_answer=False` leaves the answer empty (a generation prompt, for FP-RefCOCO's "See"/"Segment").

Bad data never crashes a run: annotation problems found at construction (missing image, unreadable json,
json without `text`, degenerate polygons only, ...) drop the item and count it in `reader.dropped`; an
item that fails later raises `SampleError`, which the pipeline catches, counts, and replaces. A reader left
with no items raises ValueError.

Shape letters: M masks of an example, H W original image size.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from read_jax.data import templates as T

# The package's name (`read_jax.data.readers`), so drop warnings keep the logger they had before the split.
log = logging.getLogger(__package__)

# SESAME's false-premise mixing (sem_seg_dataset.py:124-125, reason_seg_dataset.py:21-22).
SEM_SEG_MODE_WEIGHTS = (0.85, 0.07, 0.08)  # true premise, denial, correction
REASON_SEG_MODE_WEIGHTS = (0.85, 0.15)  # true premise, correction (from the json's false_premise_QA)
MAX_CONVS = 3  # num_classes_per_sample


class SampleError(Exception):
    """An item that cannot be turned into a training example; the pipeline skips and counts it."""


@dataclasses.dataclass
class Conversation:
    """One conversation row. `question` has no `<image>` (the prompt builder adds it) unless it is a
    protocol string that already carries it. `mask_index` points into `Example.masks` (-1: no mask)."""

    question: str
    answer: str | None
    has_seg: bool
    exists: bool
    mask_index: int = -1
    more_rounds: tuple[tuple[str, str], ...] = ()  # further (question, answer) rounds (LLaVA VQA)

    @property
    def rounds(self) -> list[tuple[str, str | None]]:
        return [(self.question, self.answer), *self.more_rounds]


@dataclasses.dataclass
class Example:
    """What a reader yields for one image.

    masks: uint8 [M, H, W] at the original image size, values {0, 1} (eval ReasonSeg: {0, 1, 255}).
    """

    image_path: str
    conversations: list[Conversation]
    masks: np.ndarray
    sample_id: str
    source: str
    image_hw: tuple[int, int]
    meta: dict = dataclasses.field(default_factory=dict)


def sample_indices(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """`random.sample(range(n), k)` if n >= k else all of range(n) in order (SESAME's `select_samples`)."""
    if n >= k:
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    return list(range(n))


class Reader:
    """Base: grain-compatible random access over a set's items, with drop counting.

    `templates`: the question/answer lists the reader draws from (`templates.DEFAULT`, our wording, unless
    `use_templates` gave it the reference's lists: `templates.load_reference_templates`).
    """

    name = "reader"
    templates: T.Templates = T.DEFAULT

    def use_templates(self, templates: T.Templates) -> Reader:
        self.templates = templates
        return self

    def __init__(self, mode: str = "train", max_convs: int = MAX_CONVS, seed: int = 0):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if max_convs < 1:
            raise ValueError(f"max_convs must be >= 1, got {max_convs}")
        self.mode, self.max_convs, self.seed = mode, max_convs, seed
        self.dropped: collections.Counter = collections.Counter()

    def _drop(self, reason: str, what: str):
        self.dropped[reason] += 1
        if self.dropped[reason] <= 3:
            log.warning("%s: skipping %s (%s)", self.name, what, reason)

    def _check_nonempty(self, n: int, where: str):
        if n == 0:
            raise ValueError(f"{self.name}: no usable items in {where} (dropped: {dict(self.dropped)})")

    def __len__(self) -> int:
        raise NotImplementedError

    def example(self, idx: int, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    def __getitem__(self, idx: int) -> Example:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"{self.name}: index {idx} out of range [0, {len(self)})")
        return self.example(idx, np.random.default_rng([self.seed, idx]))

    def sample(self, rng: np.random.Generator) -> Example:
        """A uniformly random item (the reference ignores the index and draws one)."""
        return self.example(int(rng.integers(len(self))), rng)

    def num_conversations(self, idx: int) -> int:
        """Conversations `__getitem__(idx)` yields in eval mode (for chunking eval batches)."""
        return self.max_convs


class ReaderGroup:
    """Several readers drawn uniformly, then an item uniformly (SESAME picks a sub-dataset first)."""

    def __init__(self, readers: Sequence[Reader], name: str):
        if not readers:
            raise ValueError(f"{name}: a reader group needs at least one reader")
        self.readers, self.name = list(readers), name

    def sample(self, rng: np.random.Generator) -> Example:
        return self.readers[int(rng.integers(len(self.readers)))].sample(rng)

    def use_templates(self, templates: T.Templates) -> ReaderGroup:
        for r in self.readers:
            r.use_templates(templates)
        return self

    def __len__(self) -> int:
        return sum(len(r) for r in self.readers)
