"""From a run config's `data` section to readers, grain iterators and device batches: written once here.

Training (`read_jax.train`) and evaluation (`read_jax.eval`) both build their inputs through these functions:
`data_config` (the pipeline's static shapes, the CLIP size derived from the model), `train_iterator` (the
hybrid mixture of `data.rates`), `eval_reader` / `eval_iterator` (one split, each query once), and the
host-side step assembly (`stack_micro_batches`, `batch_spec`).

The `data` section of a run config (`read_jax.train.config.default_config`): every `DataConfig` field except
`clip_size` (the model's CLIP input size, never configured twice), plus where the data lives (`root`,
`reason_seg_dir`, `tokenizer`), the mixture (`rates`, `reason_seg_false_premise`, the sub-datasets
`sem_seg_data`, `refer_seg_data`, `neg_refer_seg_data`, `correct_refer_seg_data`) and the generated shapes
mix (`make_shapes`, `num_shapes`). Any other key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np

from read_jax.config import IGNORE_INDEX, ConfigError, ReadConfig
from read_jax.data import mixture as M
from read_jax.data import pipeline as Pl
from read_jax.data import readers as R

log = logging.getLogger(__name__)

# Keys of the `data` section that say where data lives and what the mixture is (not DataConfig fields).
SOURCE_KEYS = (
    "root",
    "reason_seg_dir",
    "tokenizer",
    "rates",
    "reason_seg_false_premise",
    "make_shapes",
    "num_shapes",
    "num_train_of",
    "templates",
    "sem_seg_data",
    "refer_seg_data",
    "neg_refer_seg_data",
    "correct_refer_seg_data",
)
# DataConfig fields derived from the model, never configured.
DERIVED_KEYS = ("clip_size",)


def plain(x):
    """ConfigDict / FrozenConfigDict / lists -> plain Python (tuples for sequences)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(plain(v) for v in x)
    return x


def data_config(data_cfg, cfg: ReadConfig, **overrides) -> Pl.DataConfig:
    """The pipeline's `DataConfig` of a `data` section, with the CLIP size of the model `cfg`.

    Raises ConfigError on a key that is neither a DataConfig field nor one of `SOURCE_KEYS`.
    """
    d = plain(data_cfg)
    fields = {f.name for f in dataclasses.fields(Pl.DataConfig)} - set(DERIVED_KEYS)
    unknown = sorted(set(d) - fields - set(SOURCE_KEYS))
    if unknown:
        hint = " (the CLIP size comes from the model)" if "clip_size" in unknown else ""
        raise ConfigError(
            f"config.data has unknown keys {unknown}{hint}; known: {sorted(fields | set(SOURCE_KEYS))}"
        )
    kw = {k: v for k, v in d.items() if k in fields}
    resize = kw.pop("sam_device_resize", "auto")
    resize = {"auto": "auto", "true": True, "false": False}.get(str(resize).lower(), resize)  # CLI: strings
    if resize not in ("auto", True, False):
        raise ConfigError(f"config.data.sam_device_resize={resize!r}: use 'auto', True or False")
    # "auto": SAM's resize on the device on accelerators; on a CPU backend PIL on the host is faster.
    kw["sam_device_resize"] = jax.default_backend() != "cpu" if resize == "auto" else bool(resize)
    try:
        return Pl.DataConfig(**{**kw, "clip_size": cfg.clip.image_size, **overrides})
    except ValueError as e:
        raise ConfigError(f"config.data: {e}") from e


def parse_rates(rates: str) -> str | dict[str, float]:
    """'read_7b' (a `mixture.RATE_PRESETS` name) or 'reason_seg:1,sem_seg:10' -> preset name or {source:
    rate}."""
    if ":" not in rates:
        return rates
    out = {}
    for part in rates.split(","):
        name, _, r = part.partition(":")
        try:
            out[name.strip()] = float(r)
        except ValueError as e:
            raise ConfigError(f"bad data.rates entry {part!r} (want name:rate)") from e
    return out


def reason_seg_dir(data_cfg) -> str:
    """The ReasonSeg-layout directory: `data.reason_seg_dir` with `{root}` filled in."""
    template = data_cfg.get("reason_seg_dir") or "{root}/reason_seg/ReasonSeg"
    return template.format(root=data_cfg.root)


SUB_DATASET_KEYS = {  # data-config key (the reference's flag) -> source
    "sem_seg_data": "sem_seg",
    "refer_seg_data": "refer_seg",
    "neg_refer_seg_data": "neg_refer_seg",
    "correct_refer_seg_data": "correct_refer_seg",
}


def sub_datasets(data_cfg) -> dict[str, tuple[str, ...]]:
    """{source: sub-datasets} of `data.sem_seg_data` etc. ("a||b", the reference's flags); unset or empty
    keys keep the reference's defaults (`mixture.SUB_DATASETS`)."""
    return {
        src: M.parse_sub_datasets(data_cfg.get(key))
        for key, src in SUB_DATASET_KEYS.items()
        if data_cfg.get(key) and M.parse_sub_datasets(data_cfg.get(key))
    }


