"""READ / SESAME / LISA checkpoints -> read_jax: the full key table, the input checks, the streaming driver.

PyTorch reference: the released checkpoints (read_reference.md §10: `save_pretrained` of `READForCausalLM`
after `merge_and_unload`, §10.1-10.3), `READ.py:149-216` (`text_hidden_fcs`, the vision tower quirk),
`clip_encoder.py` (CLIP is loaded from its own HF directory) and Meta's `build_sam.py`.

Where each source key goes (one table per family, reused from `read_jax.convert.{llama,clip,sam}`):

    model.embed_tokens / model.layers.* / model.norm / lm_head  -> llava/language_model/...   (LLaMA table)
    model.mm_projector.{0,2}.*                                  -> llava/mm_projector/layers/{0,2}/...
    model.text_hidden_fcs.0.{0,2}.*                             -> text_hidden_fcs/layers/{0,1}/...
    model.visual_model.*                                        -> visual_model/...           (SAM table)
    --clip DIR: (vision_model.)embeddings/encoder/...           -> llava/vision_tower/vision_model/...
    --sam PTH:  image_encoder.* / prompt_encoder.* / mask_decoder.*  -> visual_model/...
    base_model.model.<any of the above> (unmerged PEFT); `...lora_A|lora_B(.default).weight` are folded
      into their base weight on the fly (W += alpha/r B A, peft `merge_and_unload`), or mapped to
      `.../lora_a|lora_b` when the target model carries LoRA leaves.

Dropped on purpose (`Converter(ignore=...)`, listed in the output's conversion.json): `rotary_emb.inv_freq`
(recomputed from rope_theta), the checkpoint's own `model.vision_tower.*` when `--clip` is given (READ
releases have none, §10.1), `model.visual_model.*` when `--sam` supplies SAM, and the text half of a full
HF `CLIPModel` directory (`text_model.*`, projections, `logit_scale`). SAM's `mask_downscaling` is
implemented by `read_jax.sam` and therefore converted, not dropped.

READ vs SESAME vs LISA (§12): READ is trained from SESAME and shares its layout and config. LISA-v1
checkpoints were built on LLaVA-v1 (a single-Linear `mm_projector`, CLIP ViT-L/14-224, no
`mm_projector_type` in config.json), which `read_jax.llava` does not implement: they are refused up front
with that explanation. LLaVA-1.5 bases (`LlavaLlamaForCausalLM`, vocab 32000) are accepted for from-scratch
inits with `--resize-vocab` (3 new rows ~ N(0, 0.02), as HF 4.31 `resize_token_embeddings`) and `--sam`;
`text_hidden_fcs` then keeps its init, and the checkpoint records that. LISA releases on LLaVA-1.5 share
READ's layout and are read; llava-hf's `LlavaForConditionalGeneration` layout is refused (not yet read).

config.json policy (`read_jax.config.audit_hf_config`, `build_config`): every attribute that changes the
computation is mapped or checked, and a value read_jax cannot honour is refused naming attribute and value;
the others (bookkeeping, training flags, what newer releases add) are listed in conversion.json
(`config_unused_attributes`, and `clip_config_unused_attributes` for --clip) and logged on one warning line,
or refused with `strict=True` (`convert_weights.py --strict`).

Memory: tensors are streamed one at a time from one shard at a time (`read_jax.convert.io`), and each
converted leaf goes to `read_jax.checkpoint.PartWriter`, which writes it out in orbax parts of `part_bytes`;
the Converter keeps only a placeholder for written leaves. Peak host memory is about one part (plus orbax's
write buffers) plus one tensor and its transposed copy, whatever the model or shard size.

Shape letters: V vocabulary, C LLM width, R LoRA rank, I/O Linear in/out features.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from read_jax import config as rc
from read_jax.checkpoint import owned_copy
from read_jax.convert import checks, io
from read_jax.convert.clip import (
    CLIP_VISION_IGNORE,
    LLAVA_VISION_TOWER_PREFIX,
    clip_rules,
    mm_projector_rules,
)
from read_jax.convert.common import ConversionError, Converter, Rule, linear, prefixed
from read_jax.convert.llama import LLAMA_IGNORE, LLAMA_RULES, PEFT_BASE_RULES, PEFT_LORA_RULES
from read_jax.convert.sam import SAM_IGNORE, sam_rules

PEFT_PREFIX = "base_model.model."
SAM_PREFIX = "model.visual_model."
SEG_TOKENS = {"[SEG]": rc.SEG_TOKEN_ID, "<im_start>": rc.IM_START_TOKEN_ID, "<im_end>": rc.IM_END_TOKEN_ID}
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "generation_config.json",
)
HF_CLIP_336 = "openai/clip-vit-large-patch14-336"
# HF 4.31 `resize_token_embeddings` initialises new rows with `_init_weights`: normal(0, initializer_range).
RESIZE_INIT_STD = 0.02
ARCHITECTURES = {
    "READForCausalLM": "read",
    "SESAMEForCausalLM": "sesame",
    "LISAForCausalLM": "lisa",
    "LlavaLlamaForCausalLM": "llava",
    "LlamaForCausalLM": "llama",
}

# ---- key tables --------------------------------------------------------------------------------------------
LANGUAGE_MODEL = "llava/language_model/"
VISION_TOWER = "llava/vision_tower/"
MM_PROJECTOR = "llava/mm_projector/"
VISUAL_MODEL = "visual_model/"

# `ModuleList([Sequential(Linear(C, C), ReLU, Linear(C, 256), Dropout(0))])` (READ.py:149-161, §2.6): torch
# Sequential indices 0 and 2 of module 0 become the two entries of `ReadModel.text_hidden_fcs.layers`.
TEXT_HIDDEN_FCS_RULES: list[Rule] = [
    Rule(r"model\.text_hidden_fcs\.0\.0\.weight", "text_hidden_fcs/layers/0/kernel", linear),
    Rule(r"model\.text_hidden_fcs\.0\.0\.bias", "text_hidden_fcs/layers/0/bias"),
    Rule(r"model\.text_hidden_fcs\.0\.2\.weight", "text_hidden_fcs/layers/1/kernel", linear),
    Rule(r"model\.text_hidden_fcs\.0\.2\.bias", "text_hidden_fcs/layers/1/bias"),
]

# The text tower and projections of a full HF `CLIPModel` directory (openai/clip-vit-large-patch14-336 is
# one): LLaVA's `CLIPVisionModel.from_pretrained` drops them too.
CLIP_MODEL_EXTRA_IGNORE = [
    r"text_model\..*",
    r"visual_projection\.weight",
    r"text_projection\.weight",
    r"logit_scale",
]
_VM = r"vision_model\."
_PEFT = r"(?:base_model\.model\.)?"


def read_rules() -> list[Rule]:
    """The READ/SESAME checkpoint table in the released (merged) layout; invertible for export."""
    return (
        prefixed(LLAMA_RULES, "", LANGUAGE_MODEL)
        + mm_projector_rules(dst_prefix=MM_PROJECTOR)
        + TEXT_HIDDEN_FCS_RULES
        + sam_rules(SAM_PREFIX, VISUAL_MODEL)
    )


def peft_read_rules() -> list[Rule]:
    """The same checkpoint wrapped by PEFT (`base_model.model.` prefix; `base_layer` in newer peft)."""
    return (
        prefixed(PEFT_BASE_RULES, "", LANGUAGE_MODEL)
        + prefixed(mm_projector_rules(dst_prefix=MM_PROJECTOR), PEFT_PREFIX)
        + prefixed(TEXT_HIDDEN_FCS_RULES, PEFT_PREFIX)
        + sam_rules(PEFT_PREFIX + SAM_PREFIX, VISUAL_MODEL)
    )


def lora_rules() -> list[Rule]:
    """PEFT `lora_A`/`lora_B` keys -> `.../lora_a|lora_b` leaves (when the target model carries LoRA)."""
    return prefixed(PEFT_LORA_RULES, "", LANGUAGE_MODEL)


def vision_tower_rules() -> list[Rule]:
    """CLIP inside a LLaVA state dict (`model.vision_tower.vision_tower.`), plain or PEFT-wrapped."""
    return clip_rules(LLAVA_VISION_TOWER_PREFIX, VISION_TOWER) + clip_rules(
        PEFT_PREFIX + LLAVA_VISION_TOWER_PREFIX, VISION_TOWER
    )


def clip_dir_rules() -> list[Rule]:
    """An HF `CLIPVisionModel` (or `CLIPModel`) directory -> the LLaVA vision tower.

    The openai checkpoints and transformers 4.x `save_pretrained` store `vision_model.*`; transformers 5
    saves a `CLIPVisionModel` without that prefix (`embeddings.*`, `encoder.*`, ...). Both are accepted
    through the one CLIP table: the prefix-less rules are its rules with `vision_model.` cut off the source.
    """
    rules = clip_rules("", VISION_TOWER)
    return rules + [
        Rule(r.source[len(_VM) :], r.target, r.transform) for r in rules if r.source.startswith(_VM)
    ]


def sam_pth_rules() -> list[Rule]:
    """Meta's `sam_vit_h_4b8939.pth` -> the READ SAM."""
    return sam_rules("", VISUAL_MODEL)


