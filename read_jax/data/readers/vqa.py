"""LLaVA-Instruct-150k VQA reader: multi-round conversations without [SEG] or masks.

PyTorch reference: `rui-qian/READ@2549240` (= SESAME's loaders) `dataloaders/vqa_dataset.py` (with
`preprocess_multimodal`). Layout: read_reference.md §9; its share of the mixture: §6.3.

On disk: `llava_dataset/llava_instruct_150k.json` ([{id, image, conversations: [{from, value}, ...]}]),
images `coco/train2017/{image}`.
"""

from __future__ import annotations

import os

import numpy as np

from read_jax.data.preprocess import read_json
from read_jax.data.readers.base import Conversation, Example, Reader


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
