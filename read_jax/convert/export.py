"""read_jax parameters -> an HF READ directory (safetensors), loadable with the reference code's key names.

PyTorch reference: the released layout (read_reference.md §10.1-10.3): `model.embed_tokens.weight`,
`model.layers.*`, `model.mm_projector.{0,2}.*`, `model.text_hidden_fcs.0.{0,2}.*`, `model.visual_model.*`,
`lm_head.weight`; the CLIP vision tower is not part of it (it is written next to it, as an HF
`CLIPVisionModel` directory `vision_tower/`, so the export is self-contained).

The key names come from inverting the same tables the converter uses (`read_jax.convert.read.read_rules`
and `clip_dir_rules`, through the rule inversion of `common.export_leaves`) with the inverse transforms of
`common.INVERSE`, so convert -> export -> convert gives identical arrays (tested bit for bit).

LoRA (`.../q_proj/lora_a|lora_b` leaves, if the model carries them):
  * `merge_lora=True`: W [O, I] = kernel^T + (alpha / r) (A @ B)^T, the layout of the released checkpoints
    (peft `merge_and_unload`, §10.1); the factors are not written.
  * `merge_lora=False`: the unmerged PEFT layout (every key under `base_model.model.`, factors as
    `...q_proj.lora_A.default.weight` [R, I] / `lora_B.default.weight` [O, R]) plus an `adapter_config.json`.

Streaming: the output files are laid out from the leaf shapes first (`io.SafetensorsWriter`), then every
leaf is written into its slot as it is read, one checkpoint part (or one device array) at a time.

Shape letters: I/O Linear in/out features, R LoRA rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from read_jax import checkpoint as ck
from read_jax import config as rc
from read_jax.convert import io
from read_jax.convert.common import (
    INVERSE,
    ConversionError,
    Rule,
    _invert_rule,
    conv,
    conv_transpose,
    identity,
    linear,
)
from read_jax.convert.read import (
    HF_CLIP_336,
    LANGUAGE_MODEL,
    PEFT_PREFIX,
    VISION_TOWER,
    clip_dir_rules,
    read_rules,
)

# Output shape of each inverse transform, from the stored (Flax) shape; lets the files be laid out up front.
_SHAPE = {
    identity: lambda s: tuple(s),
    linear: lambda s: tuple(s[::-1]),
    conv: lambda s: (s[3], s[2], s[0], s[1]),
    conv_transpose: lambda s: (s[2], s[3], s[0], s[1]),
}
# The LoRA leaves in PEFT's key layout (an invertible spelling of `read_jax.convert.llama.PEFT_LORA_RULES`).
_ATTN = r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
PEFT_LORA_EXPORT_RULES = [
    Rule(
        _ATTN + r"\.lora_A\.default\.weight", LANGUAGE_MODEL + r"model/layers/\1/self_attn/\2/lora_a", linear
    ),
    Rule(
        _ATTN + r"\.lora_B\.default\.weight", LANGUAGE_MODEL + r"model/layers/\1/self_attn/\2/lora_b", linear
    ),
]
DEFAULT_MAX_SHARD_BYTES = 10 << 30  # transformers 4.31 save_pretrained default (§10.1)
_LORA_LEAF = re.compile(r"(.*)/lora_([ab])")


def invert_path(rules: Sequence[Rule], path: str) -> tuple[str, Callable]:
    """(source key, inverse transform) of a target path under a table; ConversionError if none matches."""
    for r in rules:
        key = _invert_rule(r, path)
        if key is not None:
            if r.transform not in INVERSE:
                raise ConversionError(f"{path}: rule {r.source} has no inverse transform")
            return key, r.transform
    raise ConversionError(f"{path}: no rule of the export table produces this leaf")


def _tower_name(clip: rc.ClipVisionConfig) -> str:
    """The vision tower a config.json names: openai's CLIP-L/14-336 (READ), else the `vision_tower/`
    directory the export writes beside the weights (a name that claims no openai geometry)."""
    if (clip.patch_size, clip.image_size, clip.hidden_size) == (14, 336, 1024):
        return HF_CLIP_336
    return "./vision_tower"


def hf_config_dict(cfg: rc.ReadConfig, base: Mapping[str, Any] | None, torch_dtype: str) -> dict:
    """The READ `config.json` (§10.3) for `cfg`, starting from the converted checkpoint's original if any."""
    out = (
        dict(base)
        if base
        else {
            # SESAME's class for a model without SasP (read_reference.md §10.3: READ's README has users edit
            # it to READForCausalLM before fine-tuning), READ's otherwise.
            "architectures": ["READForCausalLM" if cfg.sasp.enabled else "SESAMEForCausalLM"],
            "model_type": "llava",
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "rope_scaling": None,
            "pretraining_tp": 1,
            "initializer_range": 0.02,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_feature": "patch",
            "mm_use_im_start_end": True,
            "mm_use_im_patch_token": False,
            "image_aspect_ratio": "square",
            "train_mask_decoder": True,
            "mm_vision_tower": _tower_name(cfg.clip),
            "vision_tower": _tower_name(cfg.clip),
            "use_cache": False,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "transformers_version": "4.31.0",
        }
    )
    ll = cfg.llama
    out.update(
        vocab_size=ll.vocab_size,
        hidden_size=ll.hidden_size,
        intermediate_size=ll.intermediate_size,
        num_hidden_layers=ll.num_hidden_layers,
        num_attention_heads=ll.num_attention_heads,
        num_key_value_heads=ll.num_key_value_heads,
        rms_norm_eps=ll.rms_norm_eps,
        rope_theta=ll.rope_theta,
        max_position_embeddings=ll.max_position_embeddings,
        mm_hidden_size=cfg.clip.hidden_size,
        mm_vision_select_layer=cfg.clip.select_layer,
        out_dim=cfg.out_dim,
        torch_dtype=torch_dtype,
    )
    return out


