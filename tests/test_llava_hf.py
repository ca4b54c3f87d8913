"""llava-hf as a starting point: transformers' `LlavaForConditionalGeneration` -> read_jax, fp32 parity.

The reference is transformers' own model built from a tiny config with llava-hf's vocabulary (32064 rows,
<image> = 32000, <pad> = 32001; `torchref.llava_hf`), saved with `save_pretrained` (the layout of the
llava-hf/llava-1.5-*-hf repositories) next to llava-hf's real added_tokens.json. It is converted by the
command with `--resize-vocab --sam`, as a LLaVA-1.5 base is, and:
  * the LLaVA forward (CLIP -> projector -> merge -> LLaMA) matches transformers' in fp32 on LLaMA's 32000
    logits, and READ's tokens sit at 32000-32002 (`read_jax.convert.llava_hf`: llava-hf's rows above 32000
    are dropped, READ's appended);
  * the converted checkpoint is leaf for leaf the one the same weights give in the original LLaVA-1.5
    layout (liuhaotian's: `model.*`, `model.mm_projector.{0,2}`, CLIP in its own directory), the new rows
    included; transformers' in-memory layout (`model.language_model.*`) gives it too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from read_jax.build import load_model
from read_jax.config import IMAGE_TOKEN_INDEX, ConfigError, ReadConfig
from read_jax.data.tokenizer import ReadTokenizer
from tests.helpers import require_meta_sam, require_torch
from tests.test_convert import ADDED, TOKENIZER_ASSETS, leaves_of, no_output_left, save_shards

ROOT = Path(__file__).resolve().parents[1]
HF_ASSETS = ROOT / "tests" / "assets" / "hf_configs" / "llava_hf"
CFG = ReadConfig.tiny(lora=None)
ATOL = RTOL = 1e-5


def _convert(argv: list[str]) -> None:
    from read_jax.cli import convert as convert_cli

    assert convert_cli.main([*argv, "--no-progress", "--base", "tiny", "--dtype", "fp32", "--debug"]) == 0


def _write_llava_hf_tokenizer(d: Path) -> None:
    """LLaMA's tokenizer.model with llava-hf's added tokens as its repositories ship them."""
    shutil.copyfile(TOKENIZER_ASSETS / "tokenizer.model", d / "tokenizer.model")
    shutil.copyfile(HF_ASSETS / "llava-1.5-7b-hf.added_tokens.json", d / "added_tokens.json")
    decoder = {
        str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False}
        for t, i in json.loads((d / "added_tokens.json").read_text()).items()
    }
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "added_tokens_decoder": decoder,
                "pad_token": "<pad>",
                "padding_side": "left",
                "tokenizer_class": "LlamaTokenizer",
            }
        )
    )


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """(transformers model, {name: directory}) with the llava-hf directory, the same weights in the original
    LLaVA-1.5 layout + a CLIP directory, a tiny SAM .pth, and the llava-hf conversion."""
    torch = require_torch()
    require_meta_sam()
    from safetensors.torch import save_file

    from torchref.llava_hf import hf_llava
    from torchref.read import TorchRead

    root = tmp_path_factory.mktemp("llava_hf")
    hf = hf_llava(CFG)
    d = {k: root / k for k in ("hf", "hf_memory", "llava", "clip")}
    hf.save_pretrained(d["hf"])
    _write_llava_hf_tokenizer(d["hf"])
    # transformers' in-memory names (`model.language_model.*`, `lm_head.weight`, `model.vision_tower.*`).
    shutil.copytree(d["hf"], d["hf_memory"])
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(sd, str(d["hf_memory"] / "model.safetensors"), metadata={"format": "pt"})
    # The same weights as liuhaotian/llava-v1.5-*: LLaMA keys, mm_projector.{0,2}, 32000 rows, CLIP apart.
    llava = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            llava["model." + k[len("model.language_model.") :]] = v
        elif k.startswith("model.multi_modal_projector.linear_"):
            i = {"1": "0", "2": "2"}[k[len("model.multi_modal_projector.linear_")]]
            llava[f"model.mm_projector.{i}.{k.rsplit('.', 1)[1]}"] = v
    llava["lm_head.weight"] = sd["lm_head.weight"]
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        llava[k] = llava[k][:32000]
    d["llava"].mkdir()
    save_shards(torch, llava, d["llava"], 2, "bin", torch.float32)
    hf_cfg = json.loads((d["hf"] / "config.json").read_text())
    text = hf_cfg["text_config"]
    (d["llava"] / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava",
                **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
                **{k: text[k] for k in ("num_attention_heads", "num_key_value_heads", "rms_norm_eps")},
                "max_position_embeddings": text["max_position_embeddings"],
                "vocab_size": 32000,
                "mm_projector_type": "mlp2x_gelu",
                "mm_hidden_size": CFG.clip.hidden_size,
                "mm_vision_select_layer": -2,
            }
        )
    )
    shutil.copyfile(TOKENIZER_ASSETS / "tokenizer.model", d["llava"] / "tokenizer.model")
    d["clip"].mkdir()
    vision = {
        k[len("model.vision_tower.") :]: v for k, v in sd.items() if k.startswith("model.vision_tower.")
    }
    save_file(vision, str(d["clip"] / "model.safetensors"), metadata={"format": "pt"})
    (d["clip"] / "config.json").write_text(json.dumps(hf_cfg["vision_config"]))
    d["sam"] = root / "sam.pth"
    torch.save(TorchRead(CFG, seed=1).visual_model.state_dict(), d["sam"])
    d["out"] = root / "out"
    _convert(["--hf", str(d["hf"]), "--sam", str(d["sam"]), "--out", str(d["out"]), "--resize-vocab"])
    return hf, d


def test_llava_hf_refused_without_resize_vocab_naming_the_collision(src, tmp_path):
    _, d = src
    out = tmp_path / "x"
    with pytest.raises(ConfigError, match=r"<image>=32000, <pad>=32001 .* pass --resize-vocab"):
        _convert(["--hf", str(d["hf"]), "--sam", str(d["sam"]), "--out", str(out)])
    assert no_output_left(out)


def test_llava_hf_forward_matches_transformers_fp32(src):
    import torch

    from torchref.llava_hf import hf_forward

    hf, d = src
    model = load_model(d["out"])
    info = json.loads((d["out"] / "conversion.json").read_text())
    assert info["family"] == "llava_hf"
    # text_hidden_fcs (2 Linear layers) is new in READ: it keeps its init.
    assert len(info["uninitialized"]) == 4 and all(
        p.startswith("text_hidden_fcs/") for p in info["uninitialized"]
    )
    rng = np.random.default_rng(0)
    ids = np.array(
        [
            [1, 319, IMAGE_TOKEN_INDEX, 13, 500, 501, 502, 29889, 9, 10, 2],
            [1, 77, 88, IMAGE_TOKEN_INDEX, 5, 6, 7, 8, 9, 10, 11],
        ],
        np.int32,
    )
    pix = rng.normal(size=(2, 336, 336, 3)).astype(np.float32)
    want_logits, want_hidden = hf_forward(
        hf, ids, torch.from_numpy(pix).permute(0, 3, 1, 2), CFG.clip.num_patches
    )

    @nnx.jit
    def forward(m, ids, pix):
        merged = m.llava.merge(ids, pix)
        out = m.llava.language_model(
            inputs_embeds=merged.inputs_embeds,
            attention_mask=merged.attention_mask,
            positions=merged.positions,
        )
        return out.logits, out.hidden_states

    logits, hidden = forward(model, jnp.asarray(ids), jnp.asarray(pix))
    np.testing.assert_allclose(np.asarray(hidden), want_hidden.numpy(), atol=ATOL, rtol=RTOL)
    # LLaMA's 32000 rows are llava-hf's; 32000-32002 are READ's new rows, not llava-hf's <image>/<pad>.
    np.testing.assert_allclose(
        np.asarray(logits)[..., :32000], want_logits.numpy()[..., :32000], atol=ATOL, rtol=RTOL
    )
    assert np.asarray(logits).shape[-1] == 32003
    emb = np.asarray(model.llava.language_model.model.embed_tokens.embedding[...])
    hf_emb = hf.state_dict()["model.language_model.embed_tokens.weight"].numpy()
    assert not np.isclose(emb[32000:32003], hf_emb[32000:32003]).all(axis=1).any()


def test_llava_hf_tokenizer_gets_reads_tokens(src):
    _, d = src
    tok = d["out"] / "tokenizer"
    assert sorted(p.name for p in tok.iterdir()) == ["added_tokens.json", "tokenizer.model"]
    assert json.loads((tok / "added_tokens.json").read_text()) == ADDED
    t = ReadTokenizer(tok)
    assert t.encode("[SEG]<im_start><im_end>", add_special_tokens=False) == [32000, 32001, 32002]


def test_llava_hf_converts_to_the_checkpoint_of_its_original_llava_layout(src, tmp_path):
    """The same weights from liuhaotian's layout (+ --clip) and from transformers' in-memory names give the
    same leaves as the llava-hf directory, READ's appended rows included (the same seed)."""
    _, d = src
    want = leaves_of(d["out"])
    for name, extra in (("llava", ["--clip", str(d["clip"])]), ("hf_memory", [])):
        out = tmp_path / name
        _convert(["--hf", str(d[name]), "--sam", str(d["sam"]), "--out", str(out), "--resize-vocab", *extra])
        got = leaves_of(out)
        assert sorted(got) == sorted(want), name
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
    rows = want["llava/language_model/model/embed_tokens/embedding"][32000:]
    assert rows.shape == (3, CFG.llama.hidden_size) and 0.01 < rows.std() < 0.03  # N(0, 0.02)


