"""Readers for READ's training and evaluation sets, over each set's own on-disk layout.

PyTorch reference: `rui-qian/READ@2549240` (= SESAME's loaders) `dataloaders/reason_seg_dataset.py`,
`refer_seg_dataset.py` + `refer.py`, `sem_seg_dataset.py`, `vqa_dataset.py`, `test_dataset.py`,
`data_processing.py`. Layouts: read_reference.md §9; sampling and false-premise mixing: §6.3; eval: §8.

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
import glob
import logging
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from read_jax.config import IGNORE_LABEL
from read_jax.data import templates as T
from read_jax.data.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    coco_mask,
    image_size,
    labelme_mask,
    read_json,
    usable_shapes,
)

log = logging.getLogger(__name__)

# SESAME's false-premise mixing (sem_seg_dataset.py:124-125, reason_seg_dataset.py:21-22).
SEM_SEG_MODE_WEIGHTS = (0.85, 0.07, 0.08)  # true premise, denial, correction
REASON_SEG_MODE_WEIGHTS = (0.85, 0.15)  # true premise, correction (from the json's false_premise_QA)
MAX_CONVS = 3  # num_classes_per_sample

# refer_seg_dataset.py:75-83 (`determine_split_by`).
FP_REFER_SETS = ("fprefcoco", "fprefcoco+", "fprefcocog")
NEG_REFER_SETS = ("R-refcoco", "R-refcoco+", "R-refcocog")
REFER_SETS = ("refclef", "refcoco", "refcoco+", "refcocog", *NEG_REFER_SETS, *FP_REFER_SETS)


def split_by(dataset: str) -> str:
    if dataset == "refclef":
        return "unc"
    if dataset in ("refcocog", "R-refcocog"):
        return "umd_exclude_unified"
    if dataset in FP_REFER_SETS:
        return "berkeley_exclude_unified"
    return "unc_exclude_unified"


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


def _sample_indices(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """`random.sample(range(n), k)` if n >= k else all of range(n) in order (SESAME's `select_samples`)."""
    if n >= k:
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    return list(range(n))


class Reader:
    """Base: grain-compatible random access over a set's items, with drop counting."""

    name = "reader"

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

    def __len__(self) -> int:
        return sum(len(r) for r in self.readers)


# ---- ReasonSeg -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _ReasonAnn:
    image: str
    json: str
    hw: tuple[int, int]
    texts: list[str]
    is_sentence: bool
    shapes: list[dict]
    fp_qa: list[tuple[str, bool, str]]


class ReasonSegReader(Reader):
    """ReasonSeg (and our generated shapes set): `{root}/{split}/*.jpg` + labelme json of the same name.

    json: {"text": [str, ...], "is_sentence": bool, "shapes": [{"label", "points"}, ...],
           optional "false_premise_QA": [[query, is_sentence, answer], ...]}.

    Args:
      root: the directory holding the split folders (`dataset/reason_seg/ReasonSeg`).
      split: "train", "val", "test", or several joined by "_" (SESAME's "train_val").
      mode: "train" or "eval" (see the module docstring).
      eval_answer: eval mode only: teacher-forced answer ("Sure, the segmentation result is [SEG].") or None.
      validate_images: read every image header at construction (size, EXIF orientation, max_pixels).
    """

    name = "reason_seg"

    def __init__(
        self,
        root: str,
        split: str = "train",
        mode: str = "train",
        max_convs: int = MAX_CONVS,
        seed: int = 0,
        eval_answer: bool = True,
        validate_images: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        mode_weights: tuple[float, float] = REASON_SEG_MODE_WEIGHTS,
    ):
        super().__init__(mode, max_convs, seed)
        self.eval_answer, self.max_pixels, self.mode_weights = eval_answer, max_pixels, mode_weights
        self.items: list[_ReasonAnn] = []
        # Sorted for determinism (the reference iterates `glob` order, which is filesystem order).
        images = sorted(p for s in split.split("_") for p in glob.glob(os.path.join(root, s, "*.jpg")))
        jsons = {os.path.splitext(p)[0] for p in glob.glob(os.path.join(root, "*", "*.json"))}
        for img in images:
            js = os.path.splitext(img)[0] + ".json"
            ann = self._parse(img, js, validate_images)
            if ann is not None:
                self.items.append(ann)
        orphans = jsons - {os.path.splitext(p)[0] for p in images}
        for o in sorted(orphans):
            if os.path.basename(os.path.dirname(o)) in split.split("_"):
                self._drop("json without image", o + ".json")
        self._check_nonempty(len(self.items), f"{root} split {split}")

    def _parse(self, img: str, js: str, validate_images: bool) -> _ReasonAnn | None:
        if not os.path.isfile(js):
            self._drop("image without json", img)
            return None
        try:
            d = read_json(js)
        except (OSError, ValueError) as e:
            self._drop("unreadable json", f"{js}: {e}")
            return None
        texts = d.get("text") if isinstance(d, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            self._drop("json without text", js)
            return None
        shapes = d.get("shapes") or []
        good, _ = usable_shapes(shapes)
        if not any("ignore" not in s["label"].lower() for s in good):
            self._drop("no usable target polygon", js)
            return None
        fp = []
        for q in d.get("false_premise_QA") or []:
            if (
                isinstance(q, (list, tuple))
                and len(q) == 3
                and isinstance(q[0], str)
                and isinstance(q[2], str)
            ):
                fp.append((q[0], bool(q[1]), q[2]))
        try:
            hw = image_size(img, self.max_pixels) if validate_images else (0, 0)
        except ImageError as e:
            self._drop("bad image", str(e))
            return None
        return _ReasonAnn(img, js, hw, list(texts), bool(d.get("is_sentence", False)), shapes, fp)

    def __len__(self) -> int:
        return len(self.items)

    def num_conversations(self, idx: int) -> int:
        return 1 if self.mode == "eval" else self.max_convs

    def _mask(self, ann: _ReasonAnn) -> tuple[np.ndarray, tuple[int, int]]:
        hw = ann.hw
        if hw == (0, 0):
            try:
                hw = image_size(ann.image, self.max_pixels)
            except ImageError as e:
                raise SampleError(str(e)) from e
        mask, _ = labelme_mask(ann.shapes, *hw)
        return mask, hw

    def example(self, idx: int, rng: np.random.Generator) -> Example:
        from read_jax.data.conversation import ANSWER_TEMPLATE, reason_seg_question

        ann = self.items[idx]
        sid = os.path.splitext(os.path.basename(ann.image))[0]
        mask, hw = self._mask(ann)
        meta = {"text": ann.texts[0], "is_sentence": ann.is_sentence}
        if self.mode == "eval":
            # LISA's fixed templates on text[0] only; the GT keeps its 255 ignore pixels (§8.2).
            conv = Conversation(
                reason_seg_question(ann.texts[0], ann.is_sentence),
                ANSWER_TEMPLATE if self.eval_answer else None,
                True,
                True,
                0,
            )
            return Example(ann.image, [conv], mask[None], sid, self.name, hw, meta)
        correction = bool(ann.fp_qa) and rng.random() < self.mode_weights[1] / sum(self.mode_weights)
        if correction:
            convs = [
                Conversation(T.question(rng, q, is_sent), a, False, False)
                for q, is_sent, a in (
                    ann.fp_qa[i] for i in _sample_indices(rng, len(ann.fp_qa), self.max_convs)
                )
            ]
            return Example(ann.image, convs, np.zeros((0, *hw), np.uint8), sid, self.name, hw, meta)
        target = (mask == 1).astype(np.uint8)  # training uses mask == 1: "ignore" pixels become 0 (§5)
        if not target.any():
            raise SampleError(f"{ann.json}: the target polygons cover no pixel")
        convs = [
            Conversation(T.question(rng, ann.texts[i], ann.is_sentence), T.long_answer(rng), True, True, 0)
            for i in _sample_indices(rng, len(ann.texts), self.max_convs)
        ]
        return Example(ann.image, convs, target[None], sid, self.name, hw, meta)


# ---- RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF / R-RefCOCO / FP-RefCOCO -----------------------------------


class ReferReader(Reader):
    """A referring set: `{root}/{dataset}/refs({split_by}).p` + `{root}/{dataset}/instances.json`.

    refs: [{ref_id, ann_id (int, or list with -1 for none), image_id, category_id, split,
            sentences: [{sent, sent_id, [is_false_premise], [exist], [gt_sent]}]}].
    Images: `{root}/images/saiapr_tc-12/` for refclef, `{root}/images/mscoco/images/train2014/` otherwise.

    Args:
      root: the `refer_seg` directory.
      dataset: one of REFER_SETS.
      split: "train", "val", "test", "testA", "testB", "testC".
      eval_answer: eval mode only: include the answer (teacher forcing) or leave it None (generation).
    """

    def __init__(
        self,
        root: str,
        dataset: str,
        split: str = "train",
        mode: str = "train",
        max_convs: int = MAX_CONVS,
        seed: int = 0,
        eval_answer: bool = True,
        split_by_override: str | None = None,
        check_images: bool = True,
    ):
        super().__init__(mode, max_convs, seed)
        if dataset not in REFER_SETS:
            raise ValueError(f"unknown referring dataset {dataset!r}; known: {REFER_SETS}")
        self.name, self.dataset, self.eval_answer = dataset, dataset, eval_answer
        sb = split_by_override or split_by(dataset)
        ref_file = os.path.join(root, dataset, f"refs({sb}).p")
        inst_file = os.path.join(root, dataset, "instances.json")
        for f in (ref_file, inst_file):
            if not os.path.isfile(f):
                raise ValueError(f"{dataset}: missing {f}")
        with open(ref_file, "rb") as f:
            try:
                refs = pickle.load(f)
            except UnicodeDecodeError:  # refs pickled by Python 2
                f.seek(0)
                refs = pickle.load(f, encoding="latin1")
        inst = read_json(inst_file)
        self.images = {im["id"]: im for im in inst["images"]}
        self.anns = {a["id"]: a for a in inst["annotations"]}
        img_dir = (
            os.path.join(root, "images", "saiapr_tc-12")
            if dataset == "refclef"
            else os.path.join(root, "images", "mscoco", "images", "train2014")
        )
        refs = [r for r in refs if self._in_split(r.get("split", ""), split)]
        img2refs: dict[int, list[dict]] = collections.defaultdict(list)
        for r in refs:
            ids = r["ann_id"] if isinstance(r["ann_id"], list) else [r["ann_id"]]
            if any(i != -1 and i not in self.anns for i in ids):
                self._drop("ref with unknown ann_id", str(r.get("ref_id")))
                continue
            if r["image_id"] not in self.images:
                self._drop("ref with unknown image_id", str(r.get("ref_id")))
                continue
            if not r.get("sentences"):
                self._drop("ref without sentences", str(r.get("ref_id")))
                continue
            img2refs[r["image_id"]].append(r)
        self.image_ids, self.paths = [], {}
        for iid in sorted(img2refs):
            path = os.path.join(img_dir, self.images[iid]["file_name"])
            if check_images and not os.path.isfile(path):
                self._drop("missing image", path)
                continue
            self.image_ids.append(iid)
            self.paths[iid] = path
        self.img2refs = dict(img2refs)
        self._check_nonempty(len(self.image_ids), f"{ref_file} split {split}")

    @staticmethod
    def _in_split(ref_split: str, split: str) -> bool:
        """`REFER.getRefIds(split=...)` semantics."""
        if split in ("testA", "testB", "testC"):
            return split[-1] in ref_split
        if split in ("testAB", "testBC", "testAC"):
            return ref_split == split
        if split == "test":
            return "test" in ref_split
        if split in ("train", "val"):
            return ref_split == split
        raise ValueError(f"no such split {split!r}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def _sentences(self, iid: int) -> list[dict]:
        out = []
        for ref in self.img2refs[iid]:
            for k, s in enumerate(ref["sentences"]):
                if "is_false_premise" in s:
                    exists = not s["is_false_premise"]
                elif "exist" in s:
                    exists = bool(s["exist"])
                else:
                    exists = True
                out.append(
                    {
                        "sent": s["sent"].strip(),
                        "gt_sent": (s.get("gt_sent") or "").strip(),
                        "ann_id": ref["ann_id"],
                        "exists": exists,
                        "ref_id": ref["ref_id"],
                        "sent_id": k,
                    }
                )
        return out

    def num_conversations(self, idx: int) -> int:
        n = sum(len(r["sentences"]) for r in self.img2refs[self.image_ids[idx]])
        return n if self.mode == "eval" else min(n, self.max_convs)

    def _ann_mask(self, ann_id, h: int, w: int) -> np.ndarray:
        ids = ann_id if isinstance(ann_id, list) else [ann_id]
        m = np.zeros((h, w), np.uint8)
        if -1 in ids:  # no target (gRefCOCO-style "-1")
            return m
        for i in ids:
            try:
                m |= coco_mask(self.anns[i]["segmentation"], h, w)
            except (ValueError, KeyError, TypeError) as e:
                raise SampleError(f"{self.dataset} ann {i}: bad segmentation ({e})") from e
        return m

    def _answer(self, rng, s) -> str:
        if s["exists"]:
            return T.short_answer(rng, s["sent"].lower())
        if self.dataset in FP_REFER_SETS:  # false premise with a correction (gt_sent)
            return T.correct_answer(rng, s["sent"].lower(), s["gt_sent"].lower())
        return T.neg_answer(rng, s["sent"].lower())

    def example(self, idx: int, rng: np.random.Generator) -> Example:
        iid = self.image_ids[idx]
        info = self.images[iid]
        h, w = int(info["height"]), int(info["width"])
        sents = self._sentences(iid)
        if self.mode == "train":
            sents = [sents[i] for i in _sample_indices(rng, len(sents), self.max_convs)]
        convs, masks = [], []
        for s in sents:
            q = T.short_question(rng, s["sent"].lower())
            if self.mode == "train":
                a = self._answer(rng, s)
                if s["exists"]:
                    convs.append(Conversation(q, a, True, True, len(masks)))
                    masks.append(self._ann_mask(s["ann_id"], h, w))
                else:
                    convs.append(Conversation(q, a, False, False))
            else:
                # Eval (TestReferDataset, include_nonexist=True): every query has a GT, zero if absent.
                a = self._answer(rng, s) if self.eval_answer else None
                convs.append(Conversation(q, a, s["exists"], s["exists"], len(masks)))
                masks.append(self._ann_mask(s["ann_id"], h, w) if s["exists"] else np.zeros((h, w), np.uint8))
        meta = {
            "exists": [s["exists"] for s in sents],
            "ref_ids": [s["ref_id"] for s in sents],
            "sent_ids": [s["sent_id"] for s in sents],
            "sentences": [s["sent"] for s in sents],
        }
        masks_arr = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
        return Example(self.paths[iid], convs, masks_arr, f"{self.dataset}/{iid}", self.name, (h, w), meta)


# ---- semantic segmentation ------------------------------------------------------------------------------


def _sem_seg_conversations(
    rng: np.random.Generator, pos: list[str], neg: list[str], weights: Sequence[float]
) -> tuple[str, list[Conversation]]:
    """SESAME's per-image mode draw and conversations (sem_seg_dataset.py:262-293).

    Returns (mode, conversations); in "true" mode conversation i goes with mask i. False-premise modes ask
    about absent classes (min(#pos, #neg) of them, where the reference would crash on too few negatives).
    """
    mode = ("true", "denial", "correction")[int(rng.choice(3, p=np.asarray(weights) / np.sum(weights)))]
    if mode != "true" and not neg:
        mode = "true"
    convs = []
    if mode == "true":
        for i, name in enumerate(pos):
            convs.append(
                Conversation(
                    T.short_question(rng, name.lower()), T.short_answer(rng, name.lower()), True, True, i
                )
            )
    else:
        for name, gt in zip(neg, pos, strict=False):
            q = T.short_question(rng, name.lower())
            a = (
                T.neg_answer(rng, name.lower())
                if mode == "denial"
                else T.correct_answer(rng, name.lower(), gt.lower())
            )
            convs.append(Conversation(q, a, False, False))
    return mode, convs


def _init_train_only(
    reader: Reader, dataset: str, mode: str, max_convs: int, seed: int, mode_weights: Sequence[float]
) -> None:
    """Common constructor part of the semantic-segmentation readers (training sets, no eval protocol)."""
    Reader.__init__(reader, mode, max_convs, seed)
    if mode != "train":
        raise ValueError(f"{dataset} is a training set only (no eval protocol)")
    reader.name, reader.dataset, reader.mode_weights = dataset, dataset, tuple(mode_weights)


class LabelMapReader(Reader):
    """ADE20K, COCO-Stuff and Mapillary Vistas: an RGB image + a single-channel PNG of class ids.

    Layouts (sem_seg_dataset.py:15-77), under `root` (SESAME's `dataset/`):
      ade20k:     ade20k/images/training/*.jpg, ade20k/annotations/training/*.png (ids 1..150, 0 = other)
      cocostuff:  cocostuff/train2017/*.png, images coco/train2017/*.jpg (ids 0..181, 255 = unlabeled;
                  the "-other"/"-stuff"... classes with a "-" are ignored, as in SESAME)
      mapillary:  mapillary/config_v2.0.json ("labels"[i]["readable"]), mapillary/training/v2.0/labels/*.png,
                  images mapillary/training/images/*.jpg
    """

    def __init__(
        self,
        root: str,
        dataset: str,
        mode: str = "train",
        max_convs: int = MAX_CONVS,
        seed: int = 0,
        mode_weights: Sequence[float] = SEM_SEG_MODE_WEIGHTS,
    ):
        _init_train_only(self, dataset, mode, max_convs, seed, mode_weights)
        self.ignore_ids: tuple[int, ...] = ()
        if dataset == "ade20k":
            self.classes = list(ADE20K_CLASSES)
            images = sorted(glob.glob(os.path.join(root, "ade20k", "images", "training", "*.jpg")))
            pairs = [
                (
                    p,
                    os.path.join(
                        root, "ade20k", "annotations", "training", os.path.basename(p)[:-4] + ".png"
                    ),
                )
                for p in images
            ]
        elif dataset == "cocostuff":
            self.classes = list(COCO_STUFF_CLASSES)
            self.ignore_ids = tuple(i for i, c in enumerate(self.classes) if "-" in c)
            labels = sorted(glob.glob(os.path.join(root, "cocostuff", "train2017", "*.png")))
            pairs = [
                (os.path.join(root, "coco", "train2017", os.path.basename(p)[:-4] + ".jpg"), p)
                for p in labels
            ]
        elif dataset == "mapillary":
            cfg = os.path.join(root, "mapillary", "config_v2.0.json")
            if not os.path.isfile(cfg):
                raise ValueError(f"mapillary: missing {cfg}")
            self.classes = [x["readable"].lower() for x in read_json(cfg)["labels"]]
            labels = sorted(glob.glob(os.path.join(root, "mapillary", "training", "v2.0", "labels", "*.png")))
            pairs = [
                (os.path.join(root, "mapillary", "training", "images", os.path.basename(p)[:-4] + ".jpg"), p)
                for p in labels
            ]
        else:
            raise ValueError(f"unknown label-map dataset {dataset!r}")
        self.pairs = []
        for img, lab in pairs:
            if not os.path.isfile(img):
                self._drop("missing image", img)
            elif not os.path.isfile(lab):
                self._drop("missing label", lab)
            else:
                self.pairs.append((img, lab))
        self._check_nonempty(len(self.pairs), f"{root} ({dataset})")

    def __len__(self) -> int:
        return len(self.pairs)

    def _label(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as im:
                lab = np.asarray(im).astype(np.int64)
        except (OSError, ValueError) as e:
            raise SampleError(f"unreadable label {path}: {e}") from e
        if lab.ndim != 2:
            raise SampleError(f"label {path} is not single-channel: {lab.shape}")
        if self.dataset == "ade20k":
            # 0 ("other") -> ignore, then ids shift down by one (sem_seg_dataset.py:232-235).
            lab = np.where(lab == 0, IGNORE_LABEL + 1, lab) - 1
        elif self.dataset == "cocostuff" and self.ignore_ids:
            lab = np.where(np.isin(lab, self.ignore_ids), IGNORE_LABEL, lab)
        # Ids beyond the class list would index out of range in the reference: ignore them too.
        return np.where((lab < 0) | (lab >= len(self.classes)), IGNORE_LABEL, lab)

    def example(self, idx: int, rng: np.random.Generator) -> Example:
        img, lab_path = self.pairs[idx]
        lab = self._label(lab_path)
        present = [int(c) for c in np.unique(lab) if c != IGNORE_LABEL]
        if not present:
            raise SampleError(f"{lab_path}: no labelled class")
        absent = sorted(set(range(len(self.classes))) - set(present))
        pos_ids = [present[i] for i in _sample_indices(rng, len(present), self.max_convs)]
        neg_ids = [absent[i] for i in _sample_indices(rng, len(absent), self.max_convs)]
        mode, convs = _sem_seg_conversations(
            rng, [self.classes[i] for i in pos_ids], [self.classes[i] for i in neg_ids], self.mode_weights
        )
        h, w = lab.shape
        masks = (
            np.stack([(lab == c).astype(np.uint8) for c in pos_ids])
            if mode == "true"
            else np.zeros((0, h, w), np.uint8)
        )
        sid = f"{self.dataset}/{os.path.splitext(os.path.basename(img))[0]}"
        return Example(img, convs, masks, sid, self.name, (h, w), {"mode": mode})


class CocoPartReader(Reader):
    """PACO-LVIS and PASCAL-Part: COCO-format part annotations (sem_seg_dataset.py:80-117).

    Layouts, under `root`:
      paco_lvis:   vlpart/paco/annotations/paco_lvis_v1_train.json, images coco/{file_name}
      pascal_part: vlpart/pascal_part/train.json, images vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/
    Category "obj:part" reads as "obj part" or "the part of the obj" (coin flip); "_(" suffixes dropped.
    """

    def __init__(
        self,
        root: str,
        dataset: str,
        mode: str = "train",
        max_convs: int = MAX_CONVS,
        seed: int = 0,
        mode_weights: Sequence[float] = SEM_SEG_MODE_WEIGHTS,
    ):
        _init_train_only(self, dataset, mode, max_convs, seed, mode_weights)
        if dataset == "paco_lvis":
            ann_file = os.path.join(root, "vlpart", "paco", "annotations", "paco_lvis_v1_train.json")
            img_dir = os.path.join(root, "coco")
        elif dataset == "pascal_part":
            ann_file = os.path.join(root, "vlpart", "pascal_part", "train.json")
            img_dir = os.path.join(root, "vlpart", "pascal_part", "VOCdevkit", "VOC2010", "JPEGImages")
        else:
            raise ValueError(f"unknown part dataset {dataset!r}")
        if not os.path.isfile(ann_file):
            raise ValueError(f"{dataset}: missing {ann_file}")
        d = read_json(ann_file)
        self.class_map: dict[int, Any] = {}
        for cat in d["categories"]:
            parts = cat["name"].strip().split(":")
            if len(parts) == 1:
                self.class_map[cat["id"]] = parts[0].split("_(")[0]
            elif len(parts) == 2:
                self.class_map[cat["id"]] = (parts[0].split("_(")[0], parts[1].split("_(")[0])
            else:
                raise ValueError(f"{dataset}: category name {cat['name']!r} has more than one ':'")
        anns_by_img: dict[int, list[dict]] = collections.defaultdict(list)
        for a in d["annotations"]:
            anns_by_img[a["image_id"]].append(a)
        self.items = []
        for im in sorted(d["images"], key=lambda x: x["id"]):
            path = os.path.join(img_dir, im["file_name"])
            if not anns_by_img.get(im["id"]):
                self._drop("image without annotations", path)  # the reference re-draws these
            elif not os.path.isfile(path):
                self._drop("missing image", path)
            else:
                self.items.append((im, path, anns_by_img[im["id"]]))
        self._check_nonempty(len(self.items), ann_file)

    def __len__(self) -> int:
        return len(self.items)

    def _name(self, rng: np.random.Generator, cid: int) -> str:
        c = self.class_map[cid]
        if isinstance(c, tuple):
            obj, part = c
            return f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"
        return c

    def example(self, idx: int, rng: np.random.Generator) -> Example:
        im, path, anns = self.items[idx]
        h, w = int(im["height"]), int(im["width"])
        pos = [anns[i] for i in _sample_indices(rng, len(anns), self.max_convs)]
        absent = sorted(set(self.class_map) - {a["category_id"] for a in anns})
        neg = [absent[i] for i in _sample_indices(rng, len(absent), self.max_convs)]
        pos_names = [self._name(rng, a["category_id"]) for a in pos]
        neg_names = [self._name(rng, c) for c in neg]
        mode, convs = _sem_seg_conversations(rng, pos_names, neg_names, self.mode_weights)
        if mode == "true":
            try:
                masks = np.stack([coco_mask(a["segmentation"], h, w) for a in pos])
            except (ValueError, KeyError, TypeError) as e:
                raise SampleError(f"{path}: bad segmentation ({e})") from e
        else:
            masks = np.zeros((0, h, w), np.uint8)
        return Example(path, convs, masks, f"{self.dataset}/{im['id']}", self.name, (h, w), {"mode": mode})


# ---- LLaVA-Instruct VQA --------------------------------------------------------------------------------


class VqaReader(Reader):
    """LLaVA-Instruct-150k: `llava_dataset/llava_instruct_150k.json`, images `coco/train2017/{image}`.

    Each item is one multi-round conversation (no [SEG], no mask); `<image>` is moved to the front of the
    first question, as `preprocess_multimodal` does.
    """

    name = "vqa"

    def __init__(
        self, json_path: str, image_root: str, mode: str = "train", seed: int = 0, check_images: bool = True
    ):
        super().__init__(mode, 1, seed)
        data = read_json(json_path)
        self.image_root = image_root
        self.items = []
        for it in data:
            rounds = self._rounds(it.get("conversations") or [])
            if not it.get("image") or not rounds:
                self._drop("item without image or conversation", str(it.get("id")))
                continue
            if check_images and not os.path.isfile(os.path.join(image_root, it["image"])):
                self._drop("missing image", it["image"])
                continue
            self.items.append((str(it.get("id", it["image"])), it["image"], rounds))
        self._check_nonempty(len(self.items), json_path)

    @staticmethod
    def _rounds(turns: list[dict]) -> list[tuple[str, str]]:
        if turns and turns[0].get("from") != "human":  # skip a leading assistant turn
            turns = turns[1:]
        out = []
        for k in range(0, len(turns) - 1, 2):
            q, a = turns[k], turns[k + 1]
            if q.get("from") != "human" or a.get("from") != "gpt":
                break
            question = q.get("value", "").replace("<image>", "").strip()
            if question and a.get("value"):
                out.append((question, a["value"]))
        return out

    def __len__(self) -> int:
        return len(self.items)

    def example(self, idx: int, rng: np.random.Generator) -> Example:
        sid, image, rounds = self.items[idx]
        path = os.path.join(self.image_root, image)
        conv = Conversation(rounds[0][0], rounds[0][1], False, False, -1, tuple(rounds[1:]))
        return Example(path, [conv], np.zeros((0, 0, 0), np.uint8), f"vqa/{sid}", self.name, (0, 0))


# ---- building the reference's source groups from a dataset root -----------------------------------------


def sem_seg_group(
    root: str,
    datasets: Sequence[str] = ("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary"),
    **kw,
) -> ReaderGroup:
    readers = [
        LabelMapReader(root, d, **kw)
        if d in ("ade20k", "cocostuff", "mapillary")
        else CocoPartReader(root, d, **kw)
        for d in datasets
    ]
    return ReaderGroup(readers, "sem_seg")


def refer_group(root: str, datasets: Sequence[str], name: str, **kw) -> ReaderGroup:
    return ReaderGroup([ReferReader(os.path.join(root, "refer_seg"), d, **kw) for d in datasets], name)


# ---- class lists (dataset label maps, as SESAME's dataloaders/ade20k_classes.json, cocostuff_classes.txt) --

# fmt: off
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence',
    'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column',
    'signboard', 'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator',
    'grandstand', 'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway',
    'river', 'bridge', 'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier', 'awning',
    'streetlight', 'booth', 'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land',
    'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank', 'trade name',
    'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture', 'hood',
    'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)

COCO_STUFF_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'street sign', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse',
    'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'hat', 'backpack', 'umbrella', 'shoe',
    'eye glasses', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle', 'plate',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed',
    'mirror', 'dining table', 'window', 'desk', 'toilet', 'door', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'blender', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush', 'hair brush', 'banner',
    'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage', 'cardboard', 'carpet',
    'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds', 'counter', 'cupboard', 'curtain',
    'desk-stuff', 'dirt', 'door-stuff', 'fence', 'floor-marble', 'floor-other', 'floor-stone', 'floor-tile',
    'floor-wood', 'flower', 'fog', 'food-other', 'fruit', 'furniture-other', 'grass', 'gravel',
    'ground-other', 'hill', 'house', 'leaves', 'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain',
    'mud', 'napkin', 'net', 'paper', 'pavement', 'pillow', 'plant-other', 'plastic', 'platform',
    'playingfield', 'railing', 'railroad', 'river', 'road', 'rock', 'roof', 'rug', 'salad', 'sand', 'sea',
    'shelf', 'sky', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone', 'straw', 'structural-other',
    'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable', 'wall-brick', 'wall-concrete',
    'wall-other', 'wall-panel', 'wall-stone', 'wall-tile', 'wall-wood', 'water-other', 'waterdrops',
    'window-blind', 'window-other', 'wood',
)
# fmt: on
