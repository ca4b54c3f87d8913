"""The converter's input checks, all before any tensor is read: the family, the ReadConfig, the tokenizer.

Families (`architectures[0]` of config.json -> `family_of`):

  read, sesame, llama   READ / SESAME releases: vocabulary 32003 with [SEG]=32000, <im_start>=32001,
                        <im_end>=32002 (read_reference.md §2.3), CLIP ViT-L/14-336 from --clip. SESAME
                        (SESAMEForCausalLM) prompts SAM with the [SEG] token alone: `sasp.enabled` is False,
                        as for LISA; READ's fine-tune of it (`configs/`) switches SasP on.
  lisa                  LISA releases (LISAForCausalLM). Their CLIP is whatever the config names (LISA's
                        default is openai/clip-vit-large-patch14: 224 px, 16 x 16 = 256 image tokens),
                        the projector is LLaVA-v1's single Linear (LISA's own code) or mlp2x_gelu (forks
                        on LLaVA-1.5), the vocabulary one of `LISA_TOKEN_LAYOUTS`. SAM is prompted with
                        the [SEG] token alone, as LISA was trained: `sasp.enabled` is False (switch it on
                        to add SasP's points, Appendix E), the SasP grid derived from the CLIP grid.
  llava                 a LLaVA-1.5 base (LlavaLlamaForCausalLM, vocabulary 32000): `--resize-vocab` appends
                        the 3 READ rows; SAM from `--sam`; text_hidden_fcs keeps its init.
  llava_hf              transformers' LLaVA (`read_jax.convert.llava_hf`): the same base in llava-hf's layout.

Reference: read_reference.md §2.3, §10, §12; LISA `model/LISA.py`, `model/llava/model/llava_arch.py`,
`chat.py` (dvlab-research/LISA).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from read_jax import config as rc
from read_jax import hf_config as hc
from read_jax.convert import checks, llava_hf

SEG_TOKENS = {"[SEG]": rc.SEG_TOKEN_ID, "<im_start>": rc.IM_START_TOKEN_ID, "<im_end>": rc.IM_END_TOKEN_ID}
# LISA's vocabularies (`added_tokens.json` of its releases), by size. LISA-7B-v1 added <im_patch> first and
# [SEG] last (xinlai/LISA-7B-v1); LISA-13B-llama2-v1 and LISA forks on LLaVA-1.5 add READ's three.
LISA_TOKEN_LAYOUTS = {
    32003: SEG_TOKENS,
    32004: {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002, "[SEG]": 32003},
}
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "generation_config.json",
)
HF_CLIP_336 = "openai/clip-vit-large-patch14-336"
ARCHITECTURES = {
    "READForCausalLM": "read",
    "SESAMEForCausalLM": "sesame",
    "LISAForCausalLM": "lisa",
    "LlavaLlamaForCausalLM": "llava",
    "LlamaForCausalLM": "llama",
    **dict.fromkeys(hc.LLAVA_HF_ARCHITECTURES, "llava_hf"),
}
# The conversation template each family's own chat used: READ's demo (vicuna_v1, §2.3), LISA's `chat.py`
# (`--conv_type llava_v1`). `read_jax.cli.chat` uses it unless --template says otherwise.
CHAT_TEMPLATES = {"lisa": "llava_v1"}
DEFAULT_CHAT_TEMPLATE = "vicuna_v1"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise rc.ConfigError(f"{path}: invalid json ({e})") from e


def family_of(hf: Mapping[str, Any]) -> str:
    """'read' | 'sesame' | 'lisa' | 'llava' | 'llava_hf' | 'llama' from `architectures`.

    Refuses, with a one-line ConfigError naming architecture and projector, a LLaVA-v1 style (single-Linear)
    projector on anything but LISA.
    """
    arch = hc.hf_architecture(hf)
    family = ARCHITECTURES[arch]
    proj = hc.hf_projector_type(hf)
    if family not in ("llama", "llava_hf") and proj not in hc.PROJECTORS.get(arch, hc.DEFAULT_PROJECTORS):
        which = (
            f"with mm_projector_type={proj!r}" if "mm_projector_type" in hf else "without mm_projector_type"
        )
        raise rc.ConfigError(
            f"config.json: architecture {arch!r} {which} is a LLaVA-v1 style checkpoint (a single-Linear "
            "mm_projector), but read_jax implements LLaVA-1.5's mlp2x_gelu projector for it (the linear one "
            "for LISAForCausalLM only)"
        )
    return family


def chat_template(family: str) -> str:
    return CHAT_TEMPLATES.get(family, DEFAULT_CHAT_TEMPLATE)


def source_vocab_size(hf: Mapping[str, Any]) -> int:
    """The embedding rows the checkpoint holds."""
    text = hf["text_config"] if hc.is_llava_hf(hf) else hf
    return text.get("vocab_size", hc.HF_LLAMA_DEFAULTS["vocab_size"])


# ---- CLIP -------------------------------------------------------------------------------------------------
def _clip_vision_config(clip_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(config.json path, the vision config dict) of an HF `CLIPVisionModel` or `CLIPModel` directory.

    For a `CLIPModel` only `vision_config` is read: its text tower and projections are dropped on purpose
    (`CLIP_MODEL_EXTRA_IGNORE`), like LLaVA's `CLIPVisionModel.from_pretrained` does.
    """
    path = clip_dir / "config.json"
    if not path.is_file():
        raise rc.ConfigError(f"{path}: not found (--clip must be an HF CLIP directory)")
    hf = read_json(path)
    if hf.get("model_type") == "clip":
        return path, {"model_type": "clip_vision_model", **(hf.get("vision_config") or {})}
    if hf.get("model_type") != "clip_vision_model":
        raise rc.ConfigError(f"{path}: model_type {hf.get('model_type')!r} is not a CLIP vision model")
    return path, hf


