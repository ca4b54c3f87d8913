"""What `evaluate.py` does, importable: one split of one checkpoint through its protocol, written to disk.

Splits: reasonseg_{val,test} (teacher-forced; test adds short/long), refcoco_{val,testA,testB},
refcoco+_{val,testA,testB}, refcocog_{val,test} (teacher-forced, `train_read.py`'s validation; with
`generate=True` free greedy generation as `test_read.py` runs them), fprefcoco(+/g)_val and
R-refcoco(+/g)_val (free greedy generation: See / Segment, `test_read.py`). Outputs: OUT/summary.json and
OUT/samples.jsonl (one record per query), OUT/masks/*.npz with `dump_masks` (re-scored by
`python -m read_jax.cli.rescore OUT`), OUT/sweep.{json,txt} for the Table 8 sweep, and the analysis PNGs.

A converted (released) checkpoint evaluated on a RefCOCO-family split with our own templates prints that the
figures are not comparable with the paper's: the releases were trained and evaluated with the reference's
lists (`data.templates`). `eval.sasp` names the SasP setting of the evaluation ("": the model's; the 13B
config sets READ-13B's evaluation preset, 60 points / 0.6).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re

from read_jax import build
from read_jax import sharding as shd
from read_jax import visualize as V
from read_jax.config import ConfigError, SaspConfig
from read_jax.data import loaders
from read_jax.data import pipeline as Pl
from read_jax.data.tokenizer import ReadTokenizer
from read_jax.eval import analysis, dumps, protocols, records
from read_jax.train.checkpoints import with_run_model

log = logging.getLogger(__name__)

REFER_DATASETS = (
    "refcoco",
    "refcoco+",
    "refcocog",
    "fprefcoco",
    "fprefcoco+",
    "fprefcocog",
    "R-refcoco",
    "R-refcoco+",
    "R-refcocog",
)
_SPLIT = re.compile(
    r"(reasonseg|refcocog|refcoco\+|refcoco|fprefcocog|fprefcoco\+|fprefcoco|R-refcocog|R-refcoco\+|R-refcoco)"
    r"_(\w+)"
)
# `eval.sasp`: the SasP setting an evaluation runs with ("" / "model": the model's own).
EVAL_SASP = {"read_7b": SaspConfig.read_7b, "read_13b_eval": SaspConfig.read_13b_eval}


def parse_split(split: str) -> tuple[str, str, str]:
    """'reasonseg_test' -> ('reasonseg', 'reasonseg', 'test'); 'refcoco+_testA' -> ('refer', 'refcoco+',
    'testA');
    'fprefcoco_val' -> ('fp', 'fprefcoco', 'val')."""
    m = _SPLIT.fullmatch(split)
    if m is None:
        raise ValueError(
            f"unknown split {split!r}: want reasonseg_<split>, one of {REFER_DATASETS} + _<split>"
        )
    dataset, sub = m.groups()
    generation_only = dataset.startswith(("fp", "R-"))  # See / Segment: only `test_read.py` runs them
    kind = "reasonseg" if dataset == "reasonseg" else "fp" if generation_only else "refer"
    return kind, dataset, sub


def eval_sasp(config, model_sasp: SaspConfig) -> SaspConfig:
    """The SasP setting of an evaluation: `eval.sasp` names a preset (READ-13B's checkpoints are trained with
    30 points / 0.8 but evaluated with 60 / 0.6 on the full grid, read_reference.md §3.6), "" the model's."""
    name = str(config.eval.get("sasp", "") or "")
    if name in ("", "model"):
        return model_sasp
    if name not in EVAL_SASP:
        raise ConfigError(f"config.eval.sasp={name!r}: want '' (the model's) or one of {sorted(EVAL_SASP)}")
    return EVAL_SASP[name]()


def template_note(kind: str, split: str, checkpoint: str, config) -> str | None:
    """The warning printed when a released checkpoint is scored on a RefCOCO-family split with our own
    templates (None when the figures are comparable)."""
    if kind == "reasonseg" or config.data.get("templates") or not build.is_converted_checkpoint(checkpoint):
        return None
    return (
        f"note: {split} was built with read_jax's own question/answer templates, but released READ "
        "checkpoints were trained and evaluated with the reference's lists: these figures are not comparable "
        "with the paper's (pass --config.data.templates=PATH/TO/READ/dataloaders/qa_template.py)"
    )


