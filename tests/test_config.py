"""Configs: size factories, validation, the strict HF bridge, and the json round trip."""

import dataclasses

import pytest

from read_jax.config import (
    ConfigError,
    LlamaConfig,
    ReadConfig,
    SaspConfig,
    audit_hf_config,
    config_to_dict,
    from_hf_config,
    read_config_from_dict,
)

# A READ-7B config.json with the fields of read_reference.md §10.3 (transformers 4.31 save_pretrained).
READ_7B_HF = {
    "_name_or_path": "./SESAME-LLaVA-v1.5-7B",
    "architectures": ["READForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "freeze_mm_mlp_adapter": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_aspect_ratio": "square",
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_length": 4096,
    "max_position_embeddings": 4096,
    "mm_hidden_size": 1024,
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": True,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "../dataset/clip-vit-large-patch14-336",
    "model_type": "llava",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "out_dim": 256,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "train_mask_decoder": True,
    "transformers_version": "4.31.0",
    "tune_mm_mlp_adapter": False,
    "use_cache": False,
    "use_mm_proj": True,
    "vision_tower": "../dataset/clip-vit-large-patch14-336",
    "vocab_size": 32003,
}


def test_released_config_maps_to_read_7b_llama():
    got = from_hf_config(READ_7B_HF)
    assert got == ReadConfig.read_7b().llama
    assert got.head_dim == 128 and got.num_key_value_heads == 32


@pytest.mark.parametrize(
    "extra",
    [
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        {"tie_word_embeddings": True},
        {"mm_projector_type": "linear"},
        {"hidden_act": "gelu"},
    ],
)
def test_unsupported_values_raise(extra):
    ((attr, value),) = extra.items()
    with pytest.raises(ConfigError, match="unsupported values") as e:
        from_hf_config({**READ_7B_HF, **extra})
    assert f"{attr}={value!r}" in str(e.value)


def test_unknown_attribute_is_recorded_and_refused_in_strict_mode():
    """An attribute read_jax does not use is recorded (audit_hf_config), not fatal; strict=True refuses it."""
    hf = {**READ_7B_HF, "sliding_window": 4096}
    assert from_hf_config(hf) == ReadConfig.read_7b().llama
    unused = audit_hf_config(hf).unused
    assert "sliding_window" in unused and "torch_dtype" in unused and "hidden_size" not in unused
    with pytest.raises(ConfigError, match=r"does not use \(strict mode\): \[.*'sliding_window'"):
        from_hf_config(hf, strict=True)


def test_missing_kv_heads_defaults_to_mha():
    hf = dict(READ_7B_HF)
    del hf["num_key_value_heads"]
    assert from_hf_config(hf).num_key_value_heads == 32


def test_size_factories():
    c13 = ReadConfig.read_13b()
    assert (c13.llama.hidden_size, c13.llama.num_hidden_layers, c13.llama.intermediate_size) == (
        5120,
        40,
        13824,
    )
    assert c13.sasp == SaspConfig.read_13b_eval() and c13.lora.r == 64
    c7 = ReadConfig.read_7b()
    assert (c7.sasp.grid_size, c7.sasp.num_points, c7.sasp.t_pos, c7.sasp.t_neg) == (12, 30, 0.8, 0.2)
    assert c7.lora.scale == 2.0 and c7.clip.num_patches == 576 and c7.sam.image_embedding_size == 64
    t = ReadConfig.tiny()
    assert t.llama.dtype == "float32" and t.clip.num_patches == 576 and t.llama.vocab_size == 32003


@pytest.mark.parametrize(
    "bad",
    [
        lambda: LlamaConfig(hidden_size=65, num_attention_heads=4),
        lambda: LlamaConfig(num_attention_heads=6, num_key_value_heads=4),
        lambda: SaspConfig(t_pos=0.2, t_neg=0.8),
        lambda: SaspConfig(grid_size=4, num_points=30),
        lambda: SaspConfig(mode="mean_std"),
        lambda: ReadConfig.tiny(out_dim=64),
        lambda: LlamaConfig(dtype="float13"),
    ],
)
def test_invalid_configs_raise(bad):
    with pytest.raises(ConfigError):
        bad()


def test_json_round_trip():
    for cfg in (ReadConfig.read_7b(), ReadConfig.tiny(lora=None), ReadConfig.read_13b()):
        assert read_config_from_dict(config_to_dict(cfg)) == cfg


def test_with_dtype_changes_every_component():
    c = ReadConfig.tiny().with_dtype("bfloat16", "float32")
    assert {c.llama.dtype, c.clip.dtype, c.sam.dtype} == {"bfloat16"}
    assert {c.llama.param_dtype, c.clip.param_dtype, c.sam.param_dtype} == {"float32"}
    assert dataclasses.replace(c, max_segs=1).max_segs == 1


def test_initializer_range_is_read_and_sets_the_llama_init():
    """HF's `initializer_range` (std of every Linear and the embedding at init) is honoured, not ignored."""
    import numpy as np
    from flax import nnx

    from read_jax.llama import LlamaForCausalLM

    assert from_hf_config({**READ_7B_HF, "initializer_range": 0.1}).initializer_range == 0.1
    cfg = LlamaConfig(
        vocab_size=4000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        dtype="float32",
        param_dtype="float32",
    )
    for std in (0.02, 0.1):
        m = LlamaForCausalLM(dataclasses.replace(cfg, initializer_range=std), rngs=nnx.Rngs(0))
        layer = m.model.layers[0]
        for w in (
            m.model.embed_tokens.embedding,
            m.lm_head.kernel,
            layer.self_attn.q_proj.kernel,
            layer.mlp.down_proj.kernel,
        ):
            x = np.asarray(w.get_value())
            assert abs(x.mean()) < 0.1 * std and abs(x.std() / std - 1) < 0.05, (std, x.shape)
