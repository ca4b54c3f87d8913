"""ReadTokenizer and the conversation templates against goldens from transformers 4.31's slow LlamaTokenizer.

The goldens (`tests/assets/tokenizer/goldens.json`) were produced by `scripts/make_tokenizer_goldens.py`
in a scratch venv with transformers==4.31.0 and sentencepiece==0.1.99 (READ's pins), from the tiny
LLaMA-style model `tests/assets/tokenizer/tokenizer.model` (`scripts/make_tokenizer_model.py`).  That
script transcribes READ's prompt building, `tokenizer_image_token` and label masking itself, so nothing
here is compared with output of the code under test.
"""

import hashlib
import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from read_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, SEG_TOKEN_ID
from read_jax.data.conversation import (
    ANSWER_TEMPLATE,
    LLAVA_V1,
    VICUNA_V1,
    build_conversation,
    build_prompt,
    encode_conversation,
    get_template,
    reason_seg_question,
)
from read_jax.data.tokenizer import ReadTokenizer, tokenizer_image_token

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "tokenizer")


@pytest.fixture(scope="module")
def goldens():
    with open(os.path.join(ASSETS, "goldens.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok():
    return ReadTokenizer(ASSETS)


def test_goldens_belong_to_the_checked_in_model(goldens):
    with open(os.path.join(ASSETS, "tokenizer.model"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert goldens["meta"]["tokenizer_model_sha256"] == sha, "regenerate goldens.json for tokenizer.model"
    assert goldens["meta"]["transformers"] == "4.31.0"


def test_added_and_special_ids(tok, goldens):
    special = goldens["special"]
    assert (tok.seg_token_id, tok.im_start_token_id, tok.im_end_token_id) == (32000, 32001, 32002)
    assert (special["seg_token_idx"], special["im_start_idx"], special["im_end_idx"]) == (32000, 32001, 32002)
    assert len(tok) == special["len"] == 32003
    assert tok.vocab_size == special["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (
        special["bos"],
        special["eos"],
        special["unk"],
        special["pad"],
    )
    assert tok.all_special_ids == set(special["all_special_ids"])
    # LISA issue #55: with other tokenizer settings this gives [29871, 32000] and seg_token_idx = 29871.
    assert tok("[SEG]", add_special_tokens=False) == [SEG_TOKEN_ID]
    assert tok.convert_tokens_to_ids(["[SEG]", "<im_start>", "<im_end>"]) == [32000, 32001, 32002]


def test_encode_matches_transformers_4_31(tok, goldens):
    bad = []
    for case in goldens["encode"]:
        ids = tok.encode(case["text"], add_special_tokens=case["add_special_tokens"])
        if ids != case["ids"]:
            bad.append((case["text"], case["add_special_tokens"], ids, case["ids"]))
        if tok.tokenize(case["text"]) != case["tokens"]:
            bad.append((case["text"], "tokens", tok.tokenize(case["text"]), case["tokens"]))
    assert not bad, bad
    assert len(goldens["encode"]) >= 80


def test_tokenizer_image_token_matches(tok, goldens):
    for case in goldens["image_token"]:
        assert tokenizer_image_token(case["prompt"], tok) == case["ids"], case["prompt"]
    assert tokenizer_image_token("<image>\nhi", tok).count(IMAGE_TOKEN_INDEX) == 1


def test_decode_matches_transformers_4_31(tok, goldens):
    for case in goldens["decode"]:
        text = tok.decode(case["ids"], skip_special_tokens=case["skip_special_tokens"])
        assert text == case["text"], case
    # Arrays decode like lists; batch_decode decodes rows independently.
    rows = [c["ids"] for c in goldens["decode"][:4:2]]
    assert tok.batch_decode(np.asarray(rows[:1]), skip_special_tokens=True) == [
        tok.decode(rows[0], skip_special_tokens=True)
    ]


def test_conversations_and_labels_match(tok, goldens):
    for case in goldens["conversations"]:
        rounds = [tuple(r) for r in case["rounds"]]
        prompt = build_conversation(rounds, template=case["template"], image=case["image"])
        assert prompt == case["prompt"]
        ids, labels = encode_conversation(prompt, tok, template=case["template"])
        assert ids == case["input_ids"], case["prompt"]
        assert labels == case["labels"], case["prompt"]
        # What is supervised is exactly the answers, each followed by </s>.
        supervised = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
        expected = []
        for _, answer in rounds:
            expected += tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        assert supervised == expected


def test_inference_prompts_match(tok, goldens):
    for case in goldens["inference_prompts"]:
        prompt = build_prompt(case["question"], None, template=case["template"])
        assert prompt == case["prompt"]
        assert prompt.endswith("ASSISTANT:")
        assert tokenizer_image_token(prompt, tok) == case["input_ids"]
        # A question without the placeholder gets "<image>\n" prepended, as READ's demo does.
        bare = case["question"].replace("<image>\n", "")
        assert build_prompt(bare, None, template=case["template"]) == prompt


def test_templates_and_lisa_eval_prompt(tok):
    assert LLAVA_V1.system.startswith("A chat between a curious human")
    assert LLAVA_V1.system.endswith("human's questions.")
    assert VICUNA_V1.system.startswith("A chat between a curious user")
    assert VICUNA_V1.system.endswith("user's questions.")
    assert get_template("vicuna_v1") is VICUNA_V1
    q = reason_seg_question("Dog", is_sentence=False)
    assert q == "<image>\nWhat is dog in this image? Please output segmentation mask."
    prompt = build_prompt(reason_seg_question("What cuts bread?", True), ANSWER_TEMPLATE)
    assert prompt == (
        LLAVA_V1.system + " USER: <im_start><image><im_end>\nWhat cuts bread? Please output "
        "segmentation mask. ASSISTANT: Sure, the segmentation result is [SEG].</s>"
    )
    assert build_prompt("hi", "yo", image=False) == LLAVA_V1.system + " USER: hi ASSISTANT: yo</s>"
    ids, labels = encode_conversation(prompt, tok)
    assert ids.count(SEG_TOKEN_ID) == 1 and labels[ids.index(SEG_TOKEN_ID)] == SEG_TOKEN_ID
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX


def test_decode_round_trips(tok, goldens):
    texts = [
        "Le café est très bon à Paris.",
        "emoji 😀🎉 end 中文 猫",
        "line one\nline two",
        "  both sides  ",
        "In 2024, 12345 items cost $99.50.",
    ]
    for text in texts:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    # Added tokens gain spaces in decode, but re-encoding the decoded text gives the same ids back:
    # what matters when generated text is fed to the model again.
    for case in goldens["conversations"]:
        for _, answer in case["rounds"]:
            ids = tok.encode(answer)
            assert tok.encode(tok.decode(ids, skip_special_tokens=True)) == ids
    assert tok.decode([SEG_TOKEN_ID], skip_special_tokens=True) == "[SEG]"  # [SEG] is not a special token


def test_pickles_for_data_workers(tok):
    # Data-loader worker processes receive the tokenizer by pickling.
    text = "<im_start><image><im_end>\nIs it [SEG]."
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_bad_inputs_raise(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([1, IMAGE_TOKEN_INDEX, 5])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode([[1, 2]])
    with pytest.raises(TypeError, match="str"):
        tok.encode(["a"])
    with pytest.raises(ValueError, match=r"needs an answer|need exactly 2"):
        encode_conversation(build_prompt("q"), tok)
    with pytest.raises(ValueError, match="unknown conversation template"):
        build_prompt("q", "a", template="llama_2")
    with pytest.raises(ValueError, match="only the last round"):
        build_conversation([("q1", None), ("q2", "a2")])
    with pytest.raises(ValueError, match="first question"):
        build_conversation([("q1", "a1"), ("<image>\nq2", "a2")])
    with pytest.raises(ValueError, match="placeholders"):
        build_prompt("<image><image> q", "a")
    with pytest.raises(ValueError, match="image=True"):
        build_prompt("<image> q", "a", image=False)


def test_loader_checks(tmp_path):
    import sentencepiece as spm  # a runtime dependency: never skipped

    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(os.path.join(ASSETS, "tokenizer.model"), good / "tokenizer.model")
    assert ReadTokenizer(good / "tokenizer.model").seg_token_id == 32000  # the file path works too
    added = {"<im_end>": 32002, "<im_start>": 32001, "[SEG]": 32000}
    (good / "added_tokens.json").write_text(json.dumps(added))
    assert len(ReadTokenizer(good)) == 32003

    (good / "added_tokens.json").write_text(json.dumps({"[SEG]": 32001}))
    with pytest.raises(ValueError, match=r"added_tokens\.json disagrees"):
        ReadTokenizer(good)
    (good / "added_tokens.json").write_text(json.dumps({"<im_patch>": 32003}))
    with pytest.raises(ValueError, match=r"added_tokens\.json disagrees"):
        ReadTokenizer(good)
    (good / "added_tokens.json").unlink()
    (good / "tokenizer_config.json").write_text(json.dumps({"add_eos_token": True}))
    with pytest.raises(ValueError, match="add_eos_token"):
        ReadTokenizer(good)
    with pytest.raises(ValueError, match="no SentencePiece model"):
        ReadTokenizer(tmp_path)

    # A non-LLaMA vocabulary size is refused (the added-token ids would not be 32000-32002).
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a small corpus of words"] * 20),
        model_writer=model,
        vocab_size=40,
        model_type="bpe",
        minloglevel=2,
    )
    small = tmp_path / "small.model"
    small.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="40 pieces"):
        ReadTokenizer(small)