def _summary_lines(split: str, summary: dict) -> str:
    line = (
        f"{split}: gIoU {100 * summary['gIoU']:.2f}  cIoU {100 * summary['cIoU']:.2f}  "
        f"({summary['num_queries']} queries)"
    )
    names = (
        ("short", "short"),
        ("long", "long"),
        ("threshold_search", "threshold search"),
        ("points_as_prompt", "points as prompt"),
        ("all_foreground", "all-foreground baseline"),
    )
    for k, name in names:
        if k in summary:
            line += f"\n  {name}: gIoU {100 * summary[k]['gIoU']:.2f}  cIoU {100 * summary[k]['cIoU']:.2f}"
    if hits := summary.get("sasp_points"):
        line += (
            f"\n  SasP points: the first on the target for {100 * hits['top_on_target']:.1f}% of "
            f"{hits['num_queries']} queries; {100 * hits['positives_on_target']:.1f}% of the "
            f"{hits['positives_per_query']:.1f} positives a query"
        )
    for k, m in summary.get("by_query_kind", {}).items():
        line += (
            f"\n  {k} ({m['num_queries']} queries): gIoU {100 * m['gIoU']:.2f}  cIoU {100 * m['cIoU']:.2f}"
        )
    return line


def _writable(path: str, flag: str) -> None:
    """Create an output directory now, not after the evaluation: a read-only location fails in seconds."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise PermissionError(
            f"{flag} {path}: cannot create it ({e.strerror}); choose a writable directory"
        ) from e


def _dropped(split: str, reader, skipped: records.SkippedItems, kind: str) -> dict:
    """The summary's account of what was not scored (and one warning line when anything was not)."""
    d = records.dropped_summary(
        dict(getattr(reader, "dropped", {})),
        records.gather_records(skipped.items),
        one_query_per_item=kind == "reasonseg",
    )
    if d["num_dropped_items"]:
        reasons = ", ".join(f"{r} {v['items']}" for r, v in d["dropped_by_reason"].items())
        q = d["num_dropped_queries"]
        print(
            f"{split}: warning: {d['num_dropped_items']} items"
            + ("" if q is None else f" ({q} queries)")
            + f" were not scored ({reasons}); see dropped_by_reason in summary.json"
        )
    return d


def _write_sweep(out: str, meta: dict, results: dict) -> str:
    table = analysis.format_table8(results)
    os.makedirs(out, exist_ok=True)
    rows = [{"t_pos": tp, "t_neg": tn, "num_points": n, **r} for (tp, tn, n), r in sorted(results.items())]
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({**meta, "results": rows}, f, indent=2)
    with open(os.path.join(out, "sweep.txt"), "w") as f:
        f.write(table + "\n")
    return table


def _meta(
    config, split, checkpoint, kind, reader, dc, sasp_cfg, generation: bool, devices: int, dtype: str
) -> dict:
    """What a summary records besides the figures; prints the template note when one applies."""
    meta = {
        "split": split,
        "checkpoint": os.path.abspath(checkpoint),
        "num_items": len(reader),
        "protocol": "generation" if generation else "teacher-forced",
        "sasp": dataclasses.asdict(sasp_cfg),
        "templates": reader.templates.source if kind != "reasonseg" else "LISA's fixed ReasonSeg templates",
        "devices": devices,
        "dtype": str(dtype),
        # The protocol scores every image at its original size; a cap is an explicit, recorded departure.
        "resolution": "native" if not dc.max_mask_side else f"capped at {dc.max_mask_side} px",
    }
    note = template_note(kind, split, checkpoint, config)
    if note:
        print(note)
        meta["comparable_with_paper"] = False
    return meta


