"""VQA answer accuracy under teacher forcing (`read_jax.eval.vqa`): the per-row hit rule against numpy, and
the model path against greedy decoding of the same model (a reference answer taken from the model's own
greedy output is right up to its last token; one with a changed first token is wrong from the start)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from read_jax.build import model_fn
from read_jax.config import IGNORE_INDEX, ReadConfig
from read_jax.data import pipeline as Pl
from read_jax.data.readers import VqaReader
from read_jax.data.tokenizer import ReadTokenizer
from read_jax.eval import vqa
from read_jax.inference import predict
from tests.helpers import numpy_random_model
from tests.protocol_fixtures import TOKENIZER


def test_answer_hits_against_numpy():
    rng = np.random.default_rng(0)
    r, length, v = 5, 9, 11
    logits = rng.standard_normal((r, length, v)).astype(np.float32)
    labels = np.full((r, length), IGNORE_INDEX, np.int32)
    pred = logits.argmax(-1)  # position t predicts token t + 1
    labels[0, 3:6] = pred[0, 2:5]  # all right
    labels[1, 3:6] = pred[1, 2:5]
    labels[1, 5] = (pred[1, 4] + 1) % v  # last one wrong
    labels[2, 1:9] = (pred[2, 0:8] + 1) % v  # all wrong
    labels[3, 8] = pred[3, 7]  # one token, right
    # row 4: nothing supervised
    exact, correct, n = (np.asarray(x) for x in vqa.answer_hits(logits, labels))
    np.testing.assert_array_equal(n, [3, 3, 8, 1, 0])
    np.testing.assert_array_equal(correct, [3, 2, 0, 1, 0])
    np.testing.assert_array_equal(exact, [True, False, False, True, False])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = ReadConfig.smoke(max_segs=1, lora=None)
    model = numpy_random_model(model_fn(cfg))
    tok = ReadTokenizer(TOKENIZER)
    root = tmp_path_factory.mktemp("vqa")
    rng = np.random.default_rng(1)
    images = []
    for i in range(3):
        img = rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
        images.append(img)
    return cfg, model, tok, root, images


def _pipeline_labels(batch) -> list[list[int]]:
    return [[int(t) for t in row if t != IGNORE_INDEX] for row in np.asarray(batch["labels"])]


def _greedy_answer(model, tok, image, candidates):
    """The first question whose greedy answer re-tokenises (after "ASSISTANT:") to the generated ids, and
    that answer: a random model's first token often lacks the word-start marker the template's space gives."""
    for q in candidates:
        p = predict(model, tok, image, q, max_new_tokens=4)
        text = p.text.strip()
        ids = tok.encode(text)[1:] if text else []  # without <s>
        if ids and ids == [int(t) for t in p.tokens[: len(ids)]]:
            return q, text, np.asarray(p.tokens)
    raise AssertionError("no greedy answer re-tokenises to its ids")


def test_vqa_accuracy_agrees_with_greedy_decoding(setup):
    cfg, model, tok, root, images = setup
    words = ("colour", "count", "corner", "size", "shape", "place", "side", "edge")
    candidates = [f"Which {w} is number {k}?" for w in words for k in range(3)]
    items, expect, questions = [], [], []
    for i, img in enumerate(images):
        q, answer, tokens = _greedy_answer(model, tok, img, candidates[8 * i :])
        if i == 2:  # change the first word: wrong from the first supervised position
            answer = "zebra " + answer
        items.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\n" + q},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
        expect.append(tokens)
        questions.append(q)
    (root / "vqa.json").write_text(json.dumps(items))
    reader = VqaReader(str(root / "vqa.json"), str(root), mode="eval")
    dc = Pl.DataConfig(
        batch_size=3,
        max_convs=1,
        max_mask_side=64,
        length_buckets=(256,),
        seed=0,
        clip_size=cfg.clip.image_size,
    )
    batches = list(Pl.eval_dataset(reader, dc, cfg.sam, TOKENIZER))
    assert len(batches) == 1

    question_of = {f"vqa/{it['id']}": it["conversations"][0]["value"][len("<image>\n") :] for it in items}
    kinds = {questions[0]: "colour", questions[1]: "count"}
    got = vqa.vqa_accuracy(model, batches, question_of, kinds.get)

    exact, correct, n = vqa.row_hits(model, batches[0])
    sup = _pipeline_labels(batches[0])
    for r in range(2):
        greedy = [int(t) for t in expect[r]]
        k = len(sup[r]) - 1  # the answer's tokens; the last supervised one is </s>
        assert sup[r][:k] == greedy[:k], (sup[r], greedy)
        # Greedy decoding produced these k tokens, so teacher forcing predicts each of them; the model
        # stops with </s> only if greedy decoding did.
        want_eos = len(greedy) > k and greedy[k] == tok.eos_token_id
        assert correct[r] == k + int(want_eos) and n[r] == k + 1 and exact[r] == want_eos
    assert correct[2] < n[2] and not exact[2]
    assert got["num_questions"] == 3 and set(got["per_kind"]) == {"colour", "count", "other"}
    assert got["per_kind"]["other"]["exact"] == 0.0
    np.testing.assert_allclose(got["token_accuracy"], correct.sum() / n.sum())
    np.testing.assert_allclose(got["exact"], exact.mean())


def test_other_image_items_moves_every_question_to_another_scene():
    rounds = [[(f"q{i}", f"a{i}")] for i in range(6)]
    items = [(str(i), img, r) for i, (img, r) in enumerate(zip("aabccb", rounds, strict=True))]
    moved = vqa.other_image_items(items)
    assert [m[1] for m in moved] == list("bbcaac")  # a -> b -> c -> a, in first-seen order
    assert [(m[0], m[2]) for m in moved] == [(it[0], it[2]) for it in items]
    with pytest.raises(ValueError, match="2 distinct images"):
        vqa.other_image_items([("0", "a", rounds[0]), ("1", "a", rounds[1])])


def test_image_control_feeds_each_question_the_next_scene(setup):
    cfg, _, _, root, _ = setup
    items = [
        {"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat is {i}?"}, {"from": "gpt", "value": f"It is {i}."}]}
        for i in range(3)
    ]  # fmt: skip
    (root / "control.json").write_text(json.dumps(items))
    reader = VqaReader(str(root / "control.json"), str(root), mode="eval")
    control = VqaReader(str(root / "control.json"), str(root), mode="eval")
    control.items = vqa.other_image_items(reader.items)
    dc = Pl.DataConfig(batch_size=3, max_convs=1, max_mask_side=64, length_buckets=(256,), seed=0,
                       clip_size=cfg.clip.image_size)  # fmt: skip
    own, other = (next(iter(Pl.eval_dataset(r, dc, cfg.sam, TOKENIZER))) for r in (reader, control))
    np.testing.assert_array_equal(other["input_ids"], own["input_ids"])  # the same questions and answers
    for i in range(3):
        np.testing.assert_array_equal(other["images_clip"][i], own["images_clip"][(i + 1) % 3])
        assert not np.array_equal(other["images_clip"][i], own["images_clip"][i])
