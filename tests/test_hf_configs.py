"""The config policy against the config.json / tokenizer files real checkpoints carry.

Inputs are the published files in tests/assets/hf_configs (provenance in its SOURCES.md), not configs
written from the spec: LLaVA-1.5 as released by liuhaotian (transformers 4.31) and as re-saved by a newer
LLaVA / transformers, LISA releases on LLaVA-1.5 (the READ/SESAME layout, with the `pretrain_mm_mlp_adapter`
that `save_pretrained` writes), a LISA-v1 derivative, llava-hf configs, CLIP directories, and the SESAME,
LISA and llava-hf added tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from read_jax.config import (
    ConfigError,
    audit_hf_config,
    from_hf_config,
    hf_architecture,
)
from read_jax.convert.read import (
    SEG_TOKENS,
    build_config,
    check_tokenizer,
    clip_config_from_hf,
    clip_config_unused,
    family_of,
)

ROOT = Path(__file__).resolve().parents[1]
HF = ROOT / "tests" / "assets" / "hf_configs"
SP_MODEL = ROOT / "tests" / "assets" / "tokenizer" / "tokenizer.model"

LLAVA_7B = "llava15/llava-v1.5-7b.config.json"
LLAVA_13B = "llava15/llava-v1.5-13b.config.json"
LLAVA_7B_NEWER = "llava15_newer/llava-7b-lora.config.json"
LISA_7B = "lisa/LISA-AVS.config.json"
LISA_13B = "lisa/PliersModel-13B.config.json"
LISA_V1 = "lisa_v1/LISA-7B-feedback.config.json"
LLAVA_HF_7B = "llava_hf/llava-1.5-7b-hf.config.json"
LLAVA_HF_7B_TF439 = "llava_hf/llava-1.5-7b-hf.tf4.39.config.json"  # re-saved by transformers 4.39.3
LLAVA_HF_13B = "llava_hf/llava-1.5-13b-hf.pr5.config.json"
CLIP_336 = "clip/clip-vit-large-patch14-336.config.json"  # CLIPModel
CLIP_336_VISION = "clip/transcore-m-visual_encoder.config.json"  # CLIPVisionModel, transformers 4.31
CLIP_224_VISION = "clip/clip-vit-large-patch14-vision.config.json"  # the tower LISA uses


def load(rel: str) -> dict:
    return json.loads((HF / rel).read_text())


def clip_dir(tmp_path: Path, rel: str) -> Path:
    d = tmp_path / Path(rel).stem
    d.mkdir(parents=True)
    shutil.copyfile(HF / rel, d / "config.json")
    return d


# What every released LLaVA-1.5 config (transformers 4.31) carries that read_jax does not use.
LLAVA_UNUSED = [
    "_name_or_path",
    "bos_token_id",
    "eos_token_id",
    "freeze_mm_mlp_adapter",
    "freeze_mm_vision_resampler",
    "max_length",
    "pad_token_id",
    "torch_dtype",
    "transformers_version",
    "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "use_cache",
    "use_mm_proj",
]
# (hidden, intermediate, layers, heads, kv heads, vocab as the file says), and the unused attributes.
SUPPORTED = {
    LLAVA_7B: ((4096, 11008, 32, 32, 32, 32000), LLAVA_UNUSED),
    LLAVA_13B: ((5120, 13824, 40, 40, 40, 32000), LLAVA_UNUSED),
    LLAVA_7B_NEWER: (
        (4096, 11008, 32, 32, 32, 32000),
        sorted([*LLAVA_UNUSED, "mm_projector_lr", "tokenizer_model_max_length", "tokenizer_padding_side"]),
    ),
    LISA_7B: (
        (4096, 11008, 32, 32, 32, 32003),
        sorted([*LLAVA_UNUSED, "image_grid_pinpoints", "pretrain_mm_mlp_adapter", "train_mask_decoder"]),
    ),
    LISA_13B: (
        (5120, 13824, 40, 40, 40, 32003),
        sorted([*LLAVA_UNUSED, "image_grid_pinpoints", "pretrain_mm_mlp_adapter", "train_mask_decoder"]),
    ),
}


# ---- the configs read_jax reads ----------------------------------------------------------------------------
@pytest.mark.parametrize("rel", list(SUPPORTED))
def test_real_config_maps_to_its_sizes(rel):
    sizes, _ = SUPPORTED[rel]
    c = from_hf_config(load(rel))
    got = (
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
    )
    assert got == sizes
    assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings, c.initializer_range) == (
        1e-5,
        10000.0,
        4096,
        0.02,
    )


@pytest.mark.parametrize("rel", list(SUPPORTED))
def test_real_config_records_exactly_what_it_does_not_use(rel):
    hf = load(rel)
    _, unused = SUPPORTED[rel]
    assert list(audit_hf_config(hf).unused) == unused
    with pytest.raises(ConfigError) as e:
        from_hf_config(hf, strict=True)
    assert f"does not use (strict mode): {unused}" in str(e.value)


def test_llava_base_mm_use_im_start_end_false_is_accepted_and_recorded():
    """The released LLaVA-1.5 says False (READ flips it in memory) and 'pad' (READ forces 'square')."""
    for rel in (LLAVA_7B, LLAVA_13B, LLAVA_7B_NEWER):
        hf = load(rel)
        assert (hf["mm_use_im_start_end"], hf["image_aspect_ratio"]) == (False, "pad")
        notes = audit_hf_config(hf).notes
        assert [n.split(":")[0] for n in notes] == ["mm_use_im_start_end=False", "image_aspect_ratio='pad'"]
    assert audit_hf_config(load(LISA_7B)).notes == ()  # mm_use_im_start_end true, 'square'


def test_llava_base_build_config_7b_with_resize_vocab(tmp_path):
    for rel in (LLAVA_7B, LLAVA_7B_NEWER):
        hf = load(rel)
        with pytest.raises(ConfigError, match=r"vocab_size 32000 .*--resize-vocab"):
            build_config(hf, clip_dir=None, base="auto", dtype="bfloat16", resize_vocab=False)
        cfg = build_config(
            hf,
            clip_dir=clip_dir(tmp_path / rel.split("/")[0], CLIP_336),
            base="auto",
            dtype="bfloat16",
            resize_vocab=True,
        )
        c = cfg.llama
        assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == (
            4096,
            32,
            11008,
            32003,
        )
        clip = cfg.clip
        assert (clip.hidden_size, clip.num_hidden_layers, clip.image_size, clip.patch_size) == (
            1024,
            24,
            336,
            14,
        )
        assert (clip.select_layer, clip.hidden_act, clip.num_patches) == (-2, "quick_gelu", 576)
        assert (cfg.sasp.grid_size, cfg.lora.r) == (12, 8)  # read_7b chosen by hidden size


def test_llava_base_build_config_13b_takes_the_13b_preset(tmp_path):
    """READ-13B's recipe starts from the released LLaVA-1.5-13B: its sizes choose read_13b (full CLIP grid
    for SasP, LoRA r 64), the vocabulary is resized to READ's 32003."""
    hf = load(LLAVA_13B)
    with pytest.raises(ConfigError, match=r"vocab_size 32000 .*--resize-vocab"):
        build_config(hf, clip_dir=None, base="auto", dtype="bfloat16", resize_vocab=False)
    cfg = build_config(
        hf, clip_dir=clip_dir(tmp_path, CLIP_336), base="auto", dtype="bfloat16", resize_vocab=True
    )
    c = cfg.llama
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == (5120, 40, 13824, 32003)
    assert (cfg.clip.image_size, cfg.clip.num_patches, cfg.mm_projector_type) == (336, 576, "mlp2x_gelu")
    assert (cfg.sasp.grid_size, cfg.sasp.num_points, cfg.lora.r) == (24, 60, 64)


