#!/usr/bin/env python
"""Evaluate a READ checkpoint: the paper's protocols and the appendix analyses (`read_jax.evaluation`).

    python evaluate.py --config configs/tiny_shapes.py --checkpoint runs/tiny --split reasonseg_test \\
        --out runs/tiny/eval [--threshold-search] [--analysis runs/tiny/eval/pictures] [--sweep]
    python evaluate.py --config configs/read_7b_reasonseg.py --checkpoint ckpt/read7b --split reasonseg_val \\
        --config.data.root=dataset
    python evaluate.py --config configs/read_7b_reasonseg.py --checkpoint ckpt/read7b_fprefcoco \\
        --split fprefcoco_val --config.data.root=dataset

--checkpoint is a `train.py --workdir` (frozen base + trained trainables; best-by-cIoU unless --which=latest;
--which=init scores the run's untrained starting point, a baseline) or
a converted checkpoint (`convert_weights.py`, `inference.save_for_inference`: config.json + params/, whose
config.json gives the architecture). --config supplies the data, mesh and eval settings; any field can be
overridden with `--config.<section>.<field>=value`.

Splits: reasonseg_{val,test} (teacher-forced, LISA's fixed templates; test adds short/long), refcoco_{val,testA,
testB}, refcoco+_{val,testA,testB}, refcocog_{val,test} (teacher-forced), fprefcoco_val, fprefcoco+_val,
fprefcocog_val (free greedy generation: See / Segment).

Modes (on top of the protocol):
  --threshold-search  Appendix A.1: per query the best threshold (0.01 grid) of the [SEG] similarity map, and
                      the gIoU/cIoU of the similarity map as a mask.
  --analysis DIR      Appendix B: one PNG per query in DIR (image, similarity heat map, SasP points, prediction,
                      GT, points-only mask) and the "points as prompt" gIoU/cIoU (Fig. 6).
  --sweep             Appendix C / Table 8: t_pos/t_neg in {.8/.2, .7/.3, .6/.4} x |P| in {10, 30, 60}; prints
                      the table and writes sweep.json (instead of the single protocol run).
Outputs: OUT/summary.json and OUT/samples.jsonl (one record per query: id, query, IoU, points, presence).

Flags are defined only when this file runs as a script, so tests import `run` without absl flag clashes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

log = logging.getLogger("evaluate")

REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "fprefcoco", "fprefcoco+", "fprefcocog")
_SPLIT = re.compile(r"(reasonseg|refcocog|refcoco\+|refcoco|fprefcocog|fprefcoco\+|fprefcoco)_(\w+)")


def parse_split(split: str) -> tuple[str, str, str]:
    """'reasonseg_test' -> ('reasonseg', 'reasonseg', 'test'); 'refcoco+_testA' -> ('refer', 'refcoco+', 'testA');
    'fprefcoco_val' -> ('fp', 'fprefcoco', 'val')."""
    m = _SPLIT.fullmatch(split)
    if m is None:
        raise ValueError(
            f"unknown split {split!r}: want reasonseg_<split>, one of {REFER_DATASETS} + _<split>"
        )
    dataset, sub = m.groups()
    kind = "reasonseg" if dataset == "reasonseg" else "fp" if dataset.startswith("fp") else "refer"
    return kind, dataset, sub


def _plain(x):
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def load_checkpoint(config, checkpoint: str, *, which: str = "best", mesh=None):
    """(model, tokenizer directory) from a converted checkpoint or a train.py workdir."""
    from flax import nnx

    from read_jax import checkpoint as ck
    from read_jax.read_model import ReadModel

    path = Path(checkpoint)
    if not path.is_dir():
        raise ValueError(f"--checkpoint {checkpoint} is not a directory")
    tok_default = config.data.get("tokenizer") or ""
    if (path / ck.PARAMS_DIR / ck.MANIFEST).is_file():
        cfg = ck.load_config(path)
        model = ck.load_model(path, lambda: ReadModel(cfg, rngs=nnx.Rngs(0)), mesh=mesh)
        tok = path / ck.TOKENIZER_DIR
        return model, str(tok) if tok.is_dir() else tok_default
    from read_jax.train_lib import load_trained

    model, _, meta = load_trained(config, path, which=which, mesh=mesh)
    log.info(
        "restored the %s checkpoint of %s: step %s, %s", which, path, meta.get("step"), meta.get("metrics")
    )
    return model, tok_default


def build_reader(config, kind: str, dataset: str, sub: str):
    from read_jax.data import readers as R

    d = config.data
    seed = int(d.get("seed", 0))
    if kind == "reasonseg":
        tmpl = d.get("reason_seg_dir") or "{root}/reason_seg/ReasonSeg"
        return R.ReasonSegReader(tmpl.format(root=d.root), sub, mode="eval", seed=seed)
    root = os.path.join(d.root, "refer_seg") if os.path.isdir(os.path.join(d.root, "refer_seg")) else d.root
    return R.ReferReader(root, dataset, sub, mode="eval", seed=seed, eval_answer=kind != "fp")


def eval_data_config(config, cfg, kind: str):
    """The DataConfig of an eval run: eval batch size, one query per row for ReasonSeg, vicuna_v1 for FP."""
    from read_jax.data.pipeline import DataConfig

    d = _plain(config.data)
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
    kw["batch_size"] = int(config.eval.get("batch_size", 1))
    if kind == "reasonseg":
        kw["max_convs"] = 1
    if kind == "fp":
        kw["template"] = "vicuna_v1"  # test_read.py never sets conv_type (read_reference.md §13.7)
    dc = DataConfig(**kw)
    if dc.clip_size != cfg.clip.image_size:
        raise ValueError(
            f"data.clip_size {dc.clip_size} != the model's CLIP image size {cfg.clip.image_size}: "
            f"set --config.data.clip_size={cfg.clip.image_size}"
        )
    return dc


def run(
    config,
    checkpoint: str,
    split: str,
    *,
    out: str | None = None,
    threshold_search: bool = False,
    analysis: str | None = None,
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
) -> dict:
    """Everything `evaluate.py` does; returns the summary (or the sweep table's results).

    `model`/`tokenizer_dir` skip loading `checkpoint` (tests, notebooks); `mesh` defaults to `config.mesh`.
    """
    from read_jax import evaluation as E
    from read_jax import sharding as shd
    from read_jax import visualize as V
    from read_jax.data import pipeline as Pl
    from read_jax.data.tokenizer import ReadTokenizer

    kind, dataset, sub = parse_split(split)
    if kind == "fp" and (threshold_search or analysis or sweep):
        raise ValueError(
            "--threshold-search/--analysis/--sweep apply to the teacher-forced splits, not FP-RefCOCO"
        )
    if mesh is None:
        mesh = shd.make_mesh(int(config.mesh.get("data", -1)), int(config.mesh.get("fsdp", 1)))
    if model is None:
        model, tokenizer_dir = load_checkpoint(config, checkpoint, which=which, mesh=mesh)
    cfg = model.config
    tokenizer_dir = tokenizer_dir or config.data.get("tokenizer")
    tokenizer = ReadTokenizer(tokenizer_dir)
    reader = build_reader(config, kind, dataset, sub)
    dc = eval_data_config(config, cfg, kind)
    batches = Pl.eval_dataset(reader, dc, cfg.sam, tokenizer_dir)
    total = math.ceil(len(Pl.eval_chunks(reader, dc.max_convs)) / (dc.batch_size * _process_count()))
    if max_batches:
        batches, total = itertools.islice(batches, max_batches), min(total, max_batches)
    out = out or os.path.join(checkpoint, "eval", split)
    ev = E.Evaluator(model, mesh)
    meta = {
        "split": split,
        "checkpoint": os.path.abspath(checkpoint),
        "num_items": len(reader),
        "sasp": dataclasses.asdict(cfg.sasp),
        "devices": int(mesh.size),
    }

    if sweep:
        results = E.sweep_sasp(model, batches, evaluator=ev, total=total, progress=progress)
        table = E.format_table8(results)
        print(table)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump(
                {
                    **meta,
                    "results": [
                        {"t_pos": tp, "t_neg": tn, "num_points": n, **r}
                        for (tp, tn, n), r in sorted(results.items())
                    ],
                },
                f,
                indent=2,
            )
        with open(os.path.join(out, "sweep.txt"), "w") as f:
            f.write(table + "\n")
        return results

    if kind == "fp":
        summary, records = E.evaluate_fprefcoco(
            model,
            batches,
            tokenizer,
            max_new_tokens=max_new_tokens,
            evaluator=ev,
            total=total,
            progress=progress,
        )
        line = (
            f"{split}: See {100 * summary['See']:.2f}  Segment (cIoU) {100 * summary['Segment']:.2f}  "
            f"({summary['num_queries']} queries)"
        )
    else:
        pictures = None
        if analysis:
            pictures = V.AnalysisPictures(analysis, cfg.sam, V.reader_image_fn(reader), limit=analysis_limit)
        summary, records = E.evaluate_reasonseg(
            model,
            batches,
            threshold_search=threshold_search,
            points_prompt=E.points_prompt_config(cfg.sasp, points_prompt_num) if analysis else None,
            tokenizer=tokenizer,
            meta_fn=reason_seg_meta_with_kind(reader) if kind == "reasonseg" else None,
            on_maps=pictures,
            evaluator=ev,
            total=total,
            progress=progress,
            desc=split,
        )
        line = (
            f"{split}: gIoU {100 * summary['gIoU']:.2f}  cIoU {100 * summary['cIoU']:.2f}  "
            f"({summary['num_queries']} queries)"
        )
        for k, name in (
            ("short", "short"),
            ("long", "long"),
            ("threshold_search", "threshold search"),
            ("points_as_prompt", "points as prompt"),
            ("all_foreground", "all-foreground baseline"),
        ):
            if k in summary:
                line += (
                    f"\n  {name}: gIoU {100 * summary[k]['gIoU']:.2f}  cIoU {100 * summary[k]['cIoU']:.2f}"
                )
        for k, m in summary.get("by_query_kind", {}).items():
            line += f"\n  {k} ({m['num_queries']} queries): gIoU {100 * m['gIoU']:.2f}  cIoU {100 * m['cIoU']:.2f}"
        if pictures is not None:
            meta["pictures"] = {"dir": os.path.abspath(analysis), "count": len(pictures.paths)}
    summary = {**meta, **summary}
    s_path, r_path = E.write_results(out, summary, records)
    print(line)
    print(f"wrote {s_path} and {r_path}")
    return summary


def reason_seg_meta_with_kind(reader):
    """`evaluation.reason_seg_meta`, plus the query kind of the generated shapes set (`make_shapes.query_kind`)
    when the text is one of its phrasings: the summary then gives gIoU/cIoU per kind."""
    from read_jax import evaluation as E
    from read_jax.data.make_shapes import query_kind

    base = E.reason_seg_meta(reader)

    def fn(example_index: int, query_index: int) -> dict:
        meta = base(example_index, query_index)
        kind = query_kind(meta["text"]) if "text" in meta else None
        return {**meta, "query_kind": kind} if kind else meta

    return fn


def _process_count() -> int:
    import jax

    return jax.process_count()


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "a configs/*.py file (the one train.py used)", lock_config=False
    )
    flags.DEFINE_string("checkpoint", None, "train.py workdir or converted checkpoint directory")
    flags.DEFINE_string(
        "split",
        "reasonseg_val",
        "reasonseg_val|reasonseg_test|refcoco_val|refcoco+_testA|"
        "refcocog_test|fprefcoco_val|fprefcoco+_val|fprefcocog_val|...",
    )
    flags.DEFINE_string("out", None, "output directory (default: CHECKPOINT/eval/SPLIT)")
    flags.DEFINE_bool(
        "threshold-search",
        False,
        "Appendix A.1: per-query best threshold (0.01 grid) of the [SEG] similarity map, scored as a mask",
    )
    flags.DEFINE_string(
        "analysis",
        None,
        "Appendix B: write per-query analysis PNGs to this directory and score the "
        "similarity points alone as plain SAM prompts (points as prompt)",
    )
    flags.DEFINE_bool("sweep", False, "Appendix C / Table 8: sweep t_pos/t_neg x |P| and print the table")
    flags.DEFINE_enum(
        "which",
        "best",
        ["best", "latest", "init"],
        "train.py workdir: 'best' (by cIoU) or 'latest' checkpoint, or 'init': the run's untrained "
        "starting point (its frozen base and freshly initialised trainables), as a baseline",
    )
    flags.DEFINE_integer("max-new-tokens", 512, "FP-RefCOCO generation budget (the reference: 512)")
    flags.DEFINE_integer(
        "points-prompt-num", None, "Appendix B: number of similarity points (default: SasP's)"
    )
    flags.DEFINE_integer("analysis-limit", None, "Appendix B: at most this many PNGs")
    flags.DEFINE_integer("max-batches", None, "stop after this many batches (quick looks; not the protocol)")
    flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
    from absl import flags

    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    f = flags.FLAGS
    try:
        run(
            f.config,
            f.checkpoint,
            f.split,
            out=f.out,
            threshold_search=f["threshold-search"].value,
            analysis=f.analysis,
            sweep=f.sweep,
            which=f.which,
            max_new_tokens=f["max-new-tokens"].value,
            points_prompt_num=f["points-prompt-num"].value,
            analysis_limit=f["analysis-limit"].value,
            max_batches=f["max-batches"].value,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app
    from absl import flags as _flags

    _define_flags()
    if any(a in ("-h", "--help", "--helpshort") for a in sys.argv[1:]):
        # absl's own --help exits with status 1; asking for help is not an error.
        print(__doc__ + "\nflags:\n" + _flags.FLAGS.main_module_help())
        sys.exit(0)
    app.run(main)
