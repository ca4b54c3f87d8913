"""SasP on LISA (Appendix E): a LISA release converts and runs, SasP switchable, in fp32 parity with torch.

The reference is a torch LISA built from a tiny random config (`torchref.lisa`): LLaVA-v1's single-Linear
projector and CLIP at 224 px (16 x 16 = 256 image tokens, LISA's hard-coded 255 = P - 1 shift), the
LISA-7B-v1 vocabulary (32004 rows, [SEG] = 32003), and SAM prompted with the [SEG] token alone (LISA.py
`model_forward`). Its weights are written in the released layout with the real LISA-7B-v1 config.json
(a fine-tune's, sizes made tiny) and added_tokens.json, converted by the command, loaded, and compared:
  * SasP off (how a converted LISA runs by default): LISA's forward, logits, [SEG] embeddings and masks;
  * SasP on, the same weights: READ's SasP on the 8 x 8 grid derived from the 16 x 16 CLIP grid, DtoC on
    the 224-pixel crop: points, labels and masks;
  * the losses of both settings (fine-tuning), and `chat` / `predict` answering with either.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.build import load_model
from read_jax.config import ReadConfig
from read_jax.losses import read_batch_loss
from tests.helpers import require_meta_sam, require_torch
from tests.test_convert import TOKENIZER_ASSETS, save_shards
from torchref.read_batch import CANVAS, ORIG, tiny_batch

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "assets" / "hf_configs"


def _lisa_cfg() -> ReadConfig:
    from torchref.lisa import lisa_config

    return lisa_config("v1")


def _release_config(cfg: ReadConfig) -> dict:
    """The real LISA-7B-v1 fine-tune config.json with the tiny sizes (everything else as published)."""
    hf = json.loads((HF / "lisa_v1" / "LISA-7B-feedback.config.json").read_text())
    c = cfg.llama
    hf.update(
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        mm_hidden_size=cfg.clip.hidden_size,
        out_dim=cfg.out_dim,
    )
    return hf


@pytest.fixture(scope="module")
def lisa(tmp_path_factory):
    """(cfg, torch LISA, converted checkpoint directory)."""
    torch = require_torch()
    require_meta_sam()
    from read_jax.cli import convert as convert_cli
    from tests.test_convert import released_state_dict
    from torchref.lisa import TorchLisa

    cfg = _lisa_cfg()
    tm = TorchLisa(cfg, seed=0).eval()
    rot = tm.llm.model.rotary_emb
    tm.llm.model.rotary_emb = type(rot)(config=tm.llm.config)
    root = tmp_path_factory.mktemp("lisa")
    src, clip = root / "LISA-7B-v1-tiny", root / "clip-vit-large-patch14"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_release_config(cfg)))
    shutil.copyfile(TOKENIZER_ASSETS / "tokenizer.model", src / "tokenizer.model")
    shutil.copyfile(HF / "lisa_v1" / "LISA-7B-v1.added_tokens.json", src / "added_tokens.json")
    sd = released_state_dict(tm)
    assert "model.mm_projector.weight" in sd  # LLaVA-v1's Linear, as LISA's checkpoints store it
    save_shards(torch, sd, src, 2, "bin", torch.float32)
    tm.clip.save_pretrained(clip)
    out = root / "converted"
    argv = ["--hf", str(src), "--clip", str(clip), "--out", str(out), "--dtype", "fp32", "--base", "tiny"]
    assert convert_cli.main([*argv, "--no-progress", "--debug"]) == 0
    return cfg, tm, out


@pytest.fixture(scope="module")
def model(lisa):
    return load_model(lisa[2])


def _torch_forward(cfg: ReadConfig, tm, batch: dict) -> dict:
    import torch

    from torchref.read import torch_forward

    tm.cfg = cfg  # the SasP switch of this comparison
    with torch.no_grad():
        return torch_forward(cfg, tm, batch)[1]


@nnx.jit(static_argnames=("sasp",))
def _jax_forward(m, b, sasp):
    out = m(b, canvas_hw=CANVAS, sasp_cfg=sasp)
    return out, read_batch_loss(out, b)


def test_lisa_release_converts_to_its_own_layout(lisa):
    _, _, out = lisa
    from read_jax.checkpoint import load_config

    got = load_config(out)
    assert (got.mm_projector_type, got.llama.vocab_size, got.seg_token_id) == ("linear", 32004, 32003)
    assert (got.clip.image_size, got.clip.num_patches) == (224, 256)
    assert (got.sasp.enabled, got.sasp.grid_size, got.sasp.num_points) == (False, 8, 30)
    info = json.loads((out / "conversion.json").read_text())
    assert (info["family"], info["chat_template"], info["uninitialized"]) == ("lisa", "llava_v1", [])
    added = json.loads((out / "tokenizer" / "added_tokens.json").read_text())
    assert added == {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002, "[SEG]": 32003}


@pytest.mark.parametrize("sasp_on", [False, True], ids=["lisa_sasp_off", "lisa_sasp_on"])
def test_lisa_forward_and_loss_match_torch(lisa, model, sasp_on):
    import torch

    from torchref.read import torch_losses

    cfg, tm, _ = lisa
    cfg = cfg.replace(sasp=dataclasses.replace(cfg.sasp, enabled=sasp_on))
    batch = tiny_batch(cfg)
    out, (_, terms) = _jax_forward(model, {k: jnp.asarray(v) for k, v in batch.items()}, cfg.sasp)
    tout = _torch_forward(cfg, tm, batch)
    np.testing.assert_allclose(np.asarray(out.logits), tout["logits"].numpy(), atol=1e-4, rtol=1e-4)
    slots = [(0, 0), (1, 0), (1, 1)]
    valid = np.asarray(out.seg.valid)  # the converted model has the tiny base's max_segs slots
    np.testing.assert_array_equal(valid[:, :2], [[True, False], [True, True], [False, False]])
    assert not valid[:, 2:].any()
    assert [(s["row"]) for s in tout["segs"]] == [r for r, _ in slots]
    gts = []
    for (r, k), ts in zip(slots, tout["segs"], strict=True):
        h, w = ORIG[batch["conv_image"][r]]
        np.testing.assert_allclose(
            np.asarray(out.masks.pred_embeddings[r, k]), ts["pred_emb"].numpy(), atol=1e-5, rtol=1e-5
        )
        labels = np.asarray(out.masks.point_labels[r, k])
        if sasp_on:
            np.testing.assert_array_equal(labels, ts["labels"].numpy())
            np.testing.assert_allclose(np.asarray(out.masks.points[r, k]), ts["points"].numpy(), atol=1e-3)
            assert (labels == 1).any() and (labels == 0).any()
        else:
            assert ts["labels"] is None and (labels == -1).all()  # no point: SAM gets the [SEG] token only
        got = np.asarray(out.masks.mask_logits[r, k])
        np.testing.assert_allclose(got[:h, :w], ts["mask"].numpy(), atol=1e-4, rtol=1e-4)
        gts.append(torch.from_numpy((batch["masks"][r, k, :h, :w] == 1).astype(np.float32)))
    want = torch_losses(tout, gts)
    for name in ("ce", "bce", "dice", "loss"):
        np.testing.assert_allclose(float(terms[name]), want[name].item(), rtol=1e-5, atol=1e-6)


def test_sasp_switch_in_the_run_config():
    from read_jax.train.config import read_config

    assert not read_config({"preset": "tiny", "sasp": {"enabled": False}}).sasp.enabled
    assert read_config({"preset": "tiny"}).sasp.enabled


@pytest.mark.parametrize("sasp", ["on", "off"])
def test_chat_answers_with_sasp_on_and_off(lisa, model, sasp, tmp_path, capsys):
    from PIL import Image

    from read_jax.cli import chat
    from read_jax.data.tokenizer import ReadTokenizer
    from read_jax.inference import predict

    _, _, out = lisa
    image = np.random.default_rng(3).integers(0, 255, (90, 120, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    argv = ["--checkpoint", str(out), "--image", str(tmp_path / "img.png"), "--out", str(tmp_path / "o")]
    assert chat.main([*argv, "--max-new-tokens", "3", "--sasp", sasp, "What is it? Please segment it."]) == 0
    rec = json.loads((tmp_path / "o" / "answers.json").read_text())[0]
    assert (rec["template"], rec["sasp"]) == ("llava_v1", sasp == "on")
    assert "A:" in capsys.readouterr().out
    # The same with a forced answer holding a [SEG]: a mask either way, points only with SasP.
    tok = ReadTokenizer(out / "tokenizer")
    pred = predict(
        model, tok, image, "Segment it.", template="llava_v1", force_answer="Sure, [SEG].", sasp=sasp == "on"
    )
    assert pred.masks.shape == (1, 90, 120) and np.isfinite(pred.mask_logits).all()
    assert ((pred.point_labels >= 0).sum() > 0) == (sasp == "on")