def test_lisa_release_build_config_checks_its_224_pixel_tower(tmp_path):
    """LISA's config names openai/clip-vit-large-patch14 (224 px): a 336 --clip is refused, a 224 one used."""
    hf = load(LISA_7B)
    with pytest.raises(ConfigError) as e:
        build_config(
            hf, clip_dir=clip_dir(tmp_path, CLIP_336), base="auto", dtype="bfloat16", resize_vocab=False
        )
    msg = str(e.value)
    assert (
        "mm_vision_tower='openai/clip-vit-large-patch14' names a CLIP with 14-pixel patches at 224 px" in msg
    )
    assert "vision_tower='openai/clip-vit-large-patch14'" in msg and "14-pixel patches at 336 px" in msg
    cfg = build_config(
        hf, clip_dir=clip_dir(tmp_path, CLIP_224_VISION), base="auto", dtype="bfloat16", resize_vocab=False
    )
    assert (cfg.llama.hidden_size, cfg.llama.num_hidden_layers, cfg.llama.vocab_size) == (4096, 32, 32003)
    assert (cfg.clip.image_size, cfg.clip.num_patches, cfg.out_dim) == (224, 256, 256)
    # Its projector and ids as the file says; SAM prompted as LISA was trained (SasP off), the SasP grid
    # READ-7B's 24 -> 12 downsampling on the 16 x 16 tower.
    assert (cfg.mm_projector_type, cfg.seg_token_id, cfg.im_start_token_id, cfg.im_end_token_id) == (
        "mlp2x_gelu",
        32000,
        32001,
        32002,
    )
    assert (cfg.sasp.enabled, cfg.sasp.grid_size, cfg.sasp.num_points) == (False, 8, 30)


