"""Semantic-segmentation readers: ADE20K, COCO-Stuff, Mapillary Vistas (label maps), PACO-LVIS and
PASCAL-Part (COCO-format part annotations). Training sets only: they have no eval protocol.

PyTorch reference: `rui-qian/READ@2549240` (= SESAME's loaders) `dataloaders/sem_seg_dataset.py`.
Layouts: read_reference.md §9 (and the reader docstrings below); false-premise mixing: §6.3.

Each image yields up to `max_convs` present classes as questions with masks ("true" mode) or, with
probabilities ∝ `mode_weights`, as many absent classes answered by a denial or a correction (no masks).
"""

from __future__ import annotations

import collections
import glob
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from read_jax.config import IGNORE_LABEL
from read_jax.data import templates
from read_jax.data.preprocess import coco_mask, read_json
from read_jax.data.readers.base import (
    MAX_CONVS,
    SEM_SEG_MODE_WEIGHTS,
    Conversation,
    Example,
    Reader,
    ReaderGroup,
    SampleError,
    sample_indices,
)
from read_jax.data.readers.sem_seg_classes import ADE20K_CLASSES, COCO_STUFF_CLASSES


def _sem_seg_conversations(
    rng: np.random.Generator,
    pos: list[str],
    neg: list[str],
    weights: Sequence[float],
    tpl: templates.Templates = templates.DEFAULT,
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
                    tpl.short_question(rng, name.lower()), tpl.short_answer(rng, name.lower()), True, True, i
                )
            )
    else:
        for name, gt in zip(neg, pos, strict=False):  # min(#pos, #neg) questions
            q = tpl.short_question(rng, name.lower())
            a = (
                tpl.neg_answer(rng, name.lower())
                if mode == "denial"
                else tpl.correct_answer(rng, name.lower(), gt.lower())
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
        pos_ids = [present[i] for i in sample_indices(rng, len(present), self.max_convs)]
        neg_ids = [absent[i] for i in sample_indices(rng, len(absent), self.max_convs)]
        mode, convs = _sem_seg_conversations(
            rng,
            [self.classes[i] for i in pos_ids],
            [self.classes[i] for i in neg_ids],
            self.mode_weights,
            self.templates,
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
        pos = [anns[i] for i in sample_indices(rng, len(anns), self.max_convs)]
        absent = sorted(set(self.class_map) - {a["category_id"] for a in anns})
        neg = [absent[i] for i in sample_indices(rng, len(absent), self.max_convs)]
        pos_names = [self._name(rng, a["category_id"]) for a in pos]
        neg_names = [self._name(rng, c) for c in neg]
        mode, convs = _sem_seg_conversations(rng, pos_names, neg_names, self.mode_weights, self.templates)
        if mode == "true":
            try:
                masks = np.stack([coco_mask(a["segmentation"], h, w) for a in pos])
            except (ValueError, KeyError, TypeError) as e:
                raise SampleError(f"{path}: bad segmentation ({e})") from e
        else:
            masks = np.zeros((0, h, w), np.uint8)
        return Example(path, convs, masks, f"{self.dataset}/{im['id']}", self.name, (h, w), {"mode": mode})


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
