"""convert_weights.py end to end: released READ layouts -> read_jax -> torch parity, round trip, bad input.

The torch references are tiny random-weight models (transformers `LlamaForCausalLM` with the real 32003
vocabulary, `CLIPVisionModel`, Meta's `segment_anything` modules, torch `Sequential` projector and fcs; built
by `torchref.read.TorchRead`). They are saved here in the exact released layout (§10.2-10.3:
`model.embed_tokens.weight`, `model.layers.*`, `model.mm_projector.*`, `model.text_hidden_fcs.0.*`,
`model.visual_model.*`, `lm_head.weight`; multi-shard `.bin` + `pytorch_model.bin.index.json`; bf16
safetensors shards + index; an unmerged-PEFT single `.bin`; CLIP as its own HF directory), converted with the
command (`read_jax.cli.convert.main`, in-process), loaded with `read_jax.build.load_model` onto 8 fake
devices, and compared with the torch forward in fp32 (atol 1e-5).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from read_jax import checkpoint as ck
from read_jax.build import load_model
from read_jax.cli import convert as convert_cli
from read_jax.config import ConfigError, ReadConfig
from read_jax.convert.common import ConversionError
from read_jax.convert.io import CheckpointFileError
from tests.helpers import require_meta_sam, require_torch
from torchref.common import to_np

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_ASSETS = ROOT / "tests" / "assets" / "tokenizer"
ATOL = RTOL = 1e-5
ADDED = {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}
CFG = ReadConfig.tiny()


def read_hf_config(cfg: ReadConfig, **kw) -> dict:
    """A READ config.json as released (§10.3), with the tiny sizes."""
    c = cfg.llama
    out = {
        "_name_or_path": "./runs/read-7b/hf",
        "architectures": ["READForCausalLM"],
        "model_type": "llava",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "vocab_size": 32003,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        # The training-machine path quirk of the releases (§10.3).
        "mm_vision_tower": "../dataset/clip-vit-large-patch14-336",
        "vision_tower": "../dataset/clip-vit-large-patch14-336",
        "mm_hidden_size": cfg.clip.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "square",
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "out_dim": cfg.out_dim,
        "train_mask_decoder": True,
        "use_cache": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0",
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    out.update(kw)
    return out


# The attributes of `read_hf_config` that read_jax does not use (recorded in conversion.json).
UNUSED_IN_READ_HF_CONFIG = [
    "_name_or_path",
    "bos_token_id",
    "eos_token_id",
    "freeze_mm_mlp_adapter",
    "pad_token_id",
    "torch_dtype",
    "train_mask_decoder",
    "transformers_version",
    "tune_mm_mlp_adapter",
    "use_cache",
]


def write_tokenizer(d: Path, added: dict | None = ADDED) -> None:
    if not (TOKENIZER_ASSETS / "tokenizer.model").is_file():
        pytest.skip("tests/assets/tokenizer/tokenizer.model not there yet")
    shutil.copyfile(TOKENIZER_ASSETS / "tokenizer.model", d / "tokenizer.model")
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "legacy": True,
                "model_max_length": 2048,
                "padding_side": "right",
            }
        )
    )
    if added is not None:
        (d / "added_tokens.json").write_text(json.dumps(added))


def save_shards(torch, sd: dict, d: Path, n: int, fmt: str, dtype) -> None:
    """HF `save_pretrained` sharding: `pytorch_model-0000k-of-0000n.bin` or `model-...safetensors` + index."""
    keys = list(sd)
    chunks = [keys[i * len(keys) // n : (i + 1) * len(keys) // n] for i in range(n)]
    wm, total = {}, 0
    for i, ks in enumerate(chunks):
        shard = {k: sd[k].detach().to(dtype).contiguous().clone() for k in ks}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        if fmt == "bin":
            name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            torch.save(shard, d / name)
        else:
            from safetensors.torch import save_file

            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(d / name), metadata={"format": "pt"})
        wm.update(dict.fromkeys(ks, name))
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (d / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=1))


def released_state_dict(ref) -> dict:
    """The torch reference's weights under the released READ key names (§10.2), as torch tensors."""
    sd = dict(ref.llm.state_dict())
    sd.update({"model.mm_projector." + k: v for k, v in ref.mm_projector.state_dict().items()})
    sd.update({"model.text_hidden_fcs." + k: v for k, v in ref.text_hidden_fcs.state_dict().items()})
    sd.update({"model.visual_model." + k: v for k, v in ref.visual_model.state_dict().items()})
    # lm_head last, as in a save_pretrained of READForCausalLM.
    sd["lm_head.weight"] = sd.pop("lm_head.weight")
    return sd