def test_lisa_13b_release_sizes_and_the_sasp_grid_on_its_tower(tmp_path):
    hf = load(LISA_13B)
    c = from_hf_config(hf)
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == (5120, 40, 13824, 32003)
    # READ-13B's SasP uses the full 24 x 24 CLIP grid; on LISA-13B's 16 x 16 tower that is 16 x 16.
    cfg = build_config(
        hf, clip_dir=clip_dir(tmp_path, CLIP_224_VISION), base="auto", dtype="bfloat16", resize_vocab=False
    )
    assert (cfg.clip.grid_size, cfg.sasp.grid_size, cfg.sasp.num_points, cfg.sasp.t_pos) == (16, 16, 60, 0.6)
    assert cfg.lora.r == 64  # read_13b chosen by hidden size


def test_build_config_strict_refuses_unused_attributes(tmp_path):
    hf = load(LISA_7B)
    with pytest.raises(ConfigError, match=r"pretrain_mm_mlp_adapter"):
        build_config(
            hf,
            clip_dir=clip_dir(tmp_path, CLIP_224_VISION),
            base="auto",
            dtype="bfloat16",
            resize_vocab=False,
            strict=True,
        )


# ---- LLaVA-v1 style projectors: LISA's own, refused elsewhere on one line ----------------------------------
def test_llava_v1_projector_refused_outside_lisa_on_one_line():
    """LISA-7B-v1's config with another architecture: a LLaVA-v1 base, whose projector READ does not have."""
    hf = {**load(LISA_V1), "architectures": ["LlavaLlamaForCausalLM"]}
    for call in (
        lambda: family_of(hf),
        lambda: build_config(hf, clip_dir=None, base="auto", dtype="bfloat16", resize_vocab=True),
    ):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "mm_projector_type" in msg and "LlavaLlamaForCausalLM" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"mm_projector_type absent \(LLaVA's default is a single Linear"):
        from_hf_config(hf)
    with pytest.raises(ConfigError, match="architecture 'MistralForCausalLM' is not supported"):
        hf_architecture({"architectures": ["MistralForCausalLM"]})


