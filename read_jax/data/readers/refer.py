"""Referring-expression readers: RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF, R-RefCOCO(+/g), FP-RefCOCO(+/g).

PyTorch reference: `rui-qian/READ@2549240` (= SESAME's loaders) `dataloaders/refer_seg_dataset.py` +
`refer.py` (training), `test_dataset.py` (`TestReferDataset`, eval). Layout: read_reference.md §9;
false premises: §6.3; eval: §8.3, §8.4.

On disk, under the `refer_seg` directory: `{dataset}/refs({split_by}).p` + `{dataset}/instances.json`;
images in `images/saiapr_tc-12/` (refclef) or `images/mscoco/images/train2014/` (the rest). R-RefCOCO
sentences carry `exist`, FP-RefCOCO ones `is_false_premise` and a corrected `gt_sent`.
"""

from __future__ import annotations

import collections
import os
import pickle
from collections.abc import Sequence

import numpy as np

from read_jax.data.preprocess import coco_mask, read_json
from read_jax.data.readers.base import (
    MAX_CONVS,
    Conversation,
    Example,
    Reader,
    ReaderGroup,
    SampleError,
    sample_indices,
)

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
        """The GT of a ref. Eval: the reference's (`load_segmentation_masks`): each annotation's polygon parts
        summed (2 where they overlap, scored as "in no class"), several annotations combined with `|`.
        Training: the union, binary (a BCE target of 2 means nothing; a deliberate difference)."""
        ids = ann_id if isinstance(ann_id, list) else [ann_id]
        m = np.zeros((h, w), np.uint8)
        if -1 in ids:  # no target (gRefCOCO-style "-1")
            return m
        overlaps = "sum" if self.mode == "eval" else "union"
        for i in ids:
            try:
                m |= coco_mask(self.anns[i]["segmentation"], h, w, overlaps)
            except (ValueError, KeyError, TypeError) as e:
                raise SampleError(f"{self.dataset} ann {i}: bad segmentation ({e})") from e
        return m

    def _answer(self, rng, s) -> str:
        if s["exists"]:
            return self.templates.short_answer(rng, s["sent"].lower())
        if self.dataset in FP_REFER_SETS:  # false premise with a correction (gt_sent)
            return self.templates.correct_answer(rng, s["sent"].lower(), s["gt_sent"].lower())
        return self.templates.neg_answer(rng, s["sent"].lower())

    def example(self, idx: int, rng: np.random.Generator) -> Example:
        iid = self.image_ids[idx]
        info = self.images[iid]
        h, w = int(info["height"]), int(info["width"])
        sents = self._sentences(iid)
        if self.mode == "train":
            sents = [sents[i] for i in sample_indices(rng, len(sents), self.max_convs)]
        convs, masks = [], []
        for s in sents:
            q = self.templates.short_question(rng, s["sent"].lower())
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


def refer_group(root: str, datasets: Sequence[str], name: str, **kw) -> ReaderGroup:
    return ReaderGroup([ReferReader(os.path.join(root, "refer_seg"), d, **kw) for d in datasets], name)