def convert(argv: list[str]) -> None:
    assert convert_cli.main([*argv, "--no-progress", "--base", "tiny", "--debug"]) == 0


def leaves_of(ckpt: Path) -> dict[str, np.ndarray]:
    out = {}
    for part in ck.iter_parts(ckpt):
        out.update(part)
    return out


def no_output_left(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref():
    require_torch()
    require_meta_sam()  # Meta's segment_anything.modeling, importable without torchvision
    from torchref.read import TorchRead

    ref = TorchRead(CFG, seed=0).eval()
    # `randomize_` also overwrites float buffers, RoPE's `inv_freq` included, which no checkpoint carries and
    # every LLaMA recomputes from rope_theta: rebuild the rotary module so torch runs the real RoPE.
    rot = ref.llm.model.rotary_emb
    ref.llm.model.rotary_emb = type(rot)(config=ref.llm.config)
    return ref


@pytest.fixture(scope="module")
def dirs(ref, tmp_path_factory):
    """Source directories in the released layouts, plus one fp32 conversion shared by several tests."""
    import torch

    root = tmp_path_factory.mktemp("convert")
    sd = released_state_dict(ref)
    d = {"root": root}
    # CLIP: its own HF directory (`save_pretrained` of a config-built model works offline).
    d["clip"] = root / "clip"
    ref.clip.save_pretrained(d["clip"])
    # READ as released, but fp32 for parity: 3 .bin shards + index. transformers 4.31 also saved each layer's
    # RoPE `inv_freq` buffer (§10.2), which the converter must drop explicitly.
    d["bin"] = root / "read_bin"
    d["bin"].mkdir()
    (d["bin"] / "config.json").write_text(json.dumps(read_hf_config(CFG)))
    write_tokenizer(d["bin"])
    h = CFG.llama.head_dim
    inv_freq = 1.0 / CFG.llama.rope_theta ** (torch.arange(0, h, 2).float() / h)
    rope = {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq
        for i in range(CFG.llama.num_hidden_layers)
    }
    save_shards(torch, {**sd, **rope}, d["bin"], 3, "bin", torch.float32)
    # bf16 safetensors shards (the dtype of the releases).
    d["st"] = root / "read_st"
    d["st"].mkdir()
    (d["st"] / "config.json").write_text(json.dumps(read_hf_config(CFG)))
    write_tokenizer(d["st"])
    save_shards(torch, sd, d["st"], 2, "safetensors", torch.bfloat16)
    # The fp32 conversion (every other test compares against it or against torch).
    d["out"] = root / "out_fp32"
    convert(["--hf", str(d["bin"]), "--clip", str(d["clip"]), "--out", str(d["out"]), "--dtype", "fp32"])
    return d


@pytest.fixture(scope="module")
def model(dirs):
    """The converted checkpoint restored FSDP-sharded over the 8 fake CPU devices."""
    return load_model(dirs["out"])


# ---- parity -----------------------------------------------------------------------------------------------
@nnx.jit
def _forward(m, ids, pix, feats, h, img, pts, lab, text):
    """Every converted component in one compiled call (eager dispatch over 8 sharded devices is slower)."""
    out = m.llava.language_model(ids, attention_mask=jnp.ones(ids.shape, jnp.int32))
    emb = m.visual_model.image_encoder(img)
    pe = m.visual_model.prompt_encoder
    sparse, dense = pe(pts, lab, text)
    masks, iou = m.visual_model.mask_decoder(emb, pe.get_dense_pe(), sparse, dense, False)
    return {
        "logits": out.logits,
        "hidden": out.hidden_states,
        "clip": m.llava.vision_tower(pix),
        "proj": m.llava.mm_projector(feats),
        "fcs": m.text_hidden_fcs(h),
        "sam_embed": emb,
        "masks": masks,
        "iou": iou,
    }


def test_convert_bin_shards_match_torch_forward(ref, model):
    """LLaMA logits + final hidden, CLIP features, projector, fcs, SAM encoder + decoder on random prompts,
    run on the FSDP-sharded restored model."""
    import torch

    g = torch.Generator().manual_seed(1)
    sam, vm = CFG.sam, ref.visual_model
    ids = torch.randint(0, 32003, (2, 12), generator=g)
    ids[:, 3] = 32000  # the added rows of the 32003-row tables are converted like the others
    pix = torch.randn(1, 3, CFG.clip.image_size, CFG.clip.image_size, generator=g)
    h = torch.randn(5, CFG.llama.hidden_size, generator=g)
    img = torch.randn(1, 3, sam.image_size, sam.image_size, generator=g)
    pts = torch.rand(3, 5, 2, generator=g) * sam.image_size
    lab = torch.tensor([[1, 0, -1, 1, 0]] * 3)
    text = torch.randn(3, 1, sam.prompt_embed_dim, generator=g)

    llm = ref.llm(ids, output_hidden_states=True)
    feats = ref.clip(pix, output_hidden_states=True).hidden_states[CFG.clip.select_layer][:, 1:]
    emb = vm["image_encoder"](img)
    sparse, dense = vm["prompt_encoder"](points=(pts, lab), boxes=None, masks=None)
    masks, iou = vm["mask_decoder"](
        emb, vm["prompt_encoder"].get_dense_pe(), torch.cat([sparse, text], 1), dense, multimask_output=False
    )
    want = {
        "logits": llm.logits,
        "hidden": llm.hidden_states[-1],
        "clip": feats,
        "proj": ref.mm_projector(feats),
        "fcs": ref.text_hidden_fcs[0](h),
        "sam_embed": emb.permute(0, 2, 3, 1),
        "masks": masks,
        "iou": iou,
    }

    nhwc = lambda x: jnp.asarray(to_np(x).transpose(0, 2, 3, 1))
    got = _forward(
        model,
        jnp.asarray(ids.numpy()),
        nhwc(pix),
        jnp.asarray(to_np(feats)),
        jnp.asarray(to_np(h)),
        nhwc(img),
        jnp.asarray(to_np(pts)),
        jnp.asarray(lab.numpy().astype(np.int32)),
        jnp.asarray(to_np(text)),
    )
    for k, v in want.items():
        assert np.abs(to_np(v)).max() > 0.1, k  # not a comparison of near-zero numbers
        np.testing.assert_allclose(np.asarray(got[k]), to_np(v), atol=ATOL, rtol=RTOL, err_msg=k)


def test_convert_loader_restores_sharded_and_records_the_run(dirs, model):
    """Big leaves come back FSDP-sharded over 8 devices; the output holds config, tokenizer, provenance."""
    emb = model.llava.language_model.model.embed_tokens.embedding[...]
    assert len(jax.devices()) == 8 and "fsdp" in str(emb.sharding.spec)
    assert len(emb.sharding.device_set) == 8
    out = dirs["out"]
    assert ck.load_config(out) == CFG.with_dtype("float32")
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == [
        "added_tokens.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    info = json.loads((out / "conversion.json").read_text())
    assert info["family"] == "read" and info["uninitialized"] == [] and info["lora_merged"] == []
    # The released config's bookkeeping and training flags are recorded, not fatal (nothing translated).
    assert info["config_unused_attributes"] == UNUSED_IN_READ_HF_CONFIG
    assert info["config_notes"] == []
    assert "hidden_size" not in info["clip_config_unused_attributes"]
    # Nothing but the RoPE buffers is dropped from a released checkpoint.
    assert info["ignored_keys"] == [
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(CFG.llama.num_hidden_layers)
    ]
    manifest = ck.read_manifest(out)
    state = nnx.state(model, nnx.Not(nnx.RngState))
    paths = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    # The release's LoRA is merged into the stored weights; the loader attaches fresh factors (B = 0) where
    # the
    # config has LoRA, so the model computes exactly the stored weights.
    lora = {p for p in paths if p.endswith(("/lora_a", "/lora_b"))}
    assert len(lora) == 4 * CFG.llama.num_hidden_layers  # q and v of every layer, A and B each
    assert all(not np.asarray(paths[p]).any() for p in lora if p.endswith("/lora_b"))
    assert set(manifest["leaves"]) == set(paths) - lora
    assert all(v["dtype"] == "float32" for v in manifest["leaves"].values())


def test_convert_safetensors_bf16_shards(dirs, tmp_path):
    """bf16 safetensors shards (no torch on this path) -> --dtype bf16: bit-equal to the fp32 run, cast."""
    out = tmp_path / "bf16"
    convert(["--hf", str(dirs["st"]), "--clip", str(dirs["clip"]), "--out", str(out), "--dtype", "bf16"])
    got, want = leaves_of(out), leaves_of(dirs["out"])
    assert set(got) == set(want)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    for k in want:
        # Leaves take the model's dtype: bf16, except SAM's Gaussian PE buffer, which read_jax keeps in fp32.
        assert got[k].dtype == (np.float32 if k.endswith("gaussian_matrix") else bf16), k
        # The converter's transforms only move elements, so rounding to bf16 commutes with them.
        np.testing.assert_array_equal(got[k], want[k].astype(bf16).astype(got[k].dtype), err_msg=k)
    # bf16 round trip: export (BF16 safetensors, the releases' dtype) -> convert gives the same bits.
    hf, again = tmp_path / "hf_bf16", tmp_path / "again"
    assert convert_cli.main(["--export", str(out), "--out", str(hf), "--dtype", "bf16"]) == 0
    convert(["--hf", str(hf), "--clip", str(hf / "vision_tower"), "--out", str(again), "--dtype", "bf16"])
    for k, v in leaves_of(again).items():
        assert v.dtype == got[k].dtype, k
        np.testing.assert_array_equal(v, got[k], err_msg=k)


def test_convert_unmerged_peft_checkpoint(ref, dirs, tmp_path):
    """A PEFT-wrapped dump (`base_model.model.` keys, q/v `lora_A/B.default`, vision tower inside, one
    unindexed .bin) converts to the merged weights: W0 + alpha/r B A == the reference W."""
    import torch

    sd = released_state_dict(ref)
    r, alpha = 4, 16.0
    g = torch.Generator().manual_seed(3)
    peft = {}
    for k, v in sd.items():
        m = k.split(".")
        if len(m) > 4 and m[1] == "layers" and m[4] in ("q_proj", "v_proj"):
            a = torch.randn(r, v.shape[1], generator=g) * 0.1
            b = torch.randn(v.shape[0], r, generator=g) * 0.1
            mod = k[: -len(".weight")]
            peft["base_model.model." + k] = v - (alpha / r) * b @ a
            peft[f"base_model.model.{mod}.lora_A.default.weight"] = a
            peft[f"base_model.model.{mod}.lora_B.default.weight"] = b
        else:
            peft["base_model.model." + k] = v
    for k, v in ref.clip.state_dict().items():  # zero_to_fp32 dumps keep the tower; --clip replaces it
        peft["base_model.model.model.vision_tower.vision_tower.vision_model." + k] = v
    src = tmp_path / "peft"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(read_hf_config(CFG)))
    write_tokenizer(src)
    torch.save({k: v.contiguous().clone() for k, v in peft.items()}, src / "pytorch_model.bin")
    out = tmp_path / "peft_out"
    convert(
        [
            "--hf",
            str(src),
            "--clip",
            str(dirs["clip"]),
            "--out",
            str(out),
            "--dtype",
            "fp32",
            "--lora-alpha",
            str(alpha),
        ]
    )
    got, want = leaves_of(out), leaves_of(dirs["out"])
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=k)
    info = json.loads((out / "conversion.json").read_text())
    assert len(info["lora_merged"]) == 2 * CFG.llama.num_hidden_layers
    assert all(k.startswith("base_model.model.model.vision_tower.") for k in info["ignored_keys"])