def read_ignore(*, clip_given: bool, sam_given: bool) -> list[str]:
    """Source-key regexes of a READ/SESAME/PEFT checkpoint dropped on purpose (see the module docstring)."""
    out = list(LLAMA_IGNORE)
    if clip_given:
        out.append(_PEFT + r"model\.vision_tower\..*")
    else:
        out += [_PEFT + re.escape(LLAVA_VISION_TOWER_PREFIX) + p for p in CLIP_VISION_IGNORE]
    if sam_given:
        out.append(_PEFT + re.escape(SAM_PREFIX) + r".*")
    return out + [_PEFT + re.escape(SAM_PREFIX) + p for p in SAM_IGNORE]


def clip_dir_ignore() -> list[str]:
    """Source-key regexes of an HF CLIP directory dropped on purpose."""
    return (
        list(CLIP_VISION_IGNORE)
        + [p[len(_VM) :] for p in CLIP_VISION_IGNORE if p.startswith(_VM)]
        + CLIP_MODEL_EXTRA_IGNORE
    )


# ---- target tree -------------------------------------------------------------------------------------------
def target_leaves(model_fn: Callable[[], Any]) -> dict[str, Any]:
    """'/'-path -> ShapeDtypeStruct of every checkpointed variable (params, buffers; not RNG state)."""
    from flax import nnx

    from read_jax.convert.common import abstract_leaves

    abstract = nnx.eval_shape(model_fn)
    return abstract_leaves(nnx.state(abstract, nnx.Not(nnx.RngState)))


def default_model_fn(cfg: rc.ReadConfig) -> Callable[[], Any]:
    """The model a converted checkpoint stores: READ without LoRA (a released PEFT checkpoint's LoRA is merged
    into the base weights; `read_jax.build.load_model` attaches fresh LoRA factors where the config has
    them)."""
    from read_jax.build import model_fn

    return model_fn(cfg.replace(lora=None))