def test_lisa_v1_config_is_read_with_its_linear_projector_and_vocabulary(tmp_path):
    """LISA-7B-v1's layout (a fine-tune's config.json): LLaMA-1 sizes, no mm_projector_type (LLaVA-v1's
    Linear), 32004 rows with [SEG]=32003, CLIP at 224 px."""
    hf = load(LISA_V1)
    assert "mm_projector_type" not in hf
    c = from_hf_config(hf)
    assert (c.vocab_size, c.rms_norm_eps, c.max_position_embeddings) == (32004, 1e-6, 2048)
    assert audit_hf_config(hf).unused == (
        "_name_or_path",
        "bos_token_id",
        "eos_token_id",
        "freeze_mm_mlp_adapter",
        "image_grid_pinpoints",
        "max_sequence_length",
        "pad_token_id",
        "pretrain_mm_mlp_adapter",
        "torch_dtype",
        "train_mask_decoder",
        "transformers_version",
        "tune_mm_mlp_adapter",
        "use_cache",
        "use_mm_proj",
    )
    cfg = build_config(
        hf, clip_dir=clip_dir(tmp_path, CLIP_224_VISION), base="auto", dtype="bfloat16", resize_vocab=False
    )
    assert (cfg.mm_projector_type, cfg.llama.vocab_size, cfg.clip.num_patches) == ("linear", 32004, 256)
    assert (cfg.seg_token_id, cfg.im_start_token_id, cfg.im_end_token_id) == (32003, 32001, 32002)
    assert not cfg.sasp.enabled
    with pytest.raises(ConfigError, match=r"vocab_size 32005: LISA releases have 32003 .* or 32004"):
        build_config(
            {**hf, "vocab_size": 32005}, clip_dir=None, base="auto", dtype="bfloat16", resize_vocab=False
        )
    with pytest.raises(ConfigError, match="mm_projector_type='mlp3x_gelu'"):
        from_hf_config({**hf, "mm_projector_type": "mlp3x_gelu"})


# ---- llava-hf ----------------------------------------------------------------------------------------------
LLAVA_HF_UNUSED = [
    "ignore_index",
    "pad_token_id",
    "text_config._name_or_path",
    "text_config.torch_dtype",
    "torch_dtype",
    "transformers_version",
    "vision_config.projection_dim",
    "vision_config.vocab_size",
]


# transformers 4.39 no longer writes the top-level vocab_size / torch_dtype, and writes use_cache.
LLAVA_HF_UNUSED_TF439 = [
    "_name_or_path",
    "ignore_index",
    "pad_token_id",
    "text_config._name_or_path",
    "text_config.torch_dtype",
    "transformers_version",
    "use_cache",
    "vision_config.projection_dim",
    "vision_config.vocab_size",
]


@pytest.mark.parametrize(
    "rel, sizes, unused",
    [
        (LLAVA_HF_7B, (4096, 11008, 32, 32, 32064), LLAVA_HF_UNUSED),
        (LLAVA_HF_7B_TF439, (4096, 11008, 32, 32, 32064), LLAVA_HF_UNUSED_TF439),
        (LLAVA_HF_13B, (5120, 13824, 40, 40, 32064), LLAVA_HF_UNUSED),
    ],
)
def test_llava_hf_configs_are_read_from_text_and_vision_config(rel, sizes, unused, tmp_path):
    hf = load(rel)
    c = from_hf_config(hf)
    assert (
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.vocab_size,
    ) == sizes
    assert (c.rms_norm_eps, c.max_position_embeddings, c.num_key_value_heads) == (1e-5, 4096, sizes[3])
    assert list(audit_hf_config(hf).unused) == unused
    assert family_of(hf) == "llava_hf"
    with pytest.raises(ConfigError, match=r"llava-hf vocabulary of 32064 rows .*--resize-vocab"):
        build_config(hf, clip_dir=None, base="auto", dtype="bfloat16", resize_vocab=False)
    cfg = build_config(hf, clip_dir=None, base="auto", dtype="bfloat16", resize_vocab=True)
    clip = cfg.clip  # from its own vision_config: the checkpoint carries the tower
    assert (clip.hidden_size, clip.num_hidden_layers, clip.image_size, clip.patch_size) == (1024, 24, 336, 14)
    assert (clip.select_layer, cfg.llama.vocab_size, cfg.seg_token_id, cfg.mm_projector_type) == (
        -2,
        32003,
        32000,
        "mlp2x_gelu",
    )
    assert cfg.sasp.enabled and cfg.sasp.grid_size == (12 if sizes[0] == 4096 else 24)