HF_CONFIGS = ROOT / "tests" / "assets" / "hf_configs"


def llava_base_config(rel: str, cfg: ReadConfig) -> dict:
    """A LLaVA-1.5 config.json as published (tests/assets/hf_configs) with the tiny sizes; every other
    attribute (4.31's bookkeeping, `mm_use_im_start_end: false`, 'pad', the newer re-saves' extras) as is."""
    hf = json.loads((HF_CONFIGS / rel).read_text())
    c = cfg.llama
    sizes = {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    sizes.update({k: getattr(c, k) for k in ("num_attention_heads", "num_key_value_heads")})
    assert set(sizes) <= set(hf) and hf["vocab_size"] == 32000 and hf["mm_hidden_size"] == 1024
    return {**hf, **sizes, "mm_hidden_size": cfg.clip.hidden_size}


@pytest.mark.parametrize(
    "rel",
    [
        "llava15/llava-v1.5-7b.config.json",
        "llava15/llava-v1.5-13b.config.json",
        "llava15_newer/llava-7b-lora.config.json",
    ],
    ids=["llava-v1.5-7b", "llava-v1.5-13b", "llava-v1.5-7b-resaved"],
)
def test_convert_llava_base_with_sam_pth_resizes_vocab(ref, dirs, tmp_path, rel):
    """From-scratch init from a released LLaVA-1.5 config (vocab 32000, no fcs/SAM, tokenizer without [SEG])
    + Meta's .pth: the same arrays as the READ conversion, which matches the torch forward."""
    import torch

    sd = {
        k: v
        for k, v in released_state_dict(ref).items()
        if not k.startswith(("model.visual_model.", "model.text_hidden_fcs."))
    }
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = sd[k][:32000]
    src = tmp_path / "llava"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(llava_base_config(rel, CFG)))
    write_tokenizer(src, added=None)
    save_shards(torch, sd, src, 2, "bin", torch.float32)
    pth = tmp_path / "sam_tiny.pth"
    torch.save(ref.visual_model.state_dict(), pth)
    out = tmp_path / "init"
    with pytest.raises(ConfigError, match=r"vocab_size 32000.*--resize-vocab"):
        convert(["--hf", str(src), "--clip", str(dirs["clip"]), "--sam", str(pth), "--out", str(out)])
    assert no_output_left(out)
    convert(
        [
            "--hf",
            str(src),
            "--clip",
            str(dirs["clip"]),
            "--sam",
            str(pth),
            "--out",
            str(out),
            "--dtype",
            "fp32",
            "--resize-vocab",
        ]
    )
    got, want = leaves_of(out), leaves_of(dirs["out"])
    # The LLaMA as the file says (its 4096 positions) on the tiny sizes.
    assert ck.load_config(out).llama == dataclasses.replace(CFG.llama, max_position_embeddings=4096)
    info = json.loads((out / "conversion.json").read_text())
    assert info["uninitialized"] == sorted(k for k in want if k.startswith("text_hidden_fcs/"))
    assert json.loads((out / "tokenizer" / "added_tokens.json").read_text()) == ADDED
    for k in got:
        if k.endswith(("embed_tokens/embedding", "lm_head/kernel")):
            rows = got[k] if k.endswith("embedding") else got[k].T
            wrows = want[k] if k.endswith("embedding") else want[k].T
            np.testing.assert_array_equal(rows[:32000], wrows[:32000])
            assert rows.shape[0] == 32003 and 0.01 < rows[32000:].std() < 0.03  # N(0, 0.02)
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # Such a checkpoint is not a READ checkpoint yet: exporting it is refused.
    with pytest.raises(ConversionError, match="left to their init"):
        convert_cli.main(["--export", str(out), "--out", str(tmp_path / "hf"), "--debug"])
    assert no_output_left(tmp_path / "hf")
    # The loader fills the fcs from the model's own init (allowed by the manifest), sharded like the rest.
    m = load_model(out)
    assert m.text_hidden_fcs.layers[0].kernel[...].shape == (CFG.llama.hidden_size,) * 2