def run(
    config,
    checkpoint: str,
    split: str,
    *,
    out: str | None = None,
    threshold_search: bool = False,
    analysis_dir: str | None = None,
    sweep: bool = False,
    which: str = "best",
    max_new_tokens: int = 512,
    points_prompt_num: int | None = None,
    analysis_limit: int | None = None,
    max_batches: int | None = None,
    mesh=None,
    model=None,
    tokenizer_dir: str | None = None,
    progress: bool = True,
    generate: bool = False,
    dump_masks: bool = False,
    generate_fn=None,
    dtype: str | None = None,
) -> dict:
    """Evaluate `checkpoint` (a converted checkpoint or a train.py workdir) on `split`; returns the summary
    (or the sweep's results). `model`/`tokenizer_dir` skip loading `checkpoint` (tests, notebooks); `mesh`
    defaults to `config.mesh`. `generate`: the generation protocol of `test_read.py` on a teacher-forced
    split; `dump_masks`: every query's masks under OUT/masks; `generate_fn`: a test's stand-in for greedy
    decoding; `dtype`: the compute dtype to score in ('bfloat16', 'float32'), instead of the one the
    checkpoint was converted or trained in."""
    kind, dataset, sub = parse_split(split)
    generation = kind == "fp" or generate
    if generation and (threshold_search or analysis_dir or sweep):
        raise ValueError(
            "--threshold-search/--analysis/--sweep apply to the teacher-forced protocol, not to generation"
        )
    if model is not None and dtype:
        raise ValueError("dtype applies to the checkpoint run() loads, not to a model passed in")
    if mesh is None:
        mesh = shd.make_mesh(int(config.mesh.get("data", -1)), int(config.mesh.get("fsdp", 1)))
    if model is None:
        converted = build.is_converted_checkpoint(checkpoint)
        if build.is_run_dir(checkpoint):  # the run's own model and frozen base; data/eval from `config`
            config = with_run_model(config, checkpoint)
            if dtype:
                config.model.dtype = dtype
        model = build.load_model(
            checkpoint, mesh=mesh, run_config=config, which=which, dtype=dtype if converted else None
        )
        tokenizer_dir = build.tokenizer_dir(checkpoint)
    cfg = model.config
    tokenizer_dir = tokenizer_dir or config.data.get("tokenizer")
    tokenizer = ReadTokenizer(tokenizer_dir)
    reader = loaders.eval_reader(config.data, dataset, sub, answers=not generation)
    dc = loaders.eval_data_config(config, cfg, generation=generation)
    sasp_cfg = eval_sasp(config, cfg.sasp)
    batches, total = loaders.eval_iterator(reader, dc, cfg, tokenizer_dir)
    if max_batches:
        batches, total = itertools.islice(batches, max_batches), min(total, max_batches)
    skipped = records.SkippedItems(
        Pl.eval_chunks(reader, dc.max_convs), reader.num_conversations, dc.max_convs
    )
    batches = skipped.watch(batches)
    out = out or os.path.join(checkpoint, "eval", split)
    _writable(out, "--out")
    if analysis_dir:
        _writable(analysis_dir, "--analysis")
    ev = protocols.Evaluator(model, mesh)
    meta = _meta(
        config, split, checkpoint, kind, reader, dc, sasp_cfg, generation, int(mesh.size), cfg.llama.dtype
    )
    dump_dir = out if dump_masks else None
    common = dict(evaluator=ev, total=total, progress=progress, sasp_cfg=sasp_cfg, dump_dir=dump_dir)
    if sweep:
        base = sasp_cfg if sasp_cfg != cfg.sasp else None
        results = protocols.sweep_sasp(
            model, batches, evaluator=ev, total=total, progress=progress, base=base
        )
        meta.update(_dropped(split, reader, skipped, kind))
        print(_write_sweep(out, meta, results))
        return results
    if generation:
        summary, recs = protocols.evaluate_fprefcoco(
            model,
            batches,
            tokenizer,
            max_new_tokens=max_new_tokens,
            generate_fn=generate_fn,
            desc=split,
            **common,
        )
        line = (
            f"{split}: See {100 * summary['See']:.2f}  Segment (cIoU) {100 * summary['Segment']:.2f}  "
            f"({summary['num_queries']} queries)"
        )
    else:
        pictures = None
        if analysis_dir:
            pictures = V.AnalysisPictures(
                analysis_dir, cfg.sam, V.reader_image_fn(reader), limit=analysis_limit
            )
        summary, recs = protocols.evaluate_reasonseg(
            model,
            batches,
            threshold_search=threshold_search,
            points_prompt=analysis.points_prompt_config(cfg.sasp, points_prompt_num)
            if analysis_dir
            else None,
            tokenizer=tokenizer,
            meta_fn=records.reason_seg_meta(reader) if kind == "reasonseg" else None,
            on_maps=pictures,
            desc=split,
            **common,
        )
        line = _summary_lines(split, summary)
        if pictures is not None:
            meta["pictures"] = {"dir": os.path.abspath(analysis_dir), "count": len(pictures.paths)}
    summary = {**meta, **summary, **_dropped(split, reader, skipped, kind)}
    if dump_masks:
        summary["masks"] = os.path.join(out, dumps.MASK_DIR)
    s_path, r_path = records.write_results(out, summary, recs)
    print(line)
    print(f"wrote {s_path} and {r_path}")
    return summary