def clip_config_dict(c: rc.ClipVisionConfig, torch_dtype: str) -> dict:
    """An HF `CLIPVisionModel` config.json for the vision tower."""
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "num_channels": c.num_channels,
        "layer_norm_eps": c.layer_norm_eps,
        "hidden_act": c.hidden_act,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": torch_dtype,
    }


class _Plan:
    """Every output tensor: which file, key, shape, dtype, and which leaf (or LoRA triplet) it comes from."""

    def __init__(
        self,
        leaves: Mapping[str, tuple[tuple[int, ...], np.dtype]],
        cfg: rc.ReadConfig,
        *,
        merge_lora: bool,
        dtype,
    ):
        lora = {m.group(1) for p in leaves if (m := _LORA_LEAF.fullmatch(p))}
        self.peft = bool(lora) and not merge_lora
        self.merge = bool(lora) and merge_lora
        self.scale = cfg.lora.scale if cfg.lora is not None else None
        if lora and self.scale is None:
            raise ConversionError("the model has LoRA leaves but its config has no LoraConfig (alpha?)")
        main_rules = read_rules() + (PEFT_LORA_EXPORT_RULES if self.peft else [])
        self.lora_modules = lora
        self.out: dict[str, dict[str, tuple]] = {"main": {}, "clip": {}}  # file group -> key -> spec
        self.by_leaf: dict[str, tuple[str, str, Callable]] = {}  # leaf -> (group, key, forward transform)
        for path, (shape, dt) in leaves.items():
            if self.merge and _LORA_LEAF.fullmatch(path):
                continue  # folded into its kernel
            group, rules = (
                ("clip", clip_dir_rules()) if path.startswith(VISION_TOWER) else ("main", main_rules)
            )
            key, fwd = invert_path(rules, path)
            if group == "main" and self.peft and not key.startswith(PEFT_PREFIX):
                key = PEFT_PREFIX + key
            self.out[group][key] = (_SHAPE[fwd](shape), np.dtype(dtype or dt))
            self.by_leaf[path] = (group, key, fwd)


def export_layout(
    leaves: Mapping[str, tuple[tuple[int, ...], Any]],
    cfg: rc.ReadConfig,
    *,
    merge_lora: bool = True,
    dtype=None,
) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """The HF tensors an export of `leaves` (path -> (shape, dtype)) writes, without any data.

    Returns:
      (READ checkpoint key -> (shape, dtype), CLIP key -> (shape, dtype)).
    """
    plan = _Plan(leaves, cfg, merge_lora=merge_lora, dtype=None if dtype is None else np.dtype(dtype))
    return plan.out["main"], plan.out["clip"]