# ---- export and round trip ---------------------------------------------------------------------------------
def test_convert_export_round_trip(ref, dirs, tmp_path):
    """convert -> export (HF READ layout, safetensors) -> convert gives identical arrays, and the export loads
    into the torch reference modules under the released key names (strict)."""
    from safetensors.torch import load_file

    hf = tmp_path / "hf"
    assert convert_cli.main(["--export", str(dirs["out"]), "--out", str(hf), "--dtype", "fp32"]) == 0
    files = sorted(p.name for p in hf.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.model" in files
    sd = load_file(str(hf / "model.safetensors"))
    assert set(sd) == set(released_state_dict(ref))
    llm = {
        k: v
        for k, v in sd.items()
        if k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.")) or k == "lm_head.weight"
    }
    ref.llm.load_state_dict(llm, strict=True)
    ref.visual_model.load_state_dict(
        {k[len("model.visual_model.") :]: v for k, v in sd.items() if k.startswith("model.visual_model.")},
        strict=True,
    )
    ref.text_hidden_fcs.load_state_dict(
        {
            k[len("model.text_hidden_fcs.") :]: v
            for k, v in sd.items()
            if k.startswith("model.text_hidden_fcs.")
        },
        strict=True,
    )
    import transformers

    clip = transformers.CLIPVisionModel.from_pretrained(hf / "vision_tower")
    for k, v in ref.clip.state_dict().items():
        np.testing.assert_array_equal(to_np(clip.state_dict()[k]), to_np(v), err_msg=k)
    again = tmp_path / "again"
    convert(["--hf", str(hf), "--clip", str(hf / "vision_tower"), "--out", str(again), "--dtype", "fp32"])
    got, want = leaves_of(again), leaves_of(dirs["out"])
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_convert_sesame_release_prompts_with_seg_alone_and_exports_as_sesame(dirs, tmp_path):
    """SESAME (`SESAMEForCausalLM`, READ-7B's starting point) was trained with the [SEG] prompt alone: the
    same release converted as SESAME has SasP off and is otherwise READ's, leaf for leaf; a SasP-off model
    exports under SESAME's class name, which converts back to SasP off."""
    from read_jax.convert.export import hf_config_dict

    src = tmp_path / "sesame"
    shutil.copytree(dirs["bin"], src)
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "architectures": ["SESAMEForCausalLM"]}))
    out = tmp_path / "out"
    convert(["--hf", str(src), "--clip", str(dirs["clip"]), "--out", str(out), "--dtype", "fp32"])
    sesame, read = ck.load_config(out), ck.load_config(dirs["out"])
    assert read.sasp.enabled and not sesame.sasp.enabled
    assert sesame.replace(sasp=read.sasp) == read
    got, want = leaves_of(out), leaves_of(dirs["out"])
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert hf_config_dict(sesame, None, "float32")["architectures"] == ["SESAMEForCausalLM"]
    assert hf_config_dict(read, None, "float32")["architectures"] == ["READForCausalLM"]


