"""llava-hf (transformers' `LlavaForConditionalGeneration`) as a starting point: keys, vocabulary, tokens.

llava-hf/llava-1.5-7b-hf and -13b-hf are LLaVA-1.5 re-packaged by transformers' conversion script: the same
weights as liuhaotian/llava-v1.5-7b / -13b under other names, plus a vocabulary of 32064 rows.

Keys (`save_pretrained` of every transformers version writes the first form; transformers >= 4.52 holds the
second in memory, and a raw `state_dict()` dump has it):

    language_model.model.{embed_tokens,layers.*,norm}.*   model.language_model.{embed_tokens,layers.*,norm}.*
    language_model.lm_head.weight                         lm_head.weight
    vision_tower.vision_model.* (transformers 4)          model.vision_tower.*
      or vision_tower.* (transformers 5: no vision_model.)
    multi_modal_projector.linear_{1,2}.{weight,bias}      model.multi_modal_projector.linear_{1,2}.*

    -> llava/language_model/..., llava/vision_tower/vision_model/..., llava/mm_projector/layers/{0,2}/...
    (the READ tables of `read_jax.convert.{llama,clip}` under these prefixes). No text_hidden_fcs and no SAM:
    SAM comes from --sam and the fcs keep their init, as for the original LLaVA-1.5 base.

The vocabulary, and where READ's added tokens go. llava-hf appends `<image>` = 32000 and `<pad>` = 32001 to
LLaMA's 32000 pieces and pads the embedding and lm_head to 32064 rows; those 64 rows were made by the
conversion script (drawn around the mean of the trained rows), never trained by LLaVA-1.5, whose vocabulary is
LLaMA's 32000. READ needs [SEG] = 32000, <im_start> = 32001, <im_end> = 32002, so the ids collide with
<image> and <pad>. They are resolved in READ's favour: read_jax's image placeholder is -200 in the input
ids (LLaVA's IMAGE_TOKEN_INDEX, replaced by the image tokens before any embedding lookup), never a vocabulary
row, so llava-hf's rows 32000-32063 and its two added tokens are dropped, and READ's three rows are appended
exactly as `--resize-vocab` does for the original LLaVA-1.5 base (N(0, 0.02), the same seed). A llava-hf
directory therefore converts to the very checkpoint its liuhaotian original converts to. The converted
tokenizer is LLaMA's tokenizer.model with READ's added_tokens.json (llava-hf's tokenizer_config.json,
tokenizer.json and special_tokens_map.json name <image> and <pad>, and are not copied).
"""

from __future__ import annotations

import re
from pathlib import Path

from read_jax import config as rc
from read_jax.convert.clip import CLIP_VISION_IGNORE, HF_LLAVA_PROJECTOR_RULES, clip_rules
from read_jax.convert.common import LANGUAGE_MODEL, MM_PROJECTOR, VISION_TOWER, Rule, prefixed
from read_jax.convert.llama import LLAMA_RULES

RESIZE_NEEDED = (
    "config.json: a llava-hf vocabulary of {vocab} rows (LLaMA's 32000, then <image>=32000, <pad>=32001 and "
    "padding rows, never trained). READ needs [SEG]=32000, <im_start>=32001, <im_end>=32002: pass "
    "--resize-vocab to drop llava-hf's added rows and append READ's 3 (N(0, 0.02), as for a LLaVA-1.5 base)"
)
_VM = "vision_model."


def _vision_rules(src_prefix: str) -> list[Rule]:
    """CLIP under `src_prefix`, with (transformers 4) or without (5) the `vision_model.` level."""
    rules = clip_rules(src_prefix, VISION_TOWER)
    inner = re.escape(src_prefix + _VM)
    return rules + [
        Rule(re.escape(src_prefix) + r.source[len(inner) :], r.target, r.transform)
        for r in rules
        if r.source.startswith(inner)
    ]


def rules() -> list[Rule]:
    """Every llava-hf key (both layouts) -> the LlavaModel inside ReadModel."""
    new_llm = [
        Rule(r"model\.language_model\." + r.source[len(r"model\.") :], LANGUAGE_MODEL + r.target, r.transform)
        for r in LLAMA_RULES
        if r.source.startswith(r"model\.")
    ]
    head = [
        Rule(r.source, LANGUAGE_MODEL + r.target, r.transform) for r in LLAMA_RULES if "lm_head" in r.source
    ]
    return (
        prefixed(LLAMA_RULES, "language_model.", LANGUAGE_MODEL)
        + new_llm
        + head
        + _vision_rules("vision_tower.")
        + _vision_rules("model.vision_tower.")
        + prefixed(HF_LLAVA_PROJECTOR_RULES, "multi_modal_projector.", MM_PROJECTOR)
        + prefixed(HF_LLAVA_PROJECTOR_RULES, "model.multi_modal_projector.", MM_PROJECTOR)
    )


def ignore() -> list[str]:
    """Source keys dropped on purpose: RoPE's `inv_freq` buffer and CLIP's `position_ids` buffer."""
    vision = [p[len(r"vision_model\.") :] for p in CLIP_VISION_IGNORE]
    return [
        r"(?:model\.)?language_model\.(?:model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
        *(r"(?:model\.)?vision_tower\.(?:vision_model\.)?" + p for p in vision),
    ]


def check_tokenizer(tok_dir: Path, base: int, added: dict[str, int]) -> list[Path]:
    """The tokenizer files to copy: LLaMA's tokenizer.model only (its 32000 pieces are the rows kept).

    Raises ConfigError if the SentencePiece model is not LLaMA's 32000 pieces, or if an added token of
    llava-hf's sits inside them (it would then not be dropped with the rows above 32000).
    """
    if base != rc.SEG_TOKEN_ID:
        raise rc.ConfigError(
            f"{tok_dir / 'tokenizer.model'}: {base} pieces; llava-hf's rows are kept up to LLaMA's 32000"
        )
    inside = {t: i for t, i in added.items() if i < base}
    if inside:
        raise rc.ConfigError(f"{tok_dir}: added tokens {inside} have ids inside LLaMA's 32000 pieces")
    return [tok_dir / "tokenizer.model"]
