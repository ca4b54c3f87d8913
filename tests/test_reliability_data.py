"""The data pipeline under over-long queries and the generated set under hand edits (issue "Nothing lost,
nothing silent", problems 4 and 7)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from read_jax.config import IGNORE_INDEX, SEG_TOKEN_ID, ConfigError, ReadConfig
from read_jax.data import loaders, make_shapes
from read_jax.data import pipeline as P
from read_jax.data import readers as R

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "tests" / "assets" / "tokenizer")
LIMIT = 64  # the largest (only) length bucket of these tests
LONG = " ".join(["which of the coloured shapes is nearest to the big red one"] * 12)


@pytest.fixture(scope="module")
def processor():
    dc = P.DataConfig(batch_size=1, max_convs=3, length_buckets=(32, LIMIT), max_mask_side=64)
    return P.ExampleProcessor(dc, ReadConfig.smoke().sam, TOKENIZER)


def test_a_missing_tokenizer_fails_once_with_the_override_to_pass(tmp_path):
    """Not every item skipped as unusable: the pipeline refuses to start, naming the path and the flag."""
    dc = P.DataConfig(batch_size=1, max_convs=3, length_buckets=(LIMIT,), max_mask_side=64)
    gone = str(tmp_path / "old_checkout" / "tests" / "assets" / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"--config\.data\.tokenizer=DIR") as e:
        P.ExampleProcessor(dc, ReadConfig.smoke().sam, gone)
    assert f"data.tokenizer={gone}" in str(e.value)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(path)
    return str(path)


def example(image: str, *convs: R.Conversation) -> R.Example:
    masks = np.zeros((1, 40, 50), np.uint8)
    masks[0, 5:20, 5:30] = 1
    return R.Example(image, list(convs), masks, "scene", "test", (40, 50))


def conv(question: str, answer: str | None, has_seg: bool) -> R.Conversation:
    return R.Conversation(question, answer, has_seg, True, 0 if has_seg else -1)


def supervised(ids, labels) -> list[int]:
    return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


# ---- 4: long queries are silently truncated ------------------------------------------------------------
def test_truncation_never_removes_the_answers_seg(processor, image):
    """A long answer after [SEG] is cut at the largest bucket with its [SEG] kept; a long question whose [SEG]
    would be cut off makes the example unusable (skipped and counted by the pipeline), never a row without
    its [SEG]."""
    tok = processor.tokenizer
    long_answer = "Sure, it is [SEG]. " + LONG
    out = processor(example(image, conv("Where is the red one?", long_answer, True)))
    (ids, labels) = out["rows"][0]
    full, _ = processor.encode(conv("Where is the red one?", long_answer, True))
    assert len(full) > LIMIT and len(ids) == len(labels) == LIMIT and ids == full[:LIMIT]
    assert SEG_TOKEN_ID in supervised(ids, labels)
    # The same [SEG] answer after a question too long for the bucket: skipped, with the reason.
    too_long = example(
        image, conv("Where is the red one?", "It is [SEG].", True), conv(LONG, "It is [SEG].", True)
    )
    want = r"scene query 1: the text up to its \[SEG\] takes \d+ tokens, the largest length bucket holds"
    with pytest.raises(P.QueryTooLongError, match=f"{want} {LIMIT}"):
        processor(too_long)
    assert P.skip_reason(P.QueryTooLongError("x")) == "query too long"
    assert len(tok.encode(LONG)) > LIMIT


def test_truncation_keeps_questions_and_prompts_whole(processor, image):
    """Without [SEG]: a long answer is cut (the question and the answer's first token stay), a question that
    does not fit is skipped, and a generation prompt (no answer) is never cut."""
    out = processor(example(image, conv("What colour is it?", LONG, False)))
    ids, labels = out["rows"][0]
    assert len(ids) == LIMIT and supervised(ids, labels)
    for c, what in ((conv(LONG, "Red.", False), "the question"), (conv(LONG, None, True), "the prompt")):
        with pytest.raises(P.QueryTooLongError, match=f"scene query 0: {what} takes"):
            processor(example(image, c))
    short = processor(example(image, conv("What colour is it?", None, True)))
    assert short["rows"][0][0] == processor.encode(conv("What colour is it?", None, True))[0]


# ---- 7: data.make_shapes rewrites the split and writes into any data.root --------------------------------
def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_generated_data_never_overwrites_hand_edits_nor_a_user_data_root(tmp_path):
    # A user's data root (no generator marker) is refused, and nothing is written into it.
    user = tmp_path / "dataset"
    (user / "train").mkdir(parents=True)
    (user / "train" / "mine.jpg").write_bytes(b"a user's image")
    before = _files(user)
    cfg = ConfigDict({"make_shapes": True, "root": str(user), "num_shapes": (3, 1, 0)})
    with pytest.raises(
        ConfigError, match=r"data\.root=.*dataset holds data the shapes generator did not write"
    ):
        loaders.ensure_shapes_data(cfg)
    assert _files(user) == before
    # A set the generator made (its command writes the marker): a missing file is written back, identical to
    # the generator's; a hand-edited file and every other file stay as they are.
    own = tmp_path / "shapes"
    assert make_shapes.main(["--out", str(own), "--num-train", "3", "--num-val", "1", "--num-test", "0"]) == 0
    marker = make_shapes.read_marker(str(own))
    assert marker["generator"] == "read_jax.data.make_shapes" and marker["seed"] == 0
    reference = _files(own)
    reason = str(own / "reason_seg" / "ReasonSeg")
    js = Path(make_shapes.example_paths(reason, "train", 1)[1])
    edited = json.loads(js.read_text())
    edited["text"] = ["the hand-corrected query"]
    js.write_text(json.dumps(edited))
    gone = Path(make_shapes.example_paths(reason, "train", 2)[0])
    gone.unlink()
    mix = {
        "make_shapes": True,
        "root": str(own),
        "num_shapes": (3, 1, 0),
        "sem_seg_data": "mapillary||paco_lvis",
    }
    loaders.ensure_shapes_data(ConfigDict(mix))
    after = _files(own)
    assert json.loads(after[str(js.relative_to(own))]) == edited
    assert after[str(gone.relative_to(own))] == reference[str(gone.relative_to(own))]
    assert {k: v for k, v in after.items() if k != str(js.relative_to(own))} == {
        k: v for k, v in reference.items() if k != str(js.relative_to(own))
    }
    # An absent root is created, marked and filled.
    new = tmp_path / "new" / "shapes"
    loaders.ensure_shapes_data(
        ConfigDict({"make_shapes": True, "root": str(new), "num_shapes": (2, 1, 0), "rates": "reason_seg:1"})
    )
    assert make_shapes.read_marker(str(new))["seed"] == 0
    assert sorted(os.listdir(new / "reason_seg" / "ReasonSeg" / "train")) == [
        "shapes_train_00000.jpg",
        "shapes_train_00000.json",
        "shapes_train_00001.jpg",
        "shapes_train_00001.json",
    ]