def mixture_sources(data_cfg) -> tuple[str, ...]:
    """The source names of `data.rates` (a preset or "name:rate,..."); every source when it is not set."""
    if not data_cfg.get("rates"):
        return M.SOURCES
    rates = parse_rates(str(data_cfg.rates))
    return tuple(rates) if isinstance(rates, Mapping) else tuple(M.resolve_rates(rates))


def ensure_shapes_data(data_cfg) -> None:
    """`data.make_shapes`: the generated shapes mix (`read_jax.data.make_shapes`) of the sources the run reads
    (`data.rates`; all when unset), `data.num_shapes` = (train scenes per source, val, test) of them
    (`data.num_train_of`, "SOURCE:N,...": another training count for the sources it names), in `data.root`
    (ReasonSeg in `data.reason_seg_dir`, which must lie inside it). Written only into a directory the
    generator owns (it holds `make_shapes.MARKER`), and only the files that are absent.

    An absent or empty `data.root` is created and marked; in a marked one every scene that is missing is
    written (a pure function of (seed, source, split, index), so a set made by `python -m
    read_jax.data.make_shapes --out DIR` is topped up; files already there, hand edits included, stay; a set
    already complete returns at once). Any other `data.root` is refused: generated scenes are never merged
    into a user's data. The sem_seg sub-datasets it writes are `make_shapes.SUB_DATASETS["sem_seg"]`, which
    `data.sem_seg_data` must name. Only process 0 writes (multi-host runs assume a shared filesystem).
    """
    if not data_cfg.get("make_shapes") or jax.process_index() != 0:
        return
    from read_jax.data import make_shapes

    root = str(data_cfg.root)
    if make_shapes.is_foreign(root):
        raise ConfigError(
            f"data.root={root} holds data the shapes generator did not write (no {make_shapes.MARKER}): "
            "data.make_shapes=True writes only into a directory of its own; point data.root to a new "
            "directory, or pass --config.data.make_shapes=false to read this one as it is"
        )
    sources = mixture_sources(data_cfg)
    subs = sub_datasets(data_cfg)
    for src, sets in subs.items():
        extra = sorted(set(sets) - set(make_shapes.SUB_DATASETS[src]))
        if src in sources and extra:
            key = next(k for k, v in SUB_DATASET_KEYS.items() if v == src)
            raise ConfigError(
                f"config.data.{key} names {extra}, which the shapes generator does not write; it writes "
                f"{src} as {'||'.join(make_shapes.SUB_DATASETS[src])}"
            )
    if "sem_seg" in sources and "sem_seg" not in subs:
        raise ConfigError(
            "data.make_shapes writes sem_seg as "
            f"{'||'.join(make_shapes.SUB_DATASETS['sem_seg'])}: set config.data.sem_seg_data to it"
        )
    marker = make_shapes.read_marker(root)
    counts = dict(zip(make_shapes.SPLITS, (int(n or 0) for n in plain(data_cfg.num_shapes))))
    try:
        plan = make_shapes.write_mix(
            root,
            counts,
            seed=int((marker or {}).get("seed", 0)),
            sources=sources,
            reason_seg_dir=reason_seg_dir(data_cfg),
            train_of=make_shapes.parse_train_of(data_cfg.get("num_train_of", "")),
        )
    except (FileExistsError, ValueError) as e:
        raise ConfigError(f"data.make_shapes: {e}") from e
    except OSError as e:
        raise PermissionError(f"data.root={root}: cannot write the shapes mix ({e.strerror})") from e
    log.info("the generated shapes mix in %s: %d scenes of %s", root, sum(plan.values()), ", ".join(sources))


def train_iterator(config, cfg: ReadConfig, *, shard_options=None) -> tuple[Iterator[dict], Pl.DataConfig]:
    """The training grain iterator of `config.data` (this host's share) and its DataConfig.

    `train.mask_side` > 0 sets a coarser GT canvas for training than `data.max_mask_side` (validation scores
    at native resolution, `eval.max_mask_side`).
    """
    d = config.data
    ensure_shapes_data(d)
    side = int(config.train.get("mask_side") or 0)
    dc = data_config(d, cfg, **({"max_mask_side": side} if side else {}))
    rates = parse_rates(str(d.rates))
    names = tuple(rates) if isinstance(rates, Mapping) else tuple(M.RATE_PRESETS[rates])
    fp = float(d.get("reason_seg_false_premise", -1.0))
    sources = M.build_reference_sources(
        d.root,
        names,
        max_convs=dc.max_convs,
        seed=dc.seed,
        reason_seg_dir=reason_seg_dir(d),
        reason_seg_false_premise=None if fp < 0 else fp,
        sub_datasets=sub_datasets(d),
    )
    tpl = load_templates(d.get("templates"))
    for src in sources.values():
        if hasattr(src, "use_templates"):
            src.use_templates(tpl)
    ds = Pl.train_dataset(
        M.Mixture(sources, rates, seed=dc.seed), dc, cfg.sam, d.tokenizer, shard_options=shard_options
    )
    return iter(ds), dc