def clip_config_unused(clip_dir: Path) -> list[str]:
    """The attributes of --clip's vision config that read_jax does not use (recorded in conversion.json)."""
    return hc.audit_clip_vision(_clip_vision_config(clip_dir)[1])[1]


def clip_config_from_hf(
    clip_dir: Path, *, select_layer: int, dtype: str, strict: bool = False
) -> rc.ClipVisionConfig:
    """ClipVisionConfig from an HF `CLIPVisionModel` or `CLIPModel` directory's config.json.

    Raises ConfigError naming the attribute and value read_jax cannot honour (a hidden_act other than
    quick_gelu/gelu, dropout), and with `strict` any vision-config attribute it does not use.
    """
    path, hf = _clip_vision_config(clip_dir)
    return hc.clip_vision_config(hf, select_layer=select_layer, dtype=dtype, where=str(path), strict=strict)


# An openai CLIP directory name: clip-vit-large-patch14 (224 pixels) or clip-vit-large-patch14-336.
_OPENAI_CLIP_NAME = re.compile(r"clip-vit-(?:base|large)-patch(\d+)(?:-(\d+))?")


def _named_clip_geometry(name: str) -> tuple[int, int] | None:
    """(patch size, image size) that a vision-tower path names, when it names an openai CLIP directory."""
    m = _OPENAI_CLIP_NAME.fullmatch(name.rstrip("/").rsplit("/", 1)[-1])
    return None if m is None else (int(m.group(1)), int(m.group(2) or 224))


# ---- tokenizer --------------------------------------------------------------------------------------------
def _found_tokens(tok_dir: Path, sp) -> dict[str, tuple[int, str]]:
    """token -> (id, the file that gives it) over every tokenizer file; refuses files that disagree, and a
    tokenizer_config.json whose add_bos_token/add_eos_token would change the ids of READ's prompts."""
    found: dict[str, tuple[int, str]] = {}

    def note(tok: str, idx: int, where: str):
        if tok in found and found[tok][0] != idx:
            raise rc.ConfigError(
                f"{tok_dir}: {tok} has id {found[tok][0]} in {found[tok][1]} but {idx} in {where}"
            )
        found.setdefault(tok, (int(idx), where))

    for tok in (*SEG_TOKENS, "<im_patch>"):
        if sp.piece_to_id(tok) != sp.unk_id():  # a piece of the SentencePiece model itself
            note(tok, sp.piece_to_id(tok), "tokenizer.model")
    if (tok_dir / "added_tokens.json").is_file():
        for tok, idx in read_json(tok_dir / "added_tokens.json").items():
            note(tok, idx, "added_tokens.json")
    if (tok_dir / "tokenizer_config.json").is_file():
        tok_cfg = read_json(tok_dir / "tokenizer_config.json")
        bos, eos = tok_cfg.get("add_bos_token", True), tok_cfg.get("add_eos_token", False)
        if bos is not True or eos not in (None, False):
            raise rc.ConfigError(
                f"{tok_dir / 'tokenizer_config.json'}: add_bos_token={bos!r}, add_eos_token={eos!r}; READ's "
                "prompts need LLaMA's BOS prepended and no EOS appended (true / false)"
            )
        for idx, d in (tok_cfg.get("added_tokens_decoder") or {}).items():
            note(d["content"], int(idx), "tokenizer_config.json")
    if (tok_dir / "tokenizer.json").is_file():
        for d in read_json(tok_dir / "tokenizer.json").get("added_tokens") or []:
            note(d["content"], int(d["id"]), "tokenizer.json")
    return found