def test_convert_export_lora_merged_and_peft(dirs, tmp_path):
    """A model carrying LoRA exports either merged (== lora.merge_lora) or as PEFT keys that convert back to
    the same merged weights."""
    from read_jax.convert.export import export_model
    from read_jax.lora import apply_lora, merge_lora
    from read_jax.read_model import ReadModel

    cfg = ck.load_config(dirs["out"])

    def with_lora():
        m = ReadModel(cfg, rngs=nnx.Rngs(0))
        apply_lora(m, cfg.lora, rngs=nnx.Rngs(1))
        return m

    m = ck.restore_model(dirs["out"], with_lora)
    for _, lin in nnx.iter_graph(m):
        if getattr(lin, "has_lora", False):  # B starts at zero: give the branch a value
            lin.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(2), lin.lora_b[...].shape)
    merged_dir, peft_dir = tmp_path / "merged", tmp_path / "peft"
    tok = dirs["out"] / "tokenizer"
    export_model(m, cfg, merged_dir, merge_lora=True, dtype="float32", tokenizer_dir=tok)
    export_model(m, cfg, peft_dir, merge_lora=False, dtype="float32", tokenizer_dir=tok)
    from safetensors.numpy import load_file

    peft = load_file(str(peft_dir / "model.safetensors"))
    assert sum(".lora_A.default.weight" in k for k in peft) == 2 * cfg.llama.num_hidden_layers
    assert all(k.startswith("base_model.model.") for k in peft)
    merge_lora(m)
    q = np.asarray(m.llava.language_model.model.layers[0].self_attn.q_proj.kernel[...])
    merged = load_file(str(merged_dir / "model.safetensors"))
    assert not any("lora" in k for k in merged)
    np.testing.assert_allclose(merged["model.layers.0.self_attn.q_proj.weight"], q.T, atol=1e-6)
    # The PEFT export converts back (LoRA folded in on the fly) to the model merged by read_jax.lora.
    back = tmp_path / "back"
    convert(
        [
            "--hf",
            str(peft_dir),
            "--clip",
            str(peft_dir / "vision_tower"),
            "--out",
            str(back),
            "--dtype",
            "fp32",
        ]
    )
    got = leaves_of(back)
    want = {
        "/".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(m, nnx.Not(nnx.RngState)))
    }
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=k)


