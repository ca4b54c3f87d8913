"""Inference (`predict`) and the chat command on a tiny random READ."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from read_jax.config import ReadConfig
from read_jax.data.conversation import build_prompt
from read_jax.data.tokenizer import ReadTokenizer, tokenizer_image_token
from read_jax.inference import predict, prepare_image, save_for_inference
from read_jax.llama_generate import generate_no_cache
from read_jax.read_model import ReadModel
from tests.helpers import numpy_random_model

TOKENIZER = Path(__file__).parent / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def tiny():
    cfg = ReadConfig.tiny(max_segs=2)
    model = numpy_random_model(lambda: ReadModel(cfg, rngs=nnx.Rngs(3)), seed=3)
    return model, ReadTokenizer(str(TOKENIZER))


def _image(h=150, w=220, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_predict_tokens_equal_no_cache_generation(tiny):
    model, tok = tiny
    img = _image()
    pred = predict(model, tok, img, "What is in the picture?", max_new_tokens=6)
    ids = jnp.asarray([tokenizer_image_token(build_prompt("What is in the picture?"), tok)], jnp.int32)
    merged = model.llava.merge(ids, jnp.asarray(prepare_image(img, model.config)["images_clip"]))
    ref, ref_len = generate_no_cache(
        model.llava.language_model,
        inputs_embeds=merged.inputs_embeds,
        attention_mask=merged.attention_mask,
        max_new_tokens=6,
        eos_token_id=tok.eos_token_id,
    )
    np.testing.assert_array_equal(pred.tokens, np.asarray(ref[0, : int(ref_len[0])]))
    assert pred.text == tok.decode(pred.tokens.tolist(), skip_special_tokens=True)


def test_forced_seg_gives_masks_at_original_size(tiny):
    model, tok = tiny
    img = _image(131, 97)
    pred = predict(model, tok, img, "Segment the red star.", force_answer="Sure, [SEG] and [SEG].")
    assert pred.masks.shape == (2, 131, 97) and pred.masks.dtype == bool
    assert pred.mask_logits.shape == (2, 131, 97) and np.isfinite(pred.mask_logits).all()
    np.testing.assert_array_equal(pred.masks, pred.mask_logits > 0)
    assert pred.object_present == bool(pred.masks[0].any())
    assert pred.points.shape == (2, model.config.sasp.num_points, 2)
    assert (pred.points[..., 0] <= 97).all() and (pred.points[..., 1] <= 131).all()
    assert set(np.unique(pred.point_labels)) <= {-1, 0, 1}
    assert "[SEG]" in pred.text


def test_no_seg_means_no_object_and_no_mask(tiny):
    model, tok = tiny
    pred = predict(model, tok, _image(), "Is there a unicorn?", force_answer="No, there is no unicorn.")
    assert pred.object_present is False
    assert pred.masks.shape == (0, 150, 220)


def test_bad_image_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="RGB uint8"):
        predict(model, tok, np.zeros((10, 10), np.uint8), "hi")


def test_chat_command_writes_overlay_png(tiny, tmp_path):
    from read_jax.cli import chat

    model, _ = tiny
    ckpt = tmp_path / "ckpt"
    save_for_inference(model, str(ckpt), str(TOKENIZER))
    img_path = tmp_path / "img.jpg"
    Image.fromarray(_image(120, 160)).save(img_path)
    out = tmp_path / "out"
    rc = chat.main(
        [
            "--checkpoint",
            str(ckpt),
            "--image",
            str(img_path),
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
            "--dtype",
            "float32",
            "Where is the circle?",
        ]
    )
    assert rc == 0
    png = out / "answer_00.png"
    with Image.open(png) as im:
        assert im.size == (160, 120)
    rec = json.loads((out / "answers.json").read_text())
    assert rec[0]["question"] == "Where is the circle?" and isinstance(rec[0]["answer"], str)
    assert 1 <= rec[0]["new_tokens"] <= 4 and rec[0]["seconds"] > 0  # the decoding figures of the answer
    assert chat.main(["--checkpoint", str(tmp_path / "nope"), "--image", str(img_path), "q"]) == 2
