"""HF `config.json` -> read_jax configs: the policy, the LLaMA and CLIP attribute tables, the layouts.

Policy: every attribute of a config.json that changes what the model computes is either mapped onto a
read_jax config or checked against the values read_jax implements (a value it cannot honour raises, naming
attribute and value). Everything else (bookkeeping, generation and training flags, attributes a newer
transformers or LLaVA release writes) is *recorded* as unused: the converter writes the list into
conversion.json and logs it on one line. `strict=True` refuses any unused attribute instead.

Layouts (`architectures[0]`):
  READForCausalLM, SESAMEForCausalLM, LlavaLlamaForCausalLM, LlamaForCausalLM: one flat config (LLaVA's
    `mm_*` attributes next to LLaMA's); LLaVA-1.5's mlp2x_gelu projector.
  LISAForCausalLM: the same flat config. LISA's own code builds LLaVA-v1's single-Linear projector
    (`LISA/model/llava/model/llava_arch.py`: `nn.Linear(mm_hidden_size, hidden_size)`; its configs then have
    no `mm_projector_type`, as LISA-7B-v1); forks on LLaVA-1.5 write `mm_projector_type: mlp2x_gelu`.
  LlavaForConditionalGeneration (llava-hf) and LlavaForCausalLM (its early name): transformers' own LLaVA,
    `text_config` (a LLaMA config) + `vision_config` (a CLIP vision config) + the top-level projector and
    feature-selection attributes (`read_jax.convert.llava_hf` reads its weights).

`read_jax.config` re-exports the public names (their historical home).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from read_jax.config import ClipVisionConfig, ConfigError, LlamaConfig

# transformers 4.31 `LlamaConfig` defaults: an attribute absent from config.json means this value, not
# read_jax's own default (`rms_norm_eps` 1e-6 and `max_position_embeddings` 2048 differ from LLaMA-2's).
HF_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
}
_HF_MAPPED = (*HF_LLAMA_DEFAULTS, "num_key_value_heads", "rope_parameters")


def _same(v, w) -> bool:
    """JSON equality that tells bools from numbers (`1` is not `True`) and None from everything else."""
    if isinstance(v, bool) or isinstance(w, bool) or v is None or w is None:
        return type(v) is type(w) and v == w
    return v == w


def _is(*values):
    """Accept exactly these values."""
    return lambda v: any(_same(v, w) for w in values)


def _neg_int(v) -> bool:
    return type(v) is int and v < 0


# Attributes that change the computation: attribute -> (accepted?, what read_jax implements).
_HF_CHECKED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "hidden_act": (_is("silu"), "LLaMA's SiLU-gated MLP only"),
    "tie_word_embeddings": (_is(False), "an untied lm_head only"),
    "rope_scaling": (_is(None), "plain, unscaled RoPE only"),
    "pretraining_tp": (_is(1), "pretraining_tp 1 only"),
    "attention_bias": (_is(False), "bias-free q/k/v/o projections only"),
    "mlp_bias": (_is(False), "a bias-free MLP only"),
    "attention_dropout": (_is(0.0, None), "no attention dropout"),
    "model_type": (_is("llava", "llava_llama", "llama"), "LLaVA/LLaMA configs only"),
    "mm_vision_select_layer": (
        _neg_int,
        "negative CLIP hidden-state indices only, counted from the last layer",
    ),
    "mm_vision_select_feature": (_is("patch"), "'patch' features only, CLS dropped"),
    "mm_use_im_start_end": (_is(True, False), "a boolean; READ sets it True in memory"),
    "mm_use_im_patch_token": (_is(False), "no <im_patch> tokens"),
    "image_aspect_ratio": (_is("square", "pad"), "square images; READ forces 'square' in memory"),
    "mm_patch_merge_type": (_is("flat"), "LLaVA-1.5's 'flat' image features only"),
    "mm_resampler_type": (_is(None), "no vision resampler"),
}
# Used: `head_dim` and `mm_projector_type` are checked by `audit_hf_config`, the others by
# `read_jax.convert.inputs` against what only it knows (the family, the CLIP and SAM configs, whether --clip
# replaces the checkpoint's tower).
_HF_USED_BY_CONVERTER = (
    "architectures",
    "head_dim",
    "mm_projector_type",
    "mm_hidden_size",
    "out_dim",
    "mm_vision_tower",
    "vision_tower",
    "unfreeze_mm_vision_tower",
)
HF_USED = frozenset((*_HF_MAPPED, *_HF_CHECKED, *_HF_USED_BY_CONVERTER))

# llava-hf's top level (transformers `LlavaConfig`): attribute -> (accepted?, what read_jax implements).
_LLAVA_HF_CHECKED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model_type": (_is("llava"), "transformers' LLaVA only"),
    "projector_hidden_act": (_is("gelu"), "LLaVA-1.5's exact-GELU projector only"),
    "multimodal_projector_bias": (_is(True), "a projector with biases"),
    "vision_feature_select_strategy": (_is("default"), "'default' features only, CLS dropped"),
    "vision_feature_layer": (_neg_int, "one negative CLIP hidden-state index"),
    "tie_word_embeddings": (_is(False), "an untied lm_head only"),
    "image_token_index": (
        lambda v: type(v) is int and v >= 32000,
        "an <image> id above LLaMA's 32000 pieces (its row is dropped with llava-hf's other added rows)",
    ),
}
_LLAVA_HF_USED = frozenset(
    (*_LLAVA_HF_CHECKED, "architectures", "text_config", "vision_config", "image_seq_length", "vocab_size")
)
LLAVA_HF_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaForCausalLM")

# `architectures[0]` -> None (read_jax reads this layout) or why it is refused.
HF_ARCHITECTURES: dict[str, str | None] = {
    "READForCausalLM": None,
    "SESAMEForCausalLM": None,
    "LISAForCausalLM": None,
    "LlavaLlamaForCausalLM": None,
    "LlamaForCausalLM": None,
    **dict.fromkeys(LLAVA_HF_ARCHITECTURES),
}
# The projectors each architecture may carry; LLaVA's default for an absent `mm_projector_type` is "linear".
PROJECTORS = {"LISAForCausalLM": ("mlp2x_gelu", "linear")}
DEFAULT_PROJECTORS = ("mlp2x_gelu",)


def hf_architecture(hf: Mapping[str, Any]) -> str:
    """`architectures[0]` of a config.json (LlamaForCausalLM if absent); one-line ConfigError if refused."""
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config.json: architectures={archs!r} is not a list of class names")
    arch = archs[0]
    if arch not in HF_ARCHITECTURES:
        known = sorted(a for a, why in HF_ARCHITECTURES.items() if why is None)
        raise ConfigError(f"config.json: architecture {arch!r} is not supported (read_jax reads {known})")
    if HF_ARCHITECTURES[arch] is not None:
        raise ConfigError(f"config.json: architecture {arch!r}: {HF_ARCHITECTURES[arch]}")
    return arch


def is_llava_hf(hf: Mapping[str, Any]) -> bool:
    """transformers' own LLaVA layout (`text_config` / `vision_config`)."""
    return hf_architecture(hf) in LLAVA_HF_ARCHITECTURES or "text_config" in hf