class _ShardedWriter:
    """safetensors shards of <= max_bytes (HF naming, index json when more than one), laid out up front."""

    def __init__(self, directory: Path, specs: Mapping[str, tuple], max_bytes: int, stem: str = "model"):
        groups, cur, size = [], [], 0
        for key, (shape, dt) in specs.items():
            nb = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if cur and size + nb > max_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append((key, shape, dt))
            size += nb
        groups.append(cur)
        n = len(groups)
        names = (
            [f"{stem}.safetensors"]
            if n == 1
            else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.writers = {}
        self.file_of = {}
        for name, g in zip(names, groups, strict=True):
            w = io.SafetensorsWriter(directory / name, g, metadata={"format": "pt"})
            for key, _, _ in g:
                self.writers[key] = w
                self.file_of[key] = name
        if n > 1:
            total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in specs.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.file_of.items()))}
            (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))

    def write(self, key: str, a: np.ndarray) -> None:
        self.writers[key].write(key, a)

    def close(self) -> None:
        for w in set(self.writers.values()):
            w.close()


def export_leaves_to_hf(
    parts: Iterable[Mapping[str, np.ndarray]],
    leaves: Mapping[str, tuple],
    cfg: rc.ReadConfig,
    out_dir: str | os.PathLike,
    *,
    merge_lora: bool = False,
    dtype: str | None = None,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write an HF READ directory from a stream of leaf dicts.

    Args:
      parts: iterable of {'/'-path: host array} dicts covering `leaves` exactly once (any grouping).
      leaves: path -> (shape, dtype) of every leaf, used to lay the files out before any data arrives.
      cfg: the model's ReadConfig (config.json, LoRA scale).
      out_dir: created atomically (temporary sibling renamed at the end).
      merge_lora: fold LoRA into the kernels (released layout) instead of writing the PEFT layout.
      dtype: output dtype ('bfloat16'/'float32'); default: each leaf's own dtype.
    Returns:
      out_dir.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True / --overwrite to replace it)")
    np_dtype = None if dtype is None else np.dtype({"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype))
    if np_dtype is not None and np_dtype.name == "bfloat16":
        import ml_dtypes

        np_dtype = np.dtype(ml_dtypes.bfloat16)
    plan = _Plan(leaves, cfg, merge_lora=merge_lora, dtype=np_dtype)
    torch_dtype = str((np_dtype or next(iter(leaves.values()))[1]).name)
    with ck.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        main = _ShardedWriter(tmp, plan.out["main"], max_shard_bytes)
        clip = None
        if plan.out["clip"]:
            (tmp / "vision_tower").mkdir()
            clip = _ShardedWriter(tmp / "vision_tower", plan.out["clip"], max_shard_bytes)
        pending: dict[str, dict[str, np.ndarray]] = {}  # module -> {"kernel"/"a"/"b": array} (merge only)
        seen = set()

        def emit(path: str, arr: np.ndarray):
            group, key, fwd = plan.by_leaf[path]
            a = INVERSE[fwd](np.asarray(arr))
            dt = plan.out[group][key][1]
            (clip if group == "clip" else main).write(key, a.astype(dt, copy=False))

        for part in parts:
            for path, arr in part.items():
                if path not in leaves or path in seen:
                    raise ConversionError(f"export: leaf {path} unexpected or given twice")
                seen.add(path)
                m = _LORA_LEAF.fullmatch(path)
                module = m.group(1) if m else path.rsplit("/", 1)[0]
                if plan.merge and (m or (path.endswith("/kernel") and module in plan.lora_modules)):
                    slot = pending.setdefault(module, {})
                    slot[m.group(2) if m else "kernel"] = np.array(arr)
                    if len(slot) == 3:
                        del pending[module]
                        k = slot["kernel"]
                        # [I, R] @ [R, O] in fp32, one rounding to the kernel's dtype (as lora.merge_lora).
                        delta = slot["a"].astype(np.float32) @ slot["b"].astype(np.float32)
                        delta *= np.float32(plan.scale)
                        emit(module + "/kernel", (k.astype(np.float32) + delta).astype(k.dtype))
                    continue
                emit(path, arr)
        missing = sorted(set(leaves) - seen)
        if missing or pending:
            raise ConversionError(
                f"export: leaves never provided: {missing}; incomplete LoRA: {sorted(pending)}"
            )
        main.close()
        if clip is not None:
            clip.close()
            clip_cfg = clip_config_dict(cfg.clip, torch_dtype)
            (tmp / "vision_tower" / "config.json").write_text(json.dumps(clip_cfg, indent=1))
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, hf_config, torch_dtype), indent=1))
        if plan.peft:
            (tmp / "adapter_config.json").write_text(
                json.dumps(
                    {
                        "peft_type": "LORA",
                        "task_type": "CAUSAL_LM",
                        "r": cfg.lora.r,
                        "lora_alpha": cfg.lora.alpha,
                        "lora_dropout": cfg.lora.dropout,
                        "bias": "none",
                        "target_modules": sorted({m.rsplit("/", 1)[1] for m in plan.lora_modules}),
                    },
                    indent=1,
                )
            )
        if tokenizer_dir is not None:
            write_tokenizer_files(Path(tokenizer_dir), tmp)
    return out_dir