def check_tokenizer(
    tok_dir: Path, *, resize_vocab: bool, family: str = "read", cfg: rc.ReadConfig | None = None
) -> tuple[list[Path], dict[str, int] | None]:
    """Find the tokenizer files and check that they give the token ids the model has (§2.3).

    READ/SESAME: [SEG]/<im_start>/<im_end> = 32000/32001/32002; LISA: the layout of its vocabulary size
    (`cfg`'s ids); llava-hf: its own added tokens (<image>, <pad>) are dropped with their rows and READ's
    three written instead. Also refuses a tokenizer_config.json whose add_bos_token/add_eos_token would
    change the ids READ's prompts get, and, with `resize_vocab` on a LLaVA base, added tokens that already
    hold the ids the three READ tokens would get.

    Returns:
      (files to copy, the added tokens to write when the converter adds them, else None). Raises ConfigError
      naming the file that gives [SEG] another id (cf. LISA issue #55 for such tokenizer mix-ups).
    """
    sp_path = tok_dir / "tokenizer.model"
    if not sp_path.is_file():
        raise rc.ConfigError(f"{tok_dir}: no tokenizer.model (the LLaMA SentencePiece model is required)")
    sp = checks.load_sentencepiece(sp_path)
    base = sp.get_piece_size()
    found = _found_tokens(tok_dir, sp)
    if family == "llava_hf":
        files = llava_hf.check_tokenizer(tok_dir, base, {t: i for t, (i, _) in found.items()})
        return files, dict(SEG_TOKENS)
    files = [tok_dir / n for n in TOKENIZER_FILES if (tok_dir / n).is_file()]
    want, who = SEG_TOKENS, "READ"
    if cfg is not None and family == "lisa":
        want, who = LISA_TOKEN_LAYOUTS[cfg.llama.vocab_size], f"this LISA (vocab_size {cfg.llama.vocab_size})"
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
    for tok, idx_want in want.items():
        if tok not in found:
            raise rc.ConfigError(
                f"{tok_dir}: the tokenizer has [SEG] but no {tok} ({who} needs {tok}={idx_want})"
            )
        idx, where = found[tok]
        if idx != idx_want:
            raise rc.ConfigError(
                f"{tok_dir / where}: {tok} has id {idx}, {who} needs {idx_want} "
                f"(read_reference.md §2.3: the ids are baked into the model and the data)"
            )
    # READ's ids are right; anything else added is refused (read_jax's tokenizer would refuse it at load).
    checks.refuse_extra_added_tokens(found, want, base, tok_dir)
    return files, None


# ---- the ReadConfig ---------------------------------------------------------------------------------------
def _vocabulary(hf, family: str, llama: rc.LlamaConfig, resize_vocab: bool) -> tuple[rc.LlamaConfig, dict]:
    """(the LLaMA config with the converted vocabulary size, the added tokens' ids)."""
    vocab = source_vocab_size(hf)
    if family == "llava_hf":
        if not resize_vocab:
            raise rc.ConfigError(llava_hf.RESIZE_NEEDED.format(vocab=vocab))
        if type(vocab) is not int or vocab < rc.SEG_TOKEN_ID:
            raise rc.ConfigError(f"config.json: text_config.vocab_size={vocab!r} is below LLaMA's 32000")
        return dataclasses.replace(llama, vocab_size=rc.VOCAB_SIZE), SEG_TOKENS
    if family == "lisa":
        if vocab not in LISA_TOKEN_LAYOUTS:
            raise rc.ConfigError(
                f"config.json: vocab_size {vocab!r}: LISA releases have "
                + " or ".join(f"{n} ({dict(t)})" for n, t in LISA_TOKEN_LAYOUTS.items())
            )
        return llama, LISA_TOKEN_LAYOUTS[vocab]
    if vocab == rc.SEG_TOKEN_ID and resize_vocab:
        return dataclasses.replace(llama, vocab_size=rc.VOCAB_SIZE), SEG_TOKENS
    if vocab == rc.SEG_TOKEN_ID:
        raise rc.ConfigError(
            "config.json: vocab_size 32000 (a plain LLaVA/LLaMA vocabulary); READ checkpoints have 32003 "
            "([SEG], <im_start>, <im_end>). Pass --resize-vocab to append the 3 rows (N(0, 0.02) init, as HF "
            "resize_token_embeddings does) for a from-scratch init"
        )
    if vocab != rc.VOCAB_SIZE:
        raise rc.ConfigError(f"config.json: vocab_size {vocab}, READ needs {rc.VOCAB_SIZE}")
    return llama, SEG_TOKENS