def eval_reader(data_cfg, dataset: str, split: str, *, answers: bool = True) -> R.Reader:
    """The eval-mode reader of `dataset` ('reasonseg', or a refer set such as 'refcoco' / 'fprefcoco') and
    split.

    `answers=False` gives prompt-only rows (the generation protocols).
    """
    seed = int(data_cfg.get("seed", 0))
    if dataset == "reasonseg":  # LISA's fixed templates (the protocol's), whatever `data.templates` says
        return R.ReasonSegReader(reason_seg_dir(data_cfg), split, mode="eval", seed=seed, eval_answer=answers)
    root = data_cfg.root
    if os.path.isdir(os.path.join(root, "refer_seg")):
        root = os.path.join(root, "refer_seg")
    reader = R.ReferReader(root, dataset, split, mode="eval", seed=seed, eval_answer=answers)
    return reader.use_templates(load_templates(data_cfg.get("templates")))


def load_templates(path: str | None):
    """`data.templates`: the reference's template lists from the user's checkout (e.g. READ's
    `dataloaders/qa_template.py`, parsed as data), or our own wording when empty (`templates.load_templates`).
    A file that cannot be read as the reference's lists is a ConfigError naming the list."""
    from read_jax.data import templates as T

    try:
        return T.load_templates(path or None)
    except T.TemplateError as e:
        raise ConfigError(f"config.data.templates: {e}") from e


def eval_data_config(config, cfg: ReadConfig, *, generation: bool = False) -> Pl.DataConfig:
    """The DataConfig of an evaluation: `eval.batch_size`; one query per row (the teacher-forced protocol), or
    the vicuna_v1 template of `test_read.py` for the generation protocols (read_reference.md §13.7).

    Every image is scored at its original size (the reference weighs cIoU by native pixel counts), unless
    `eval.max_mask_side` > 0 caps the GT canvas (an explicit option; the summary records it).
    """
    over = {
        "batch_size": int(config.eval.get("batch_size", 1)),
        "max_mask_side": int(config.eval.get("max_mask_side", 0) or 0),
    }
    if generation:
        over["template"] = "vicuna_v1"
    else:
        over["max_convs"] = 1
    return data_config(config.data, cfg, **over)


def eval_iterator(
    reader: R.Reader, dc: Pl.DataConfig, cfg: ReadConfig, tokenizer: str, *, shard_options=None
):
    """(iterator of eval batches, number of batches per host)."""
    ds = Pl.eval_dataset(reader, dc, cfg.sam, tokenizer, shard_options=shard_options)
    total = -(-len(Pl.eval_chunks(reader, dc.max_convs)) // (dc.batch_size * jax.process_count()))
    return iter(ds), total


# ---- one optimizer step's micro-batches ------------------------------------------------------------------
def batch_spec(dc: Pl.DataConfig, sam_cfg, length: int, accum: int = 1, num_hosts: int = 1) -> dict:
    """Abstract device batch ([k, B_global, ...] ShapeDtypeStructs) of the pipeline layout, without any data.

    The layout is read off the pipeline's own collate of an empty batch (all padding), so it cannot drift from
    `read_jax.data.pipeline`; the text length is set to `length`. Used to compile (or only lower) the step
    before any data is read, e.g. for the 7B memory report.
    """
    out = {}
    # In-process numpy arrays: with grain workers the collate allocates shared memory that only grain's
    # hand-over to the main process frees, so a collate called here would leak its segments.
    for n, x in Pl.Collate(dataclasses.replace(dc, num_workers=0), sam_cfg)([]).items():
        if n in Pl.HOST_KEYS:
            continue
        shape = list(x.shape)
        if n in ("input_ids", "labels", "attention_mask"):
            shape[1] = length
        shape[0] *= num_hosts
        out[n] = jax.ShapeDtypeStruct((accum, *shape), x.dtype)
    return out


def pad_length(batch: dict, length: int) -> dict:
    """Right-pad the [R, L] text leaves of a host batch to `length` (ids 0, mask False, labels IGNORE)."""
    cur = batch["input_ids"].shape[1]
    if cur == length:
        return batch
    out = dict(batch)
    for k, v in {"input_ids": 0, "attention_mask": False, "labels": IGNORE_INDEX}.items():
        if k in batch:
            out[k] = np.pad(batch[k], ((0, 0), (0, length - cur)), constant_values=v)
    return out


def stack_micro_batches(batches: Sequence[dict]) -> tuple[dict, dict]:
    """k host batches -> (device-ready dict of [k, ...] leaves, host bookkeeping of the same batches)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    batches = [pad_length(b, length) for b in batches]
    dev = {k: np.stack([b[k] for b in batches]) for k in batches[0] if k not in Pl.HOST_KEYS}
    host = {k: np.stack([b[k] for b in batches]) for k in Pl.HOST_KEYS if k in batches[0]}
    return dev, host


def next_step_batch(it: Iterator[dict], k: int) -> tuple[dict, dict]:
    """The next optimizer step's k micro-batches from the training iterator."""
    return stack_micro_batches([next(it) for _ in range(k)])
