"""ReasonSeg reader (also reads our generated shapes set, `make_shapes.py`, which has the same layout).

PyTorch reference: `rui-qian/READ@2549240` (= SESAME's loaders) `dataloaders/reason_seg_dataset.py`
(training) and `test_dataset.py` (eval), masks as `data_processing.py`. Layout: read_reference.md §9;
false-premise mixing: §6.3; eval protocol: §8.2.

On disk: `{root}/{split}/*.jpg`, each with a labelme json of the same name:
  {"text": [str, ...], "is_sentence": bool, "shapes": [{"label", "points"}, ...],
   optional "false_premise_QA": [[query, is_sentence, answer], ...]}.
Training draws up to `max_convs` texts (or, with probability `mode_weights[1] / sum(mode_weights)` when
the json has them, questions from `false_premise_QA`); eval asks `text[0]` with LISA's fixed templates
and keeps the 255 ignore pixels.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from read_jax.data.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    image_size,
    labelme_mask,
    read_json,
    usable_shapes,
)
from read_jax.data.readers.base import (
    MAX_CONVS,
    REASON_SEG_MODE_WEIGHTS,
    Conversation,
    Example,
    Reader,
    SampleError,
    sample_indices,
)


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
        self.empty_gt = 0  # eval items without a usable target polygon (scored with an empty GT)
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
            if self.mode == "train":
                self._drop("no usable target polygon", js)
                return None
            # Eval scores it, as the reference does: its GT is empty (a prediction there only adds to U).
            self.empty_gt += 1
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
                Conversation(self.templates.question(rng, q, is_sent), a, False, False)
                for q, is_sent, a in (
                    ann.fp_qa[i] for i in sample_indices(rng, len(ann.fp_qa), self.max_convs)
                )
            ]
            return Example(ann.image, convs, np.zeros((0, *hw), np.uint8), sid, self.name, hw, meta)
        target = (mask == 1).astype(np.uint8)  # training uses mask == 1: "ignore" pixels become 0 (§5)
        if not target.any():
            raise SampleError(f"{ann.json}: the target polygons cover no pixel")
        convs = [
            Conversation(
                self.templates.question(rng, ann.texts[i], ann.is_sentence),
                self.templates.long_answer(rng),
                True,
                True,
                0,
            )
            for i in sample_indices(rng, len(ann.texts), self.max_convs)
        ]
        return Example(ann.image, convs, target[None], sid, self.name, hw, meta)