def hf_projector_type(hf: Mapping[str, Any]) -> str | None:
    """The projector a flat LLaVA config means: `mm_projector_type`, LLaVA's "linear" when a multimodal config
    omits it, None for a plain LLaMA. llava-hf's is always mlp2x_gelu (checked by `audit_hf_config`)."""
    if is_llava_hf(hf):
        return "mlp2x_gelu"
    multimodal = any(k.startswith("mm_") for k in hf) or hf.get("model_type") in ("llava", "llava_llama")
    return hf.get("mm_projector_type", "linear") if multimodal else None


@dataclasses.dataclass(frozen=True)
class HfConfigAudit:
    """What read_jax made of a config.json: the attributes it did not use, and the values it translated.

    Nested attributes of llava-hf's sub-configs are named `text_config.NAME` / `vision_config.NAME`.
    """

    unused: tuple[str, ...]
    notes: tuple[str, ...]


def _bad_values(hf: Mapping[str, Any], table) -> list[str]:
    return [
        f"{k}={hf[k]!r} (read_jax implements {why})"
        for k, (ok, why) in table.items()
        if k in hf and not ok(hf[k])
    ]


def _rope_theta(hf: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """RoPE's base from `rope_theta` or transformers 5's `rope_parameters` (plain RoPE only)."""
    theta = hf.get("rope_theta", HF_LLAMA_DEFAULTS["rope_theta"])
    params = hf.get("rope_parameters")
    if params is None:
        return theta, []
    if (
        not isinstance(params, Mapping)
        or params.get("rope_type", "default") != "default"
        or set(params) - {"rope_type", "rope_theta"}
    ):
        return theta, [f"rope_parameters={params!r} (read_jax implements plain, unscaled RoPE only)"]
    if "rope_theta" in hf and "rope_theta" in params and not _same(hf["rope_theta"], params["rope_theta"]):
        return theta, [f"rope_parameters={params!r} disagrees with rope_theta={hf['rope_theta']!r}"]
    return params.get("rope_theta", theta), []


def _audit_llama(hf: Mapping[str, Any], arch: str) -> tuple[list[str], list[str], list[str]]:
    """(unsupported values, unused attributes, notes) of a flat LLaVA/LLaMA config."""
    bad = _bad_values(hf, _HF_CHECKED)
    proj = hf_projector_type(hf)
    allowed = PROJECTORS.get(arch, DEFAULT_PROJECTORS)
    if proj is not None and proj not in allowed:
        what = (
            "mm_projector_type absent (LLaVA's default is a single Linear, the LLaVA-v1 projector; "
            if "mm_projector_type" not in hf
            else f"mm_projector_type={proj!r} ("
        )
        bad.append(f"{what}read_jax implements {' or '.join(allowed)} for {arch})")
    heads = hf.get("num_attention_heads", HF_LLAMA_DEFAULTS["num_attention_heads"])
    kv = hf.get("num_key_value_heads")
    if kv is not None and (type(kv) is not int or kv < 1 or type(heads) is not int or heads % kv):
        bad.append(
            f"num_key_value_heads={kv!r} (read_jax implements MHA or GQA: kv heads dividing "
            f"num_attention_heads={heads!r})"
        )
    hidden = hf.get("hidden_size", HF_LLAMA_DEFAULTS["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and (
        type(head_dim) is not int or type(heads) is not int or head_dim * heads != hidden
    ):
        bad.append(
            f"head_dim={head_dim!r} (read_jax implements head_dim = hidden_size / num_attention_heads = "
            f"{hidden}/{heads})"
        )
    bad += _rope_theta(hf)[1]
    notes = []
    if hf.get("mm_use_im_start_end") is False:
        notes.append(
            "mm_use_im_start_end=False: READ sets it True in memory when it builds the model; read_jax "
            "always wraps the image in <im_start>/<im_end>"
        )
    if hf.get("image_aspect_ratio") == "pad":
        notes.append("image_aspect_ratio='pad': READ forces 'square' in memory; read_jax preprocesses square")
    return bad, sorted(set(hf) - HF_USED), notes


def _sub_config(hf: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    sub = hf.get(name)
    if not isinstance(sub, Mapping):
        raise ConfigError(f"config.json: {name}={sub!r} is not a config dict (llava-hf layout)")
    return sub


def audit_hf_config(hf: Mapping[str, Any]) -> HfConfigAudit:
    """Check every computation-changing attribute of a config.json; list the ones read_jax does not use.

    Raises:
      ConfigError naming each attribute whose value read_jax cannot honour, with that value.
    """
    arch = hf_architecture(hf)
    if not is_llava_hf(hf):
        bad, unused, notes = _audit_llama(hf, arch)
    else:
        text, vision = _sub_config(hf, "text_config"), _sub_config(hf, "vision_config")
        bad = _bad_values(hf, _LLAVA_HF_CHECKED)
        text_bad, text_unused, notes = _audit_llama(text, hf_architecture(text))
        bad += [f"text_config.{b}" for b in text_bad]
        vision_bad, vision_unused = audit_clip_vision(vision)
        bad += [f"vision_config.{b}" for b in vision_bad]
        top = hf.get("vocab_size")
        if top is not None and not _same(top, text.get("vocab_size", top)):
            bad.append(f"vocab_size={top!r} != text_config.vocab_size={text.get('vocab_size')!r}")
        unused = sorted(
            [*(set(hf) - _LLAVA_HF_USED)]
            + [f"text_config.{k}" for k in text_unused]
            + [f"vision_config.{k}" for k in vision_unused]
        )
    if bad:
        raise ConfigError("config.json has unsupported values: " + "; ".join(bad))
    return HfConfigAudit(unused=tuple(unused), notes=tuple(notes))


def from_hf_config(
    hf: Mapping[str, Any] | str,
    *,
    dtype: str = "bfloat16",
    param_dtype: str | None = None,
    strict: bool = False,
) -> LlamaConfig:
    """LlamaConfig from a HF config dict or config.json path (transformers 4.31 defaults for absent keys).

    Attributes that change the computation are mapped or checked (`audit_hf_config`); the others are unused
    and tolerated (`audit_hf_config(hf).unused` lists them) unless `strict`, which refuses them by name. A
    llava-hf config gives the LLaMA of its `text_config`.
    """
    if isinstance(hf, str):
        with open(hf) as f:
            hf = json.load(f)
    audit = audit_hf_config(hf)
    if strict and audit.unused:
        raise ConfigError(
            f"config.json has attributes read_jax does not use (strict mode): {list(audit.unused)}"
        )
    text = hf["text_config"] if is_llava_hf(hf) else hf
    kw = {k: text.get(k, d) for k, d in HF_LLAMA_DEFAULTS.items()}
    kw["rope_theta"] = _rope_theta(text)[0]
    kw["num_key_value_heads"] = text.get("num_key_value_heads") or kw["num_attention_heads"]
    bad = {k: v for k, v in kw.items() if isinstance(v, bool) or not isinstance(v, int | float)}
    if bad:
        raise ConfigError(f"config.json has non-numeric sizes: {bad}")
    return LlamaConfig(**kw, dtype=dtype, param_dtype=param_dtype or dtype)


# ---- CLIP vision configs ----------------------------------------------------------------------------------
# transformers 4.x wrote only the values that differ from its defaults (`to_diff_dict`), so an absent key
# means HF's CLIPVisionConfig default (ViT-B/32), not read_jax's ViT-L/14-336 one.
HF_CLIP_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
# Vision-config attributes that change the computation besides the mapped ones: read_jax has no dropout.
_HF_CLIP_VISION_ZERO = ("dropout", "attention_dropout")
_HF_CLIP_VISION_USED = frozenset((*HF_CLIP_VISION_DEFAULTS, *_HF_CLIP_VISION_ZERO, "model_type"))


def audit_clip_vision(hf: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(unsupported values, unused attributes) of an HF CLIP vision config dict."""
    bad = [f"{k}={hf[k]!r}" for k in _HF_CLIP_VISION_ZERO if hf.get(k) not in (None, 0, 0.0)]
    act = hf.get("hidden_act", HF_CLIP_VISION_DEFAULTS["hidden_act"])
    if act not in ("quick_gelu", "gelu"):
        bad.append(f"hidden_act={act!r}")
    if hf.get("model_type", "clip_vision_model") != "clip_vision_model":
        bad.append(f"model_type={hf.get('model_type')!r}")
    if bad:
        bad[-1] += " (read_jax's CLIP tower has quick_gelu or gelu MLPs and no dropout)"
    return bad, sorted(set(hf) - _HF_CLIP_VISION_USED)


def clip_vision_config(
    hf: Mapping[str, Any], *, select_layer: int, dtype: str, where: str, strict: bool = False
) -> ClipVisionConfig:
    """ClipVisionConfig from an HF CLIP vision config dict; `where` names it in errors.

    Raises ConfigError naming the attribute and value read_jax cannot honour (a hidden_act other than
    quick_gelu/gelu, dropout), and with `strict` any vision-config attribute it does not use.
    """
    bad, unused = audit_clip_vision(hf)
    if bad:
        raise ConfigError(f"{where}: unsupported values: {'; '.join(bad)}")
    if strict and unused:
        raise ConfigError(f"{where}: vision-config attributes read_jax does not use (strict mode): {unused}")
    kw = {k: hf.get(k, d) for k, d in HF_CLIP_VISION_DEFAULTS.items()}
    try:
        return ClipVisionConfig(**kw, select_layer=select_layer, dtype=dtype, param_dtype=dtype)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