# ---- bad input: one clear error naming the key or file, and no output directory ----------------------------
@pytest.fixture
def bad(dirs, tmp_path):
    """A writable copy of the fp32 .bin directory (shards hard-linked until a test rewrites them)."""
    d = tmp_path / "bad"
    d.mkdir()
    for f in dirs["bin"].iterdir():
        os.link(f, d / f.name) if f.suffix == ".bin" else shutil.copyfile(f, d / f.name)
    return d


def _rewrite_shard(d: Path, name: str, edit) -> None:
    import torch

    sd = torch.load(d / name, weights_only=True)
    edit(sd)
    (d / name).unlink()  # break the hard link before writing
    torch.save(sd, d / name)
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
    index["weight_map"].update(dict.fromkeys(sd, name))
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _convert_fails(d: Path, clip: Path, exc, match: str) -> None:
    out = d.parent / "out"
    with pytest.raises(exc, match=match):
        convert(["--hf", str(d), "--clip", str(clip), "--out", str(out), "--dtype", "fp32"])
    assert no_output_left(out)


def test_convert_rejects_missing_shard(bad, dirs):
    (bad / "pytorch_model-00002-of-00003.bin").unlink()
    _convert_fails(bad, dirs["clip"], CheckpointFileError, r"missing .*pytorch_model-00002-of-00003\.bin")