@pytest.mark.parametrize(
    "where, attr, value",
    [
        ("", "projector_hidden_act", "gelu_new"),
        ("", "vision_feature_select_strategy", "full"),
        ("", "vision_feature_layer", [-2, -5]),
        ("", "multimodal_projector_bias", False),
        ("", "image_token_index", 2),
        ("text_config", "rope_scaling", {"type": "linear", "factor": 2.0}),
        ("text_config", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
        ("vision_config", "hidden_act", "gelu_new"),
    ],
)
def test_llava_hf_unsupported_values_are_named(where, attr, value):
    hf = load(LLAVA_HF_7B)
    if where:
        hf = {**hf, where: {**hf[where], attr: value}}
    else:
        hf = {**hf, attr: value}
    with pytest.raises(ConfigError) as e:
        from_hf_config(hf)
    assert f"{where + '.' if where else ''}{attr}={value!r}" in str(e.value)


def test_transformers_5_rope_parameters_are_mapped():
    hf = load(LLAVA_HF_7B)
    text = {**hf["text_config"], "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    assert from_hf_config({**hf, "text_config": text}).rope_theta == 500000.0
    with pytest.raises(ConfigError, match=r"disagrees with rope_theta=10000\.0"):
        from_hf_config({**load(LLAVA_7B), "rope_parameters": {"rope_theta": 5e5}, "rope_theta": 10000.0})


# ---- values read_jax cannot honour, on a real config: named with their value -------------------------------
@pytest.mark.parametrize(
    "attr, value",
    [
        ("mm_projector_type", "linear"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("tie_word_embeddings", True),
        ("hidden_act", "gelu"),
        ("mm_vision_select_feature", "cls_patch"),
        ("mm_vision_select_layer", 3),
        ("num_key_value_heads", 5),
        ("num_key_value_heads", 64),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("attention_dropout", 0.1),
        ("pretraining_tp", 2),
        ("head_dim", 64),
        ("mm_use_im_patch_token", True),
        ("mm_patch_merge_type", "spatial_unpad"),
        ("mm_resampler_type", "perceiver"),
        ("image_aspect_ratio", "anyres"),
        ("model_type", "mistral"),
    ],
)
def test_unsupported_value_is_named_with_its_value(attr, value):
    with pytest.raises(ConfigError) as e:
        from_hf_config({**load(LLAVA_7B_NEWER), attr: value})
    assert f"{attr}={value!r} (read_jax implements" in str(e.value)


def test_gqa_kv_heads_are_mapped():
    c = from_hf_config({**load(LLAVA_7B), "num_key_value_heads": 8})
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 128)


def test_select_layer_outside_the_clip_tower_is_named(tmp_path):
    hf = {**load(LLAVA_7B), "mm_vision_select_layer": -30}
    with pytest.raises(ConfigError, match=r"mm_vision_select_layer=-30 is outside the 24-layer CLIP tower"):
        build_config(
            hf, clip_dir=clip_dir(tmp_path, CLIP_336), base="auto", dtype="bfloat16", resize_vocab=True
        )
    cfg = build_config(
        {**hf, "mm_vision_select_layer": -1}, clip_dir=None, base="auto", dtype="bfloat16", resize_vocab=True
    )
    assert cfg.clip.select_layer == -1  # taken from config.json also without --clip


def test_unfrozen_vision_tower_refused_with_clip(tmp_path):
    hf = {**load(LLAVA_7B), "unfreeze_mm_vision_tower": True}
    with pytest.raises(
        ConfigError, match=r"unfreeze_mm_vision_tower=True: the checkpoint's CLIP was fine-tuned"
    ):
        build_config(
            hf, clip_dir=clip_dir(tmp_path, CLIP_336), base="auto", dtype="bfloat16", resize_vocab=True
        )
    assert (
        build_config(hf, clip_dir=None, base="auto", dtype="bfloat16", resize_vocab=True).clip.image_size
        == 336
    )


def test_absent_attributes_take_transformers_defaults():
    """An absent attribute means transformers' LlamaConfig default, e.g. rms_norm_eps 1e-6, not LLaMA-2's."""
    hf = {k: v for k, v in load(LLAVA_7B).items() if k not in ("rms_norm_eps", "max_position_embeddings")}
    c = from_hf_config(hf)
    assert (c.rms_norm_eps, c.max_position_embeddings) == (1e-6, 2048)


def test_issue_acceptance_check():
    base = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_scaling": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_hidden_size": 1024,
        "pretrain_mm_mlp_adapter": None,
        "a_bookkeeping_attribute_from_a_future_release": 7,
        "torch_dtype": "float16",
    }
    assert from_hf_config(dict(base)).hidden_size == 4096
    assert audit_hf_config(base).unused == (
        "a_bookkeeping_attribute_from_a_future_release",
        "pretrain_mm_mlp_adapter",
        "torch_dtype",
    )
    for attr, value in {
        "mm_projector_type": "linear",
        "tie_word_embeddings": True,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }.items():
        with pytest.raises(ConfigError, match=attr):
            from_hf_config({**base, attr: value})


# ---- CLIP directories --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rel, size, unused",
    [
        (CLIP_336, 336, ["projection_dim"]),
        (
            CLIP_336_VISION,
            336,
            [
                "_name_or_path",
                "initializer_factor",
                "initializer_range",
                "projection_dim",
                "transformers_version",
            ],
        ),
        (
            CLIP_224_VISION,
            224,
            [
                "_name_or_path",
                "architectures",
                "initializer_factor",
                "initializer_range",
                "projection_dim",
                "torch_dtype",
                "transformers_version",
            ],
        ),
    ],
)
def test_real_clip_configs(rel, size, unused, tmp_path):
    d = clip_dir(tmp_path, rel)
    c = clip_config_from_hf(d, select_layer=-2, dtype="float32")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (
        1024,
        4096,
        24,
        16,
    )
    assert (c.image_size, c.patch_size, c.layer_norm_eps, c.hidden_act) == (size, 14, 1e-5, "quick_gelu")
    assert clip_config_unused(d) == unused
    with pytest.raises(
        ConfigError, match=r"does not use \(strict mode\): " + repr(unused).replace("[", r"\[")
    ):
        clip_config_from_hf(d, select_layer=-2, dtype="float32", strict=True)


