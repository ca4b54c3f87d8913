"""The reference's template lists, read from a file the user points at (parsed as data, never executed).

The fixture `tests/assets/templates/qa_template.py` has the shape of READ's `dataloaders/qa_template.py`
(lists of `DEFAULT_IMAGE_TOKEN + "\\n" + "..."` questions and plain answer strings) with our own sentences.
Checked: it parses into the six lists (questions without their "<image>\\n"); files whose lists are built by
code, or are not in that shape, are refused with an error naming the list; a file that would do something if
run does nothing when loaded; the readers draw from the loaded lists for RefCOCO / FP-RefCOCO evaluation and
for training (the mixture built from a run config), ReasonSeg evaluation keeps LISA's fixed templates, and
a released checkpoint scored on a RefCOCO-family split without them gets the "not comparable" note.
"""

import json
import os

import ml_collections
import numpy as np
import pytest

from read_jax.config import ConfigError
from read_jax.data import loaders
from read_jax.data import templates as T
from read_jax.eval import run as erun
from read_jax.train.config import default_config
from tests.protocol_fixtures import ROOT, write_reason_seg, write_refer

FIXTURE = os.path.join(ROOT, "tests", "assets", "templates", "qa_template.py")
HEADER = "from model.llava.constants import DEFAULT_IMAGE_TOKEN\n"
GOOD = {
    "SHORT_QUESTION_TEMPLATE": '[DEFAULT_IMAGE_TOKEN + "\\n" + "Is {class_name} there?"]',
    "LONG_QUESTION_TEMPLATE": '[DEFAULT_IMAGE_TOKEN + "\\n" + "{sent} Mask it."]',
    "NEG_ANSWER_TEMPLATE": '["No {class_name}."]',
    "LONG_ANSWER_TEMPLATE": '["It is [SEG]."]',
    "SHORT_ANSWER_TEMPLATE": '["{class_name}: [SEG]."]',
    "CORRECT_ANSWER_TEMPLATE": '["Not {class_name} but {gt_name}."]',
}


def _write(tmp_path, **over) -> str:
    lists = {**GOOD, **over}
    body = HEADER + "".join(f"{k} = {v}\n" for k, v in lists.items() if v is not None)
    path = tmp_path / "qa_template.py"
    path.write_text(body)
    return str(path)


def test_template_fixture_parses_into_the_lists():
    t = T.load_reference_templates(FIXTURE)
    assert t.short_questions == (
        "Fixture question one: is {class_name} shown? Segment it if so.",
        "Fixture question two: mask {class_name}, or say it is absent.",
        "Fixture question three: look for {class_name} in the picture and outline it if it is there.",
    )
    assert t.long_questions == (
        "{sent} Fixture long question: segment what this describes.",
        "{sent} Fixture long question: give its mask if present.",
    )
    assert t.neg_answers == (
        "Fixture denial: no {class_name} here.",
        "Fixture denial: nothing like that in the image.",
    )
    assert t.long_answers == ("Fixture long answer: [SEG].",)
    assert t.short_answers == ("Fixture answer: {class_name} is [SEG].", "Fixture answer: here, [SEG].")
    assert t.correct_answers == ("Fixture correction: not {class_name}, but {gt_name}.",)
    assert t.source.startswith(FIXTURE) and "sha256" in t.source
    rng = np.random.default_rng(0)
    assert t.short_question(rng, "the cup") in {q.format(class_name="the cup") for q in t.short_questions}
    assert T.load_templates("") is T.DEFAULT and T.DEFAULT.source == "read_jax"


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("SHORT_QUESTION_TEMPLATE", '["Is {%s} there?" % "class_name"]', "not a string literal"),
        ("LONG_QUESTION_TEMPLATE", '[s + " Mask it." for s in ["{sent}"]]', "built by code"),
        ("NEG_ANSWER_TEMPLATE", 'list(("No {class_name}.",))', "built by code"),
        ("LONG_ANSWER_TEMPLATE", 'OTHER + ["It is [SEG]."]', "built by code"),
        ("SHORT_ANSWER_TEMPLATE", '[f"{1 + 1} [SEG]"]', "not a string literal"),
        ("SHORT_ANSWER_TEMPLATE", '[SOME_NAME + "[SEG]"]', "not a string literal"),
        ("SHORT_ANSWER_TEMPLATE", '["{class_name} is here."]', "[SEG]"),
        ("LONG_QUESTION_TEMPLATE", '["Mask it."]', "placeholders"),
        ("CORRECT_ANSWER_TEMPLATE", '["Not {class_name}."]', "placeholders"),
        ("NEG_ANSWER_TEMPLATE", "[]", "empty"),
        ("CORRECT_ANSWER_TEMPLATE", None, "no literal list"),
    ],
)
def test_template_files_not_in_the_shape_are_refused(tmp_path, name, value, why):
    with pytest.raises(T.TemplateError, match=rf"{name}") as e:
        T.load_reference_templates(_write(tmp_path, **{name: value}))
    assert why in str(e.value)