def test_convert_rejects_truncated_shard(bad, dirs):
    f = bad / "pytorch_model-00003-of-00003.bin"
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data[: len(data) // 2])
    _convert_fails(bad, dirs["clip"], CheckpointFileError, r"pytorch_model-00003-of-00003\.bin.*truncated")


def test_convert_rejects_wrong_shape(bad, dirs):
    import torch

    key = "model.layers.1.mlp.up_proj.weight"
    name = json.loads((bad / "pytorch_model.bin.index.json").read_text())["weight_map"][key]
    _rewrite_shard(bad, name, lambda sd: sd.__setitem__(key, torch.zeros(7, CFG.llama.hidden_size)))
    _convert_fails(
        bad,
        dirs["clip"],
        ConversionError,
        re.escape(key) + r" -> llava/language_model/model/layers/1/mlp/up_proj/kernel: "
        r"shape \(64, 7\) != expected \(64, 128\) \(in pytorch_model-0000\d-of-00003\.bin\)",
    )


def test_convert_rejects_unknown_key(bad, dirs):
    import torch

    _rewrite_shard(
        bad,
        "pytorch_model-00001-of-00003.bin",
        lambda sd: sd.__setitem__("model.sasp_head.weight", torch.zeros(3)),
    )
    _convert_fails(bad, dirs["clip"], ConversionError, r"match no rule[\s\S]*model\.sasp_head\.weight")


def test_convert_rejects_missing_key(bad, dirs):
    name = json.loads((bad / "pytorch_model.bin.index.json").read_text())["weight_map"]["model.norm.weight"]
    _rewrite_shard(bad, name, lambda sd: sd.pop("model.norm.weight"))
    _convert_fails(
        bad, dirs["clip"], ConversionError, r"no source key[\s\S]*llava/language_model/model/norm/scale"
    )


def test_convert_rejects_vocab_32000(bad, dirs):
    (bad / "config.json").write_text(json.dumps(read_hf_config(CFG, vocab_size=32000)))
    _convert_fails(bad, dirs["clip"], ConfigError, r"config\.json: vocab_size 32000.*--resize-vocab")


def test_convert_rejects_seg_token_not_32000(bad, dirs):
    (bad / "added_tokens.json").write_text(
        json.dumps({"<im_start>": 32000, "[SEG]": 32001, "<im_end>": 32002})
    )
    _convert_fails(
        bad, dirs["clip"], ConfigError, r"added_tokens\.json: \[SEG\] has id 32001, READ needs 32000"
    )


def test_convert_refuses_llava_v1_projectors_outside_lisa(bad, dirs):
    """A LLaVA-v1 base (single-Linear projector, no mm_projector_type) is refused before reading tensors; a
    LISA config that says so (LISA's own code) must come with the Linear's keys, not mlp2x_gelu's."""
    hf = read_hf_config(CFG, architectures=["LlavaLlamaForCausalLM"])
    hf.pop("mm_projector_type")
    (bad / "config.json").write_text(json.dumps(hf))
    _convert_fails(bad, dirs["clip"], ConfigError, r"LLaVA-v1 style checkpoint .*mlp2x_gelu")
    (bad / "config.json").write_text(json.dumps({**hf, "architectures": ["LISAForCausalLM"]}))
    _convert_fails(bad, dirs["clip"], ConversionError, r"model\.mm_projector\.0\.weight")


def test_convert_strict_refuses_unused_config_attributes(bad, dirs):
    """--strict reaches the converter: the attributes read_jax does not use become an error naming them."""
    out = bad.parent / "out"
    with pytest.raises(
        ConfigError, match=re.escape(f"does not use (strict mode): {UNUSED_IN_READ_HF_CONFIG}")
    ):
        convert(["--hf", str(bad), "--clip", str(dirs["clip"]), "--out", str(out), "--strict"])
    assert no_output_left(out)


def test_convert_logs_unused_config_attributes_on_one_line(bad, dirs, monkeypatch):
    """A config.json from a newer release converts: its extra attributes are logged once, on one line."""
    from read_jax.convert import read as read_mod

    hf = {**read_hf_config(CFG), "pretrain_mm_mlp_adapter": None, "attention_dropout": 0.0}
    (bad / "config.json").write_text(json.dumps({**hf, "mm_use_im_start_end": False}))

    def stop(model_fn):  # the checks are done by then; skip building the target model
        raise RuntimeError("stop after the input checks")

    monkeypatch.setattr(read_mod, "target_leaves", stop)
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="stop after the input checks"):
        read_mod.convert_read_checkpoint(
            bad, bad.parent / "out", clip_dir=dirs["clip"], base="tiny", progress=False, log=lines.append
        )
    warnings = [line for line in lines if line.startswith("warning")]
    want = sorted([*UNUSED_IN_READ_HF_CONFIG, "pretrain_mm_mlp_adapter"])
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(
        "warning: attributes read_jax does not use (recorded in conversion.json; --strict refuses them): "
        f"config.json {want}"
    )
    assert warnings[0].endswith("; mm_use_im_start_end=False accepted")


def test_convert_requires_clip_for_released_checkpoints(bad):
    """No --clip: the missing vision tower is named, with the §10.3 path quirk explained."""
    out = bad.parent / "out"
    with pytest.raises(ConversionError, match=r"llava/vision_tower/[\s\S]*pass --clip"):
        convert(["--hf", str(bad), "--out", str(out)])
    assert no_output_left(out)


def test_convert_weights_help_subprocess():
    """The script runs as a command (one subprocess; everything else calls main() in-process)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "convert_weights.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    for flag in (
        "--hf",
        "--clip",
        "--sam",
        "--dtype",
        "--resize-vocab",
        "--export",
        "--merge-lora",
        "--strict",
    ):
        assert flag in r.stdout