# ---- input checks (all before any tensor is read) ---------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise rc.ConfigError(f"{path}: invalid json ({e})") from e


def family_of(hf: Mapping[str, Any]) -> str:
    """'read' | 'sesame' | 'lisa' | 'llava' | 'llama' from `architectures`.

    Refuses, with a one-line ConfigError naming the architecture, the layouts read_jax does not read yet:
    llava-hf's `LlavaForConditionalGeneration` and LLaVA-v1 style checkpoints (LISA-v1).
    """
    arch = rc.hf_architecture(hf)
    family = ARCHITECTURES[arch]
    proj = hf.get("mm_projector_type")
    if family != "llama" and proj != "mlp2x_gelu":
        which = "without mm_projector_type" if proj is None else f"with mm_projector_type={proj!r}"
        raise rc.ConfigError(
            f"config.json: architecture {arch!r} {which} is a LLaVA-v1 style checkpoint (a single-Linear "
            "mm_projector, as in LISA-v1), but read_jax implements LLaVA-1.5's mlp2x_gelu projector only "
            "(READ, SESAME, LISA on LLaVA-1.5)"
        )
    return family


# transformers 4.x wrote only the values that differ from its defaults (`to_diff_dict`), so an absent key
# means HF's CLIPVisionConfig default (ViT-B/32), not read_jax's ViT-L/14-336 one.
_HF_CLIP_VISION_DEFAULTS = {
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
_HF_CLIP_VISION_USED = frozenset((*_HF_CLIP_VISION_DEFAULTS, *_HF_CLIP_VISION_ZERO, "model_type"))


def _clip_vision_config(clip_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(config.json path, the vision config dict) of an HF `CLIPVisionModel` or `CLIPModel` directory.

    For a `CLIPModel` only `vision_config` is read: its text tower and projections are dropped on purpose
    (`CLIP_MODEL_EXTRA_IGNORE`), like LLaVA's `CLIPVisionModel.from_pretrained` does.
    """
    path = clip_dir / "config.json"
    if not path.is_file():
        raise rc.ConfigError(f"{path}: not found (--clip must be an HF CLIP directory)")
    hf = _read_json(path)
    if hf.get("model_type") == "clip":
        return path, {"model_type": "clip_vision_model", **(hf.get("vision_config") or {})}
    if hf.get("model_type") != "clip_vision_model":
        raise rc.ConfigError(f"{path}: model_type {hf.get('model_type')!r} is not a CLIP vision model")
    return path, hf


def clip_config_unused(clip_dir: Path) -> list[str]:
    """The attributes of --clip's vision config that read_jax does not use (recorded in conversion.json)."""
    return sorted(set(_clip_vision_config(clip_dir)[1]) - _HF_CLIP_VISION_USED)


def clip_config_from_hf(
    clip_dir: Path, *, select_layer: int, dtype: str, strict: bool = False
) -> rc.ClipVisionConfig:
    """ClipVisionConfig from an HF `CLIPVisionModel` or `CLIPModel` directory's config.json.

    Raises ConfigError naming the attribute and value read_jax cannot honour (a hidden_act other than
    quick_gelu/gelu, dropout), and with `strict` any vision-config attribute it does not use.
    """
    path, hf = _clip_vision_config(clip_dir)
    kw = {k: hf.get(k, d) for k, d in _HF_CLIP_VISION_DEFAULTS.items()}
    bad = [f"{k}={hf[k]!r}" for k in _HF_CLIP_VISION_ZERO if hf.get(k) not in (None, 0, 0.0)]
    if kw["hidden_act"] not in ("quick_gelu", "gelu"):
        bad.append(f"hidden_act={kw['hidden_act']!r}")
    if bad:
        raise rc.ConfigError(
            f"{path}: unsupported values: {'; '.join(bad)} (read_jax's CLIP tower has quick_gelu or gelu "
            "MLPs and no dropout)"
        )
    unused = clip_config_unused(clip_dir)
    if strict and unused:
        raise rc.ConfigError(
            f"{path}: vision-config attributes read_jax does not use (strict mode): {unused}"
        )
    try:
        return rc.ClipVisionConfig(**kw, select_layer=select_layer, dtype=dtype, param_dtype=dtype)
    except rc.ConfigError as e:
        raise rc.ConfigError(f"{path}: {e}") from None


def check_tokenizer(tok_dir: Path, *, resize_vocab: bool) -> tuple[list[Path], dict[str, int] | None]:
    """Find the tokenizer files and check [SEG]/<im_start>/<im_end> = 32000/32001/32002 (§2.3).

    Also refuses a tokenizer_config.json whose add_bos_token/add_eos_token would change the token ids
    READ's prompts get (it prepends BOS and appends no EOS), and, with `resize_vocab`, a tokenizer whose
    own added tokens already hold the ids the three READ tokens would get (llava-hf's <image>/<pad>).

    Returns:
      (files to copy, the added tokens to write when `resize_vocab` adds them, else None). Raises ConfigError
      naming the file that gives [SEG] another id (cf. LISA issue #55 for such tokenizer mix-ups).
    """
    files = [tok_dir / n for n in TOKENIZER_FILES if (tok_dir / n).is_file()]
    sp_path = tok_dir / "tokenizer.model"
    if not sp_path.is_file():
        raise rc.ConfigError(f"{tok_dir}: no tokenizer.model (the LLaMA SentencePiece model is required)")
    sp = checks.load_sentencepiece(sp_path)
    base = sp.get_piece_size()
    found: dict[str, tuple[int, str]] = {}  # token -> (id, the file it came from)

    def note(tok: str, idx: int, where: str):
        if tok in found and found[tok][0] != idx:
            raise rc.ConfigError(
                f"{tok_dir}: {tok} has id {found[tok][0]} in {found[tok][1]} but {idx} in {where}"
            )
        found.setdefault(tok, (int(idx), where))

    for tok in SEG_TOKENS:
        if sp.piece_to_id(tok) != sp.unk_id():  # a piece of the SentencePiece model itself
            note(tok, sp.piece_to_id(tok), "tokenizer.model")
    if (tok_dir / "added_tokens.json").is_file():
        for tok, idx in _read_json(tok_dir / "added_tokens.json").items():
            note(tok, idx, "added_tokens.json")
    if (tok_dir / "tokenizer_config.json").is_file():
        tok_cfg = _read_json(tok_dir / "tokenizer_config.json")
        bos, eos = tok_cfg.get("add_bos_token", True), tok_cfg.get("add_eos_token", False)
        if bos is not True or eos not in (None, False):
            raise rc.ConfigError(
                f"{tok_dir / 'tokenizer_config.json'}: add_bos_token={bos!r}, add_eos_token={eos!r}; READ's "
                "prompts need LLaMA's BOS prepended and no EOS appended (true / false)"
            )
        for idx, d in (tok_cfg.get("added_tokens_decoder") or {}).items():
            note(d["content"], int(idx), "tokenizer_config.json")
    if (tok_dir / "tokenizer.json").is_file():
        for d in _read_json(tok_dir / "tokenizer.json").get("added_tokens") or []:
            note(d["content"], int(d["id"]), "tokenizer.json")
    checks.refuse_extra_added_tokens(found, SEG_TOKENS, base, tok_dir)

    if "[SEG]" not in found:
        taken = {t: i for t, (i, _) in found.items() if i >= base}
        if resize_vocab and base == rc.SEG_TOKEN_ID and not taken and not any(t in found for t in SEG_TOKENS):
            return files, dict(SEG_TOKENS)
        if resize_vocab and taken:
            raise rc.ConfigError(
                f"{tok_dir}: the tokenizer's added tokens {taken} already hold the ids --resize-vocab would "
                "give [SEG]=32000, <im_start>=32001, <im_end>=32002"
            )
        raise rc.ConfigError(
            f"{tok_dir}: the tokenizer has no [SEG] token (tokenizer.model has {base} pieces); READ needs "
            f"[SEG]=32000, <im_start>=32001, <im_end>=32002 (--resize-vocab adds them to a LLaVA base)"
        )
    for tok, want in SEG_TOKENS.items():
        if tok not in found:
            raise rc.ConfigError(f"{tok_dir}: the tokenizer has [SEG] but no {tok} (READ needs {tok}={want})")
        idx, where = found[tok]
        if idx != want:
            raise rc.ConfigError(
                f"{tok_dir / where}: {tok} has id {idx}, READ needs {want} "
                f"(read_reference.md §2.3: the ids are baked into the model and the data)"
            )
    return files, None


# An openai CLIP directory name: clip-vit-large-patch14 (224 pixels) or clip-vit-large-patch14-336.
_OPENAI_CLIP_NAME = re.compile(r"clip-vit-(?:base|large)-patch(\d+)(?:-(\d+))?")


def _named_clip_geometry(name: str) -> tuple[int, int] | None:
    """(patch size, image size) that a vision-tower path names, when it names an openai CLIP directory."""
    m = _OPENAI_CLIP_NAME.fullmatch(name.rstrip("/").rsplit("/", 1)[-1])
    return None if m is None else (int(m.group(1)), int(m.group(2) or 224))


def build_config(
    hf: Mapping[str, Any],
    *,
    clip_dir: Path | None,
    base: str,
    dtype: str,
    resize_vocab: bool,
    strict: bool = False,
) -> rc.ReadConfig:
    """ReadConfig of a checkpoint: LLaMA from config.json, CLIP from --clip, SAM/SasP/LoRA from `base`.

    `rc.from_hf_config` checks the computation-changing attributes (and with `strict` refuses unused ones);
    the ones only the converter can check are checked here: `mm_hidden_size` and `out_dim` against the CLIP
    and SAM configs (so that tiny test checkpoints can carry them too), `mm_vision_select_layer` against the
    CLIP depth, the vision tower the config names against the CLIP that is used (§10.3: the name is a path
    on the training machine, CLIP comes from --clip; an openai directory name still tells patch and image
    size), and `unfreeze_mm_vision_tower` against --clip replacing a fine-tuned tower.
    """
    llama = rc.from_hf_config(hf, dtype=dtype, strict=strict)
    vocab = hf.get("vocab_size", rc.HF_LLAMA_DEFAULTS["vocab_size"])
    if vocab == rc.SEG_TOKEN_ID and resize_vocab:
        llama = dataclasses.replace(llama, vocab_size=rc.VOCAB_SIZE)
    elif vocab == rc.SEG_TOKEN_ID:
        raise rc.ConfigError(
            "config.json: vocab_size 32000 (a plain LLaVA/LLaMA vocabulary); READ checkpoints have 32003 "
            "([SEG], <im_start>, <im_end>). Pass --resize-vocab to append the 3 rows (N(0, 0.02) init, as HF "
            "resize_token_embeddings does) for a from-scratch init"
        )
    elif vocab != rc.VOCAB_SIZE:
        raise rc.ConfigError(f"config.json: vocab_size {vocab}, READ needs {rc.VOCAB_SIZE}")
    factories = {
        "read_7b": rc.ReadConfig.read_7b,
        "read_13b": rc.ReadConfig.read_13b,
        "tiny": lambda: rc.ReadConfig.tiny(dtype),
    }
    if base == "auto":
        base = {4096: "read_7b", 5120: "read_13b"}.get(llama.hidden_size)
        if base is None:
            raise rc.ConfigError(f"hidden_size {llama.hidden_size}: pass --base (read_7b, read_13b or tiny)")
    if base not in factories:
        raise rc.ConfigError(f"unknown --base {base!r}; choose from {sorted(factories)}")
    cfg = factories[base]().with_dtype(dtype)
    tower_src = "--clip DIR" if clip_dir else f"--base {base}"
    clip = cfg.clip
    if clip_dir is not None:
        clip = clip_config_from_hf(clip_dir, select_layer=clip.select_layer, dtype=dtype, strict=strict)
    select = hf.get("mm_vision_select_layer", clip.select_layer)
    try:
        clip = dataclasses.replace(clip, select_layer=select)
    except rc.ConfigError:
        raise rc.ConfigError(
            f"config.json: mm_vision_select_layer={select!r} is outside the {clip.num_hidden_layers}-layer "
            f"CLIP tower of {tower_src}"
        ) from None
    cfg = cfg.replace(llama=llama, clip=clip)
    problems = []
    mm_hidden, out_dim = hf.get("mm_hidden_size"), hf.get("out_dim")
    if mm_hidden is not None and mm_hidden != clip.hidden_size:
        problems.append(f"mm_hidden_size={mm_hidden!r} != {clip.hidden_size}, the hidden_size of {tower_src}")
    if out_dim is not None and out_dim != cfg.out_dim:
        problems.append(f"out_dim={out_dim!r} != the SAM prompt_embed_dim {cfg.out_dim} of --base {base}")
    for k in ("mm_vision_tower", "vision_tower"):
        named = _named_clip_geometry(hf[k]) if isinstance(hf.get(k), str) else None
        if named is not None and named != (clip.patch_size, clip.image_size):
            problems.append(
                f"{k}={hf[k]!r} names a CLIP with {named[0]}-pixel patches at {named[1]} px, but the tower "
                f"of {tower_src} has {clip.patch_size}-pixel patches at {clip.image_size} px"
            )
    unfreeze = hf.get("unfreeze_mm_vision_tower", False)
    if not isinstance(unfreeze, bool):
        problems.append(f"unfreeze_mm_vision_tower={unfreeze!r} is not a boolean")
    elif unfreeze and clip_dir is not None:
        problems.append(
            "unfreeze_mm_vision_tower=True: the checkpoint's CLIP was fine-tuned; --clip would replace it "
            "with other weights (convert without --clip to use the checkpoint's own vision tower)"
        )
    if problems:
        raise rc.ConfigError("config.json: " + "; ".join(problems))
    return cfg


# ---- sources -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    """One stream of tensors: its files, and each file's keys when known without reading tensors."""

    name: str  # "checkpoint" | "clip" | "sam"
    files: tuple[Path, ...]
    expected_keys: dict[Path, set[str]] | None  # from an index json or safetensors headers; None: unknown

    @property
    def keys(self) -> set[str] | None:
        return None if self.expected_keys is None else set().union(*self.expected_keys.values())

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def hf_source(name: str, directory: Path) -> Source:
    """The weight files of an HF directory; raises CheckpointFileError naming missing shards."""
    found = io.find_checkpoint_files(directory)
    for f in found.files:
        io.check_weights_file(f)  # text, LFS pointers, empty files: refused before anything is written
    expected: dict[Path, set[str]] = {}
    for f in found.files:
        keys = found.keys_of(f)
        if keys is None:
            listed = io.tensor_keys(f)
            if listed is None:
                return Source(name, found.files, None)
            keys = set(listed)
        expected[f] = keys
    return Source(name, found.files, expected)


def file_source(name: str, path: Path) -> Source:
    io.check_weights_file(path)
    keys = io.tensor_keys(path)
    return Source(name, (path,), None if keys is None else {path: set(keys)})


# ---- stream stages -----------------------------------------------------------------------------------------
_LORA_KEY = re.compile(_PEFT + r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight")
_BASE_KEY = re.compile(_PEFT + r"(.+?)(?:\.base_layer)?\.weight")
_EMBED_KEYS = re.compile(_PEFT + r"(?:model\.embed_tokens\.weight|lm_head\.weight)")
_FLOATS = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}


class LoraMerger:
    """Fold unmerged PEFT LoRA into base weights while streaming: W [O, I] += (alpha / r) B [O, R] @ A [R, I].

    A base weight of a module that (may) have LoRA is held until both factors arrive (PEFT state dicts store
    them next to each other, so at most a few tensors wait). `lora_modules` (known from an index) says which
    modules have factors; without it, every attention projection of a PEFT dump is held until its factors or
    the end of the stream.
    """

    def __init__(self, alpha: float, lora_modules: set[str] | None):
        self.alpha = alpha
        self.lora_modules = lora_modules
        self.pending: dict[str, dict[str, Any]] = {}
        self.merged: list[str] = []

    def _maybe_lora(self, key: str, module: str) -> bool:
        if self.lora_modules is not None:
            return module in self.lora_modules
        return key.startswith(PEFT_PREFIX) and re.fullmatch(r".*\.self_attn\.[qkvo]_proj", module) is not None

    def feed(self, key: str, arr: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """(key, array) pairs ready for the converter: nothing while a triplet is incomplete."""
        m = _LORA_KEY.fullmatch(key)
        if m:
            self.pending.setdefault(m.group(1), {})[m.group(2)] = owned_copy(arr)
            yield from self._try(m.group(1))
            return
        m = _BASE_KEY.fullmatch(key)
        if m and self._maybe_lora(key, m.group(1)):
            self.pending.setdefault(m.group(1), {})["base"] = (key, owned_copy(arr))
            yield from self._try(m.group(1))
            return
        yield key, arr

    def _try(self, module: str) -> Iterator[tuple[str, np.ndarray]]:
        p = self.pending[module]
        if not {"base", "lora_A", "lora_B"} <= set(p):
            return
        (key, w), a, b = p["base"], p["lora_A"], p["lora_B"]
        del self.pending[module]
        r = a.shape[0]
        if b.shape != (w.shape[0], r) or a.shape != (r, w.shape[1]):
            raise ConversionError(f"{module}: LoRA shapes A {a.shape}, B {b.shape} do not fit W {w.shape}")
        # fp32 product, one rounding to W's dtype (peft merges in the model dtype; this is at least as exact).
        delta = (b.astype(np.float32) @ a.astype(np.float32)) * np.float32(self.alpha / r)
        self.merged.append(module)
        yield key, (w.astype(np.float32) + delta).astype(w.dtype)

    def finish(self) -> Iterator[tuple[str, np.ndarray]]:
        """Release base weights that turned out to have no LoRA; factors without a base are an error."""
        orphans = []
        for module, p in list(self.pending.items()):
            if "base" in p and not {"lora_A", "lora_B"} & set(p):
                yield p["base"]
            else:
                have = sorted(k for k in p if k != "base") or "no LoRA factors"
                orphans.append(f"{module}: has {have}{' and' if 'base' in p else ' but no'} base weight")
        self.pending.clear()
        if orphans:
            raise ConversionError("incomplete LoRA (base weight, lora_A, lora_B):\n  " + "\n  ".join(orphans))


def resize_rows(arr: np.ndarray, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """Append `vocab - V` rows ~ N(0, 0.02) to an embedding / lm_head matrix [V, C] (HF 4.31 resize)."""
    new = rng.normal(0.0, RESIZE_INIT_STD, size=(vocab - arr.shape[0], arr.shape[1])).astype(arr.dtype)
    return np.concatenate([np.asarray(arr), new], axis=0)


class _Written:
    """Placeholder left in `Converter.out` for a leaf already on disk (keeps `finish()`'s coverage checks)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, a):
        self.shape, self.dtype = a.shape, a.dtype


def precheck(
    conv: Converter, keys: Iterable[str], *, complete: bool, consumed: Callable[[str], bool]
) -> None:
    """Key-level dry run before any tensor is read: unknown keys always, unfilled leaves if `complete`."""
    unmatched = []
    for k in keys:
        if consumed(k) or any(p.fullmatch(k) for p in conv.ignore):
            continue
        t = conv.map_key(k)
        if t is None:
            unmatched.append(k)
        else:
            conv.out.setdefault(t, None)
    problems = []
    if unmatched:
        problems.append(
            f"{len(unmatched)} source keys match no rule and no ignore pattern:\n  "
            + "\n  ".join(sorted(unmatched))
        )
    miss = conv.missing() if complete else []
    if miss:
        problems.append(f"{len(miss)} target leaves have no source key:\n  " + "\n  ".join(miss))
    if problems:
        raise ConversionError("\n".join(problems))


@dataclasses.dataclass
class ConversionReport:
    out_dir: Path
    leaves: int
    bytes_read: int
    bytes_written: int
    seconds: float
    ignored: list[str]
    uninitialized: list[str]
    lora_merged: list[str]
    # config.json (and --clip's vision config) attributes read_jax does not use, and values it translated.
    config_unused: list[str] = dataclasses.field(default_factory=list)
    clip_config_unused: list[str] = dataclasses.field(default_factory=list)
    config_notes: list[str] = dataclasses.field(default_factory=list)


# ---- the driver --------------------------------------------------------------------------------------------
def convert_read_checkpoint(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    clip_dir: str | os.PathLike | None = None,
    sam_path: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
    base: str = "auto",
    resize_vocab: bool = False,
    lora_alpha: float | None = None,
    seed: int = 0,
    part_bytes: int | None = None,
    compress: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    strict: bool = False,
    allow_nonfinite: bool = False,
    model_fn: Callable[[rc.ReadConfig], Callable[[], Any]] | None = None,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Convert a READ/SESAME (or LLaVA-1.5 base + SAM) HF directory into a read_jax checkpoint at `out_dir`.

    Args:
      hf_dir: `save_pretrained` directory: config.json, weights (`.bin` or `.safetensors`, sharded with an
        index json, or single), tokenizer files.
      out_dir: created atomically (written to a temporary sibling, renamed at the end; removed on error).
      clip_dir: HF CLIP directory for the vision tower (READ releases do not contain it, §10.1).
      sam_path: Meta's SAM `.pth`; replaces the checkpoint's `model.visual_model.*` (from-scratch inits).
      dtype: parameter dtype of the converted leaves ('bfloat16'/'bf16' or 'float32'/'fp32').
      base: ReadConfig factory for SAM/SasP/LoRA sizes ('auto': read_7b/read_13b by hidden size).
      resize_vocab: accept a 32000-row vocabulary and append the 3 READ tokens.
      lora_alpha: for unmerged PEFT checkpoints (default: adapter_config.json, else the base LoraConfig).
      seed: of the --resize-vocab rows.
      part_bytes: converted bytes buffered per orbax part (the memory knob; default 256 MiB).
      compress: zstd in the orbax parts (~20% smaller for bf16 weights, a little more memory per part).
      strict: refuse config.json (and --clip vision-config) attributes read_jax does not use, instead of
        recording them in conversion.json and logging them on one warning line.
      allow_nonfinite: convert leaves holding NaN/Inf (listed in conversion.json) instead of refusing them.
      model_fn: cfg -> zero-arg builder of the target model (default `ReadModel`).
      log: where the one-line summaries go.
    Returns:
      A ConversionReport. Raises ConfigError / CheckpointFileError / ConversionError, each listing every
      problem found, before writing anything whenever the problem is visible without reading tensors.
    """
    from tqdm.auto import tqdm

    from read_jax import checkpoint as ck

    t0 = time.time()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    clip_dir = None if clip_dir is None else Path(clip_dir)
    sam_path = None if sam_path is None else Path(sam_path)
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
    if dtype not in ("bfloat16", "float32"):
        raise rc.ConfigError(f"dtype {dtype!r}: use bfloat16 (bf16) or float32 (fp32)")
    inputs = (hf_dir, clip_dir, sam_path)
    ck.check_output(out_dir, overwrite=overwrite, inputs=inputs)  # before any input is read

    # ---- inputs: config, tokenizer, files ----
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise rc.ConfigError(f"{cfg_path}: not found ({hf_dir} is not an HF checkpoint directory)")
    hf = _read_json(cfg_path)
    family = family_of(hf)
    checks.require_sizes(hf, cfg_path)
    vt = hf.get("mm_vision_tower") or hf.get("vision_tower")
    if vt and clip_dir is not None:
        log(
            f"config.json names the vision tower {vt!r} (a path on the training machine, §10.3): "
            f"using --clip {clip_dir}"
        )
    cfg = build_config(
        hf, clip_dir=clip_dir, base=base, dtype=dtype, resize_vocab=resize_vocab, strict=strict
    )
    audit = rc.audit_hf_config(hf)
    clip_unused = [] if clip_dir is None else clip_config_unused(clip_dir)
    if audit.unused or clip_unused or audit.notes:
        log(
            "warning: attributes read_jax does not use (recorded in conversion.json; --strict refuses them): "
            f"config.json {list(audit.unused)}"
            + (f", CLIP config.json {clip_unused}" if clip_unused else "")
            + "".join(f"; {n.split(':')[0]} accepted" for n in audit.notes)
        )
    tok_files, added_tokens = check_tokenizer(hf_dir, resize_vocab=resize_vocab)
    sources = [hf_source("checkpoint", hf_dir)]
    if clip_dir is not None:
        sources.append(hf_source("clip", clip_dir))
    if sam_path is not None:
        sources.append(file_source("sam", sam_path))
    if lora_alpha is None:
        adapter = hf_dir / "adapter_config.json"
        lora_alpha = (_read_json(adapter).get("lora_alpha") if adapter.is_file() else None) or (
            cfg.lora.alpha if cfg.lora is not None else 16.0
        )

    # ---- target and tables: one Converter per source, all filling one shared `out` ----
    target = target_leaves((model_fn or default_model_fn)(cfg))
    merge = not any(p.endswith(("/lora_a", "/lora_b")) for p in target)
    rules = {
        "checkpoint": read_rules()
        + peft_read_rules()
        + ([] if merge else lora_rules())
        + ([] if clip_dir is not None else vision_tower_rules()),
        "clip": clip_dir_rules(),
        "sam": sam_pth_rules(),
    }
    ignore = {
        "checkpoint": read_ignore(clip_given=clip_dir is not None, sam_given=sam_path is not None),
        "clip": clip_dir_ignore(),
        "sam": list(SAM_IGNORE),
    }
    allow_unfilled = list(ck.DEFAULT_ALLOW_MISSING)
    if family == "llava":  # a LLaVA-1.5 base: text_hidden_fcs is new in READ (torch default init, §2.6)
        allow_unfilled.append(r"text_hidden_fcs/.*")
    shared_out: dict[str, Any] = {}
    convs = {}
    for s in sources:
        convs[s.name] = Converter(rules[s.name], target, ignore=ignore[s.name], allow_unfilled=allow_unfilled)
        convs[s.name].out = shared_out  # a leaf filled from two sources is reported as "filled twice"

    # ---- key-level precheck: fail fast on unknown keys, and on unfilled leaves when every key is known ----
    ck_keys = sources[0].keys
    lora_modules = None if ck_keys is None else {m.group(1) for k in ck_keys if (m := _LORA_KEY.fullmatch(k))}
    consumed = (lambda k: _LORA_KEY.fullmatch(k) is not None) if merge else (lambda k: False)
    known = [s for s in sources if s.keys is not None]
    try:
        for i, s in enumerate(known):
            dry = Converter(rules[s.name], target, ignore=ignore[s.name], allow_unfilled=allow_unfilled)
            dry.out = shared_out  # accumulate coverage over the sources; reset below
            complete = len(known) == len(sources) and i == len(known) - 1
            precheck(dry, s.keys, complete=complete, consumed=consumed)
    except ConversionError as e:
        raise ConversionError(f"{hf_dir}: {e}{_hint(clip_dir, vt, str(e))}") from None
    finally:
        shared_out.clear()

    # ---- stream: shard by shard, tensor by tensor, into orbax parts in a temporary directory ----
    with ck.atomic_directory(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        writer = ck.PartWriter(tmp / ck.PARAMS_DIR, part_bytes or ck.DEFAULT_PART_BYTES, compress=compress)
        rng = np.random.default_rng(seed)
        merger = LoraMerger(float(lora_alpha), lora_modules) if merge else None
        bar = tqdm(
            total=sum(s.nbytes for s in sources),
            unit="B",
            unit_scale=True,
            desc="convert",
            disable=not progress,
        )
        read_bytes = 0
        nonfinite = checks.NonFinite()

        def add(conv: Converter, key: str, arr: np.ndarray, where: Path):
            n_out, n_err = len(conv.out), len(conv.errors)
            if np.dtype(arr.dtype) not in _FLOATS and not any(p.fullmatch(key) for p in conv.ignore):
                conv.errors.append(f"{key}: dtype {arr.dtype} is not a floating-point type")
            else:
                if resize_vocab and _EMBED_KEYS.fullmatch(key) and arr.shape[0] == rc.SEG_TOKEN_ID:
                    arr = resize_rows(arr, cfg.llama.vocab_size, rng)
                conv.add(key, arr)
            if len(conv.errors) > n_err:
                conv.errors[-1] += f" (in {where.name})"
            if len(conv.out) > n_out:
                path = next(reversed(conv.out))
                nonfinite.check(key, path, conv.out[path], where)
                writer.add(path, conv.out[path])
                conv.out[path] = _Written(conv.out[path])

        for s in sources:
            conv = convs[s.name]
            stage = merger if (merger is not None and s.name == "checkpoint") else None
            for f in s.files:
                bar.set_postfix_str(f"{s.name}: {f.name}")
                seen, file_bytes = set(), 0
                for key, arr in io.iter_tensors(f):
                    seen.add(key)
                    file_bytes += arr.nbytes
                    for k, a in stage.feed(key, arr) if stage else [(key, arr)]:
                        add(conv, k, a, f)
                    bar.update(arr.nbytes)
                read_bytes += file_bytes
                bar.update(max(0, f.stat().st_size - file_bytes))  # headers, pickle
                expected = None if s.expected_keys is None else s.expected_keys[f]
                if expected is not None and seen != expected:
                    conv.errors.append(
                        f"{f}: does not hold the keys its index lists (missing "
                        f"{sorted(expected - seen)}, unlisted {sorted(seen - expected)})"
                    )
            if stage is not None:
                for k, a in stage.finish():
                    add(conv, k, a, s.files[-1])
        bar.close()

        # ---- one error listing everything ----
        problems = []
        for conv in convs.values():
            try:
                conv.finish()
            except ConversionError as e:
                problems.append(str(e))
        if nonfinite.found and not allow_nonfinite:
            problems.append(str(nonfinite.error()))
        if problems:
            msg = "\n".join(_dedupe(problems))
            raise ConversionError(f"{hf_dir}: {msg}{_hint(clip_dir, vt, msg)}")

        # ---- config, tokenizer, provenance; then the atomic rename ----
        uninit = sorted(p for p in target if p not in shared_out)
        ignored = sorted(set().union(*(c.ignored for c in convs.values())))
        merged = sorted(merger.merged) if merger else []
        writer.close(extra={"uninitialized": uninit})
        (tmp / ck.CONFIG).write_text(json.dumps(rc.config_to_dict(cfg), indent=1))
        shutil.copyfile(cfg_path, tmp / ck.HF_CONFIG)
        (tmp / "conversion.json").write_text(
            json.dumps(
                {
                    "source": str(hf_dir),
                    "family": family,
                    "clip": None if clip_dir is None else str(clip_dir),
                    "sam": None if sam_path is None else str(sam_path),
                    "dtype": dtype,
                    "resize_vocab": resize_vocab,
                    "lora_merged": merged,
                    "lora_alpha": lora_alpha,
                    "ignored_keys": ignored,
                    "uninitialized": uninit,
                    "config_unused_attributes": list(audit.unused),
                    "clip_config_unused_attributes": clip_unused,
                    "config_notes": list(audit.notes),
                    "nonfinite_leaves": nonfinite.found,
                },
                indent=1,
            )
        )
        (tmp / ck.TOKENIZER_DIR).mkdir()
        for f in tok_files:
            shutil.copyfile(f, tmp / ck.TOKENIZER_DIR / f.name)
        if added_tokens is not None:
            (tmp / ck.TOKENIZER_DIR / "added_tokens.json").write_text(json.dumps(added_tokens))
    if nonfinite.found:
        log(nonfinite.warning())
    report = ConversionReport(
        out_dir,
        len(shared_out),
        read_bytes,
        writer.written_bytes,
        time.time() - t0,
        ignored,
        uninit,
        merged,
        list(audit.unused),
        clip_unused,
        list(audit.notes),
    )
    log(
        f"converted {report.leaves} leaves, {report.bytes_read / 2**20:.0f} MiB read, "
        f"{report.bytes_written / 2**20:.0f} MiB written in {report.seconds:.1f} s -> {out_dir}"
        + (f"; left to their init: {uninit}" if uninit else "")
    )
    return report


def _dedupe(problems: list[str]) -> list[str]:
    """The per-source converters all report the same unfilled leaves: keep each block once."""
    out: list[str] = []
    for p in problems:
        for block in re.split(r"\n(?=\d+ (?:source keys|mapping errors|target leaves))", p):
            if block not in out:
                out.append(block)
    return out


def _hint(clip_dir: Path | None, vt: str | None, msg: str) -> str:
    if clip_dir is None and VISION_TOWER in msg:
        return (
            f"\n(READ releases do not contain the CLIP vision tower; config.json names {vt!r}, a path on "
            f"the training machine: pass --clip DIR with the HF {HF_CLIP_336} directory)"
        )
    return ""