@pytest.mark.parametrize(
    "attr, value", [("hidden_act", "gelu_new"), ("dropout", 0.1), ("attention_dropout", 0.1)]
)
def test_clip_config_unsupported_values(attr, value, tmp_path):
    d = clip_dir(tmp_path, CLIP_336_VISION)
    (d / "config.json").write_text(json.dumps({**load(CLIP_336_VISION), attr: value}))
    with pytest.raises(ConfigError, match=f"{attr}={value!r}"):
        clip_config_from_hf(d, select_layer=-2, dtype="float32")


# ---- tokenizer files as released ---------------------------------------------------------------------------
def tokenizer_dir(tmp_path: Path, **files: str) -> Path:
    """tests' LLaMA tokenizer.model plus real files: name=fixture path (e.g. added_tokens=...)."""
    # The asset is in the repository and sentencepiece is a runtime dependency: neither may be missing.
    assert SP_MODEL.is_file(), "tests/assets/tokenizer/tokenizer.model is missing"
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copyfile(SP_MODEL, d / "tokenizer.model")
    for name, rel in files.items():
        shutil.copyfile(HF / rel, d / f"{name}.json")
    return d


@pytest.mark.parametrize(
    "files",
    [
        {
            "added_tokens": "sesame/SESAME.added_tokens.json",
            "special_tokens_map": "sesame/SESAME.special_tokens_map.json",
        },
        {
            "added_tokens": "sesame/SESAME_minus.added_tokens.json",
            "tokenizer_config": "sesame/SESAME_minus.tokenizer_config.json",
        },
        {"added_tokens": "lisa/LISA-13B-llama2-v1.added_tokens.json"},
    ],
)
def test_released_seg_tokenizers_pass(files, tmp_path):
    # What the released added_tokens.json says, read from the file rather than assumed.
    added = json.loads((HF / files["added_tokens"]).read_text())
    assert added == {"<im_end>": 32002, "<im_start>": 32001, "[SEG]": 32000} == SEG_TOKENS
    d = tokenizer_dir(tmp_path, **files)
    got, to_write = check_tokenizer(d, resize_vocab=False)
    assert to_write is None
    assert sorted(p.name for p in got) == sorted(["tokenizer.model", *(f"{n}.json" for n in files)])