@pytest.mark.parametrize(
    "rel",
    ["llava-1.5-7b-hf.config.json", "llava-1.5-7b-hf.tf4.39.config.json", "llava-1.5-13b-hf.pr5.config.json"],
)
def test_llava_hf_released_configs_convert_to_the_same_checkpoint(src, tmp_path, rel):
    """The published llava-hf config.json files (tests/assets/hf_configs/llava_hf), only their sizes made the
    tiny model's, in place of transformers' save of it: the same leaves as the checkpoint that matches
    transformers' forward."""
    _, d = src
    tiny = json.loads((d["hf"] / "config.json").read_text())
    hf = json.loads((HF_ASSETS / rel).read_text())
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    text_keys += ("num_key_value_heads",)
    vision_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    hf["text_config"].update({k: tiny["text_config"][k] for k in text_keys})
    hf["vision_config"].update({k: tiny["vision_config"][k] for k in vision_keys})
    assert hf["text_config"]["vocab_size"] == tiny["text_config"]["vocab_size"] == 32064
    src_dir = tmp_path / "hf"
    shutil.copytree(d["hf"], src_dir)
    (src_dir / "config.json").write_text(json.dumps(hf))
    out = tmp_path / "out"
    _convert(["--hf", str(src_dir), "--sam", str(d["sam"]), "--out", str(out), "--resize-vocab"])
    got, want = leaves_of(out), leaves_of(d["out"])
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert json.loads((out / "conversion.json").read_text())["family"] == "llava_hf"