def _base_config(base: str, hidden: int, dtype: str) -> tuple[str, rc.ReadConfig]:
    factories = {
        "read_7b": rc.ReadConfig.read_7b,
        "read_13b": rc.ReadConfig.read_13b,
        "tiny": lambda: rc.ReadConfig.tiny(dtype),
        "shapes": lambda: rc.ReadConfig.shapes(dtype),  # the tiny SESAME release (configs/tiny.py)
        "smoke": lambda: rc.ReadConfig.smoke(dtype),
    }
    if base == "auto":
        base = {4096: "read_7b", 5120: "read_13b"}.get(hidden)
        if base is None:
            raise rc.ConfigError(f"hidden_size {hidden}: pass --base ({', '.join(sorted(factories))})")
    if base not in factories:
        raise rc.ConfigError(f"unknown --base {base!r}; choose from {sorted(factories)}")
    return base, factories[base]().with_dtype(dtype)


def build_config(
    hf: Mapping[str, Any],
    *,
    clip_dir: Path | None,
    base: str,
    dtype: str,
    resize_vocab: bool,
    strict: bool = False,
) -> rc.ReadConfig:
    """ReadConfig of a checkpoint: LLaMA from config.json, CLIP from --clip (llava-hf: its vision_config),
    SAM/SasP/LoRA from `base`, the SasP grid on the CLIP grid, the projector and token ids of the family.

    `rc.from_hf_config` checks the computation-changing attributes (and with `strict` refuses unused ones);
    the ones only the converter can check are checked here: `mm_hidden_size` and `out_dim` against the CLIP
    and SAM configs (so that tiny test checkpoints can carry them too), `mm_vision_select_layer` against the
    CLIP depth, the vision tower the config names against the CLIP that is used (§10.3: the name is a path
    on the training machine, CLIP comes from --clip; an openai directory name still tells patch and image
    size), `unfreeze_mm_vision_tower` against --clip replacing a fine-tuned tower, and llava-hf's
    `image_seq_length` against its tower.
    """
    family = family_of(hf)
    llama, tokens = _vocabulary(hf, family, rc.from_hf_config(hf, dtype=dtype, strict=strict), resize_vocab)
    base, cfg = _base_config(base, llama.hidden_size, dtype)
    tower_src = f"--base {base}"
    if clip_dir is not None or family == "llava_hf":
        tower_src = "--clip DIR" if clip_dir is not None else "config.json's vision_config"
    clip = cfg.clip
    if clip_dir is not None:
        clip = clip_config_from_hf(clip_dir, select_layer=clip.select_layer, dtype=dtype, strict=strict)
    elif family == "llava_hf":
        clip = hc.clip_vision_config(
            hf["vision_config"], select_layer=clip.select_layer, dtype=dtype, where=tower_src
        )
    key = "vision_feature_layer" if family == "llava_hf" else "mm_vision_select_layer"
    select = hf.get(key, clip.select_layer)
    try:
        clip = dataclasses.replace(clip, select_layer=select)
    except rc.ConfigError:
        raise rc.ConfigError(
            f"config.json: {key}={select!r} is outside the {clip.num_hidden_layers}-layer CLIP tower of "
            f"{tower_src}"
        ) from None
    # The base's SasP setting is on the base's own CLIP grid (READ-7B's 12 of 24; the small presets' own).
    sasp = cfg.sasp.on_clip_grid(clip.grid_size, reference_grid=cfg.clip.grid_size)
    if family in ("lisa", "sesame"):  # trained with the [SEG] prompt alone; a READ fine-tune switches it on
        sasp = dataclasses.replace(sasp, enabled=False)
    cfg = cfg.replace(
        llama=llama,
        clip=clip,
        sasp=sasp,
        mm_projector_type=hc.hf_projector_type(hf) or "mlp2x_gelu",
        seg_token_id=tokens["[SEG]"],
        im_start_token_id=tokens["<im_start>"],
        im_end_token_id=tokens["<im_end>"],
    )
    problems = _tower_problems(hf, family, cfg, clip_dir, tower_src, base)
    if problems:
        raise rc.ConfigError("config.json: " + "; ".join(problems))
    return cfg


def _tower_problems(hf, family: str, cfg: rc.ReadConfig, clip_dir, tower_src: str, base: str) -> list[str]:
    clip = cfg.clip
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
    seq = hf.get("image_seq_length") if family == "llava_hf" else None
    if seq is not None and seq != clip.num_patches:
        problems.append(f"image_seq_length={seq!r} != the {clip.num_patches} patches of {tower_src}")
    return problems