# The tokenizer files a SESAME/READ release carries beside `tokenizer.model`, as `tsunghanwu/SESAME` and
# `SESAME_minus` publish them (tests/assets/hf_configs/sesame, sources in its SOURCES.md): written when the
# exported model's tokenizer directory does not have its own.
_AT = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
RELEASE_TOKENIZER_FILES = {
    "added_tokens.json": {"<im_end>": 32002, "<im_start>": 32001, "[SEG]": 32000},
    "special_tokens_map.json": {
        "bos_token": {"content": "<s>", **{k: v for k, v in _AT.items() if k != "__type"}},
        "eos_token": {"content": "</s>", **{k: v for k, v in _AT.items() if k != "__type"}},
        "pad_token": "<unk>",
        "unk_token": {"content": "<unk>", **{k: v for k, v in _AT.items() if k != "__type"}},
    },
    "tokenizer_config.json": {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {**_AT, "content": "<s>"},
        "clean_up_tokenization_spaces": False,
        "eos_token": {**_AT, "content": "</s>"},
        "legacy": True,
        "model_max_length": 512,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {**_AT, "content": "<unk>"},
    },
}
TOKENIZER_FILES = ("tokenizer.model", *RELEASE_TOKENIZER_FILES)


def write_tokenizer_files(tokenizer_dir: Path, out: Path) -> None:
    """`tokenizer.model` and the release's tokenizer json files from `tokenizer_dir` into `out`; the json
    files it lacks are written as a SESAME/READ release has them (nothing else is copied)."""
    model = tokenizer_dir / "tokenizer.model"
    if not model.is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.model to export with the weights")
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, out / name)
        else:
            (out / name).write_text(json.dumps(RELEASE_TOKENIZER_FILES[name], indent=2) + "\n")


def export_checkpoint(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    merge_lora: bool = False,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """A converted read_jax checkpoint (convert_weights.py output) -> an HF READ directory, part by part."""
    ckpt_dir = Path(ckpt_dir)
    cfg = ck.load_config(ckpt_dir)
    manifest = ck.read_manifest(ckpt_dir)
    uninit = [p for p in manifest.get("uninitialized", []) if not _LORA_LEAF.fullmatch(p)]
    if uninit:
        raise ConversionError(
            f"{ckpt_dir}: {len(uninit)} leaves were left to their init at conversion ({uninit[:3]}...): "
            "build the model with read_jax.checkpoint.load_model and export it with export_model instead"
        )
    import ml_dtypes  # noqa: F401  (registers 'bfloat16' with numpy for the manifest dtype names)

    leaves = {p: (tuple(v["shape"]), np.dtype(v["dtype"])) for p, v in manifest["leaves"].items()}
    hf_path = ckpt_dir / ck.HF_CONFIG
    hf = json.loads(hf_path.read_text()) if hf_path.is_file() else None
    tok = ckpt_dir / ck.TOKENIZER_DIR
    return export_leaves_to_hf(
        ck.iter_parts(ckpt_dir),
        leaves,
        cfg,
        out_dir,
        merge_lora=merge_lora,
        dtype=dtype,
        hf_config=hf,
        tokenizer_dir=tok if tok.is_dir() else None,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )


def export_model(
    model,
    cfg: rc.ReadConfig,
    out_dir: str | os.PathLike,
    *,
    merge_lora: bool = False,
    dtype: str | None = "bfloat16",
    tokenizer_dir: str | os.PathLike | None = None,
    hf_config: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """An in-memory (possibly sharded) NNX model -> an HF READ directory; one leaf at a time on the host."""
    import jax
    from flax import nnx

    from read_jax.convert.common import abstract_leaves

    state = abstract_leaves(nnx.state(model, nnx.Not(nnx.RngState)))
    leaves = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in state.items()}

    def parts() -> Iterator[dict[str, np.ndarray]]:
        for p, v in state.items():
            yield {p: np.asarray(jax.device_get(v))}

    return export_leaves_to_hf(
        parts(),
        leaves,
        cfg,
        out_dir,
        merge_lora=merge_lora,
        dtype=dtype,
        hf_config=hf_config,
        tokenizer_dir=tokenizer_dir,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )
