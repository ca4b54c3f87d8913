"""READ / SESAME / LISA / LLaVA-1.5 checkpoints -> read_jax: the key tables and the streaming driver.

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

READ vs SESAME vs LISA (§12): READ is trained from SESAME and shares its layout and config. LISA releases
share it too, with their own CLIP (224 px), projector (LISA's code: LLaVA-v1's single Linear,
`model.mm_projector.{weight,bias}`) and vocabulary (`read_jax.convert.inputs.LISA_TOKEN_LAYOUTS`).
LLaVA-1.5 bases (`LlavaLlamaForCausalLM`, vocab 32000) are accepted for from-scratch inits with
`--resize-vocab` (3 new rows ~ N(0, 0.02), as HF 4.31 `resize_token_embeddings`) and `--sam`;
`text_hidden_fcs` then keeps its init, and the checkpoint records that. The same base in transformers'
llava-hf layout has its own table and vocabulary rule (`read_jax.convert.llava_hf`). The input checks (family,
ReadConfig, tokenizer) are `read_jax.convert.inputs`.

config.json policy (`read_jax.hf_config.audit_hf_config`, `inputs.build_config`): every attribute that
changes the computation is mapped or checked, and a value read_jax cannot honour is refused naming attribute
and value; the others (bookkeeping, training flags, what newer releases add) are listed in conversion.json
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from read_jax import config as rc
from read_jax.convert import checks, inputs, io, llava_hf
from read_jax.convert.clip import (
    CLIP_VISION_IGNORE,
    LLAVA_VISION_TOWER_PREFIX,
    clip_rules,
    mm_projector_rules,
)
from read_jax.convert.common import (
    LANGUAGE_MODEL,
    MM_PROJECTOR,
    VISION_TOWER,
    VISUAL_MODEL,
    ConversionError,
    Converter,
    Rule,
    linear,
    prefixed,
)
from read_jax.convert.inputs import (  # noqa: F401 - the converter's public names, re-exported
    ARCHITECTURES,
    HF_CLIP_336,
    SEG_TOKENS,
    TOKENIZER_FILES,
    build_config,
    check_tokenizer,
    clip_config_from_hf,
    clip_config_unused,
    family_of,
)
from read_jax.convert.llama import LLAMA_IGNORE, LLAMA_RULES, PEFT_BASE_RULES, PEFT_LORA_RULES
from read_jax.convert.sam import SAM_IGNORE, sam_rules
from read_jax.convert.stream import (  # noqa: F401 - resize_rows, RESIZE_INIT_STD: re-exported
    LORA_KEY,
    PEFT_PREFIX,
    RESIZE_INIT_STD,
    LoraMerger,
    Source,
    file_source,
    hf_source,
    resize_rows,
    resize_vocab_rows,
)

SAM_PREFIX = "model.visual_model."

# ---- key tables --------------------------------------------------------------------------------------------

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


def read_rules(projector: str = "mlp2x_gelu") -> list[Rule]:
    """The READ/SESAME/LISA checkpoint table in the released (merged) layout; invertible for export.

    `projector`: "mlp2x_gelu" (`model.mm_projector.{0,2}.*`) or "linear" (LISA's `model.mm_projector.*`)."""
    return (
        prefixed(LLAMA_RULES, "", LANGUAGE_MODEL)
        + mm_projector_rules(dst_prefix=MM_PROJECTOR, kind=projector)
        + TEXT_HIDDEN_FCS_RULES
        + sam_rules(SAM_PREFIX, VISUAL_MODEL)
    )


def peft_read_rules(projector: str = "mlp2x_gelu") -> list[Rule]:
    """The same checkpoint wrapped by PEFT (`base_model.model.` prefix; `base_layer` in newer peft)."""
    return (
        prefixed(PEFT_BASE_RULES, "", LANGUAGE_MODEL)
        + prefixed(mm_projector_rules(dst_prefix=MM_PROJECTOR, kind=projector), PEFT_PREFIX)
        + prefixed(TEXT_HIDDEN_FCS_RULES, PEFT_PREFIX)
        + sam_rules(PEFT_PREFIX + SAM_PREFIX, VISUAL_MODEL)
    )


def checkpoint_rules(family: str, cfg: rc.ReadConfig, *, clip_given: bool, merge: bool) -> list[Rule]:
    """The table of the checkpoint directory's own keys, for its family (`read_jax.convert.inputs`)."""
    if family == "llava_hf":
        return llava_hf.rules()
    proj = cfg.mm_projector_type
    return (
        read_rules(proj)
        + peft_read_rules(proj)
        + ([] if merge else lora_rules())
        + ([] if clip_given else vision_tower_rules())
    )


def checkpoint_ignore(family: str, *, clip_given: bool, sam_given: bool) -> list[str]:
    """Source-key regexes of the checkpoint directory dropped on purpose (see the module docstring)."""
    if family == "llava_hf":
        return llava_hf.ignore() + ([r"(?:model\.)?vision_tower\..*"] if clip_given else [])
    return read_ignore(clip_given=clip_given, sam_given=sam_given)


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


_FLOATS = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}


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
    input_paths = (hf_dir, clip_dir, sam_path)
    ck.check_output(out_dir, overwrite=overwrite, inputs=input_paths)  # before any input is read

    # ---- inputs: config, tokenizer, files ----
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise rc.ConfigError(f"{cfg_path}: not found ({hf_dir} is not an HF checkpoint directory)")
    hf = inputs.read_json(cfg_path)
    family = family_of(hf)
    if "text_config" not in hf:  # llava-hf nests its LLaMA config (and relies on transformers' defaults)
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
    source_vocab = inputs.source_vocab_size(hf)
    tok_files, added_tokens = check_tokenizer(hf_dir, resize_vocab=resize_vocab, family=family, cfg=cfg)
    sources = [hf_source("checkpoint", hf_dir)]
    if clip_dir is not None:
        sources.append(hf_source("clip", clip_dir))
    if sam_path is not None:
        sources.append(file_source("sam", sam_path))
    if lora_alpha is None:
        adapter = hf_dir / "adapter_config.json"
        lora_alpha = (inputs.read_json(adapter).get("lora_alpha") if adapter.is_file() else None) or (
            cfg.lora.alpha if cfg.lora is not None else 16.0
        )

    # ---- target and tables: one Converter per source, all filling one shared `out` ----
    target = target_leaves((model_fn or default_model_fn)(cfg))
    merge = not any(p.endswith(("/lora_a", "/lora_b")) for p in target)
    rules = {
        "checkpoint": checkpoint_rules(family, cfg, clip_given=clip_dir is not None, merge=merge),
        "clip": clip_dir_rules(),
        "sam": sam_pth_rules(),
    }
    ignore = {
        "checkpoint": checkpoint_ignore(
            family, clip_given=clip_dir is not None, sam_given=sam_path is not None
        ),
        "clip": clip_dir_ignore(),
        "sam": list(SAM_IGNORE),
    }
    allow_unfilled = list(ck.DEFAULT_ALLOW_MISSING)
    if family in ("llava", "llava_hf"):  # LLaVA-1.5 bases: text_hidden_fcs is new in READ (torch init, §2.6)
        allow_unfilled.append(r"text_hidden_fcs/.*")
    shared_out: dict[str, Any] = {}
    convs = {}
    for s in sources:
        convs[s.name] = Converter(rules[s.name], target, ignore=ignore[s.name], allow_unfilled=allow_unfilled)
        convs[s.name].out = shared_out  # a leaf filled from two sources is reported as "filled twice"

    # ---- key-level precheck: fail fast on unknown keys, and on unfilled leaves when every key is known ----
    ck_keys = sources[0].keys
    lora_modules = None if ck_keys is None else {m.group(1) for k in ck_keys if (m := LORA_KEY.fullmatch(k))}
    consumed = (lambda k: LORA_KEY.fullmatch(k) is not None) if merge else (lambda k: False)
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
    with ck.atomic_directory(out_dir, overwrite=overwrite, inputs=input_paths) as tmp:
        writer = ck.PartWriter(tmp / ck.PARAMS_DIR, part_bytes or ck.DEFAULT_PART_BYTES, compress=compress)
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
                if resize_vocab:
                    arr = resize_vocab_rows(key, arr, source_vocab, cfg.llama.vocab_size, seed)
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
                    "chat_template": inputs.chat_template(family),
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