def test_template_augmented_list_is_refused(tmp_path):
    path = _write(tmp_path)
    with open(path, "a") as f:
        f.write('SHORT_ANSWER_TEMPLATE += ["More: [SEG]."]\n')
    with pytest.raises(T.TemplateError, match="SHORT_ANSWER_TEMPLATE is assigned more than once"):
        T.load_reference_templates(path)


def test_template_file_is_never_executed(tmp_path):
    marker = tmp_path / "ran"
    path = _write(tmp_path)
    with open(path, "a") as f:
        f.write(f"open({str(marker)!r}, 'w').write('executed')\n")
    T.load_reference_templates(path)
    assert not marker.exists()


def _data_cfg(root, templates=""):
    c = default_config()
    c.data.root = str(root)
    c.data.templates = templates
    return c.data


def _refer(root):
    segm = [[10.0, 10.0, 60.0, 10.0, 60.0, 50.0, 10.0, 50.0]]
    sents = [{"sent": "The Left Cup", "sent_id": 0}, {"sent": "red mug", "sent_id": 1}]
    write_refer(
        str(root),
        "fprefcoco",
        "berkeley_exclude_unified",
        [(1, 80, 100)],
        [
            {"ref_id": 1, "ann_id": 5, "image_id": 1, "split": "val", "sentences": sents[:1]},
            {
                "ref_id": 2,
                "ann_id": 5,
                "image_id": 1,
                "split": "val",
                "sentences": [{**sents[1], "is_false_premise": True, "gt_sent": "the cup"}],
            },
        ],
        [{"id": 5, "image_id": 1, "segmentation": segm}],
    )


def test_templates_used_for_refcoco_fprefcoco_and_training(tmp_path, monkeypatch):
    _refer(tmp_path)
    t = T.load_reference_templates(FIXTURE)
    reader = loaders.eval_reader(_data_cfg(tmp_path, FIXTURE), "fprefcoco", "val")
    ex = reader[0]
    assert reader.templates == t
    qs = {q.format(class_name=s) for q in t.short_questions for s in ("the left cup", "red mug")}
    assert [c.question in qs for c in ex.conversations] == [True, True]
    assert ex.conversations[0].answer in {a.format(class_name="the left cup") for a in t.short_answers}
    assert ex.conversations[1].answer == "Fixture correction: not red mug, but the cup."
    ours = loaders.eval_reader(_data_cfg(tmp_path), "fprefcoco", "val")[0]
    assert not any("Fixture" in c.question for c in ours.conversations)  # our wording stays the default
    # ReasonSeg evaluation keeps LISA's fixed templates whatever data.templates says.
    write_reason_seg(str(tmp_path / "reason_seg" / "ReasonSeg"), "val", [(40, 50)])
    rs = loaders.eval_reader(_data_cfg(tmp_path, FIXTURE), "reasonseg", "val")[0]
    assert "Fixture" not in rs.conversations[0].question
    # Training: every source of the mixture draws from the loaded lists.
    write_reason_seg(str(tmp_path / "reason_seg" / "ReasonSeg"), "train", [(40, 50)])
    seen = {}
    monkeypatch.setattr(loaders.Pl, "train_dataset", lambda mixture, *a, **k: seen.update(m=mixture) or [])
    c = default_config()
    c.data.root, c.data.templates, c.data.rates = str(tmp_path), FIXTURE, "reason_seg:1"
    c.data.tokenizer = os.path.join(ROOT, "tests", "assets", "tokenizer")
    from read_jax.config import ReadConfig

    loaders.train_iterator(c, ReadConfig.tiny())
    src = seen["m"].sources[seen["m"].names.index("reason_seg")]
    assert src.templates == t
    conv = src.sample(np.random.default_rng(1)).conversations[0]
    assert conv.answer == "Fixture long answer: [SEG]."
    with pytest.raises(ConfigError, match=r"config\.data\.templates"):
        loaders.eval_reader(
            _data_cfg(tmp_path, _write(tmp_path, LONG_ANSWER_TEMPLATE="[]")), "fprefcoco", "val"
        )


def test_template_note_for_released_checkpoints(tmp_path):
    ckpt = tmp_path / "released"
    (ckpt / "params").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "params" / "manifest.json").write_text(json.dumps({}))
    config = ml_collections.ConfigDict({"data": {"templates": ""}})
    note = erun.template_note("refer", "refcoco_val", str(ckpt), config)
    assert "not comparable" in note and "qa_template.py" in note
    assert erun.template_note("fp", "fprefcoco_val", str(ckpt), config) is not None
    assert erun.template_note("reasonseg", "reasonseg_val", str(ckpt), config) is None  # LISA's fixed ones
    assert erun.template_note("refer", "refcoco_val", str(tmp_path / "workdir"), config) is None
    config.data.templates = FIXTURE
    assert erun.template_note("refer", "refcoco_val", str(ckpt), config) is None
