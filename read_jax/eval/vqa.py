"""VQA answer accuracy under teacher forcing: what a text-only (LLaVA) stage has learnt, per question kind.

Each row of a VQA split is one question with its reference answer (`VqaReader` items; the first round of a
multi-round item). The model reads the prompt and the reference answer; a row is **exact** when the argmax of
every supervised position (the answer's tokens and its `</s>`) is the reference token. That is precisely the
condition under which greedy decoding reproduces the reference answer word for word, so `exact` is greedy
exact-match accuracy, computed in one teacher-forced forward instead of a decoding loop. `token_accuracy` is
the share of supervised tokens predicted right (partial credit).

Shapes: R rows, L text length, V vocabulary.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax.config import IGNORE_INDEX

Array = jax.Array
KEYS = ("images_clip", "input_ids", "attention_mask", "labels", "conv_image", "conv_valid")


def answer_hits(logits: Array, labels: Array) -> tuple[Array, Array, Array]:
    """Per row: (exact bool[R], correct int32[R], supervised int32[R]) of next-token predictions.

    logits: float[R, E, V] (position t predicts token t + 1); labels: int[R, E], IGNORE_INDEX unsupervised
    (the forward's own labels, on the merged sequence).
    A row without a supervised token is not exact.
    """
    target = labels[:, 1:]
    sup = target != IGNORE_INDEX
    hit = (jnp.argmax(logits[:, :-1], axis=-1) == target) & sup
    n = sup.sum(-1).astype(jnp.int32)
    correct = hit.sum(-1).astype(jnp.int32)
    return (correct == n) & (n > 0), correct, n


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hits_jit(graphdef, state, batch):
    out = nnx.merge(graphdef, state)(batch, logits="full", compute_masks=False)
    return answer_hits(out.logits, out.labels)  # both over the merged (image-expanded) sequence


def row_hits(model, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`answer_hits` of one pipeline batch through the model's teacher-forced forward (no SAM)."""
    graphdef, state = nnx.split(model)
    dev = {k: jnp.asarray(batch[k]) for k in KEYS if k in batch}
    return tuple(np.asarray(x) for x in _hits_jit(graphdef, state, dev))


def vqa_accuracy(
    model,
    batches: Iterable[Mapping[str, np.ndarray]],
    question_of: Mapping[str, str],
    kind_of: Callable[[str], str | None],
    progress=None,
) -> dict:
    """Exact-match and token accuracy over `batches`, overall and per question kind.

    Args:
      model: a ReadModel; batches: eval-mode pipeline batches of a VQA reader (one question per row).
      question_of: sample_id -> the row's question (`VqaReader.items`); kind_of: question -> kind (None:
        "other").
    Returns:
      {"num_questions", "exact", "token_accuracy", "per_kind": {kind: {"num_questions", "exact",
      "token_accuracy"}}}.
    """
    acc = collections.defaultdict(lambda: np.zeros(4, np.int64))  # rows, exact, correct, supervised
    for batch in batches:
        exact, correct, n = row_hits(model, batch)
        valid = np.asarray(batch["conv_valid"]).reshape(-1)
        conv_image = np.asarray(batch["conv_image"]).reshape(-1)
        ids = np.asarray(batch["sample_id"]).reshape(-1)
        for r in np.flatnonzero(valid):
            sid = str(ids[conv_image[r]])
            kind = kind_of(question_of[sid]) or "other"
            for key in ("all", kind):
                acc[key] += (1, int(exact[r]), int(correct[r]), int(n[r]))
        if progress is not None:
            progress.update(1)

    def figures(a):
        return {
            "num_questions": int(a[0]),
            "exact": float(a[1] / max(a[0], 1)),
            "token_accuracy": float(a[2] / max(a[3], 1)),
        }

    out = figures(acc.pop("all", np.zeros(4, np.int64)))
    out["per_kind"] = {k: figures(a) for k, a in sorted(acc.items())}
    return out


def other_image_items(items: list[tuple]) -> list[tuple]:
    """The image control: `VqaReader.items` (id, image, rounds) with every conversation moved onto the next
    distinct image (cyclically, in first-seen order), so each question is asked about another scene. The
    accuracy that survives this is what the model answers from the question alone (a language prior).
    """
    order = list(dict.fromkeys(image for _, image, _ in items))
    if len(order) < 2:
        raise ValueError(f"the image control needs at least 2 distinct images, got {len(order)}")
    following = {image: order[(i + 1) % len(order)] for i, image in enumerate(order)}
    return [(sid, following[image], rounds) for sid, image, rounds in items]