def test_lisa_7b_v1_tokenizer_refused_for_its_seg_id(tmp_path):
    d = tokenizer_dir(tmp_path, added_tokens="lisa_v1/LISA-7B-v1.added_tokens.json")
    with pytest.raises(ConfigError, match=r"added_tokens\.json: \[SEG\] has id 32003, READ needs 32000"):
        check_tokenizer(d, resize_vocab=False)


def test_llava_base_tokenizer_gets_the_read_tokens_on_resize(tmp_path):
    d = tokenizer_dir(tmp_path, tokenizer_config="llava15_newer/llava-genixer-v1.5-7b.tokenizer_config.json")
    with pytest.raises(ConfigError, match=r"no \[SEG\] token .*--resize-vocab"):
        check_tokenizer(d, resize_vocab=False)
    _, to_write = check_tokenizer(d, resize_vocab=True)
    assert to_write == {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}


def test_llava_hf_tokenizer_ids_collide_with_resize(tmp_path):
    """<image>/<pad> at 32000/32001: refused on a LLaVA base, dropped with their rows as llava-hf; so is the
    special_tokens_map.json that names <pad> as the pad token (READ pads with <unk>)."""
    d = tokenizer_dir(
        tmp_path,
        added_tokens="llava_hf/llava-1.5-7b-hf.added_tokens.json",
        special_tokens_map="llava_hf/llava-1.5-7b-hf.special_tokens_map.json",
    )
    assert json.loads((d / "special_tokens_map.json").read_text())["pad_token"] == "<pad>"
    with pytest.raises(
        ConfigError, match=r"added tokens \{'<image>': 32000, '<pad>': 32001\} already hold the ids"
    ):
        check_tokenizer(d, resize_vocab=True)
    files, to_write = check_tokenizer(d, resize_vocab=True, family="llava_hf")
    assert [p.name for p in files] == ["tokenizer.model"]
    assert to_write == {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}


def test_lisa_7b_v1_tokenizer_is_read_for_a_32004_vocabulary(tmp_path):
    from torchref.lisa import lisa_config

    d = tokenizer_dir(tmp_path, added_tokens="lisa_v1/LISA-7B-v1.added_tokens.json")
    files, to_write = check_tokenizer(d, resize_vocab=False, family="lisa", cfg=lisa_config("v1"))
    assert to_write is None and sorted(p.name for p in files) == ["added_tokens.json", "tokenizer.model"]
    with pytest.raises(
        ConfigError, match=r"\[SEG\] has id 32003, this LISA \(vocab_size 32003\) needs 32000"
    ):
        check_tokenizer(d, resize_vocab=False, family="lisa", cfg=lisa_config("llava1.5"))


def test_tokenizer_config_that_changes_bos_eos_is_refused(tmp_path):
    d = tokenizer_dir(
        tmp_path,
        added_tokens="sesame/SESAME_minus.added_tokens.json",
        tokenizer_config="sesame/SESAME_minus.tokenizer_config.json",
    )
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_eos_token": True}))
    with pytest.raises(ConfigError, match=r"add_bos_token=True, add_eos_token=True"):
        check_tokenizer(d, resize_vocab=False)
