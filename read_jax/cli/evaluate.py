"""Evaluate a READ checkpoint: the paper's protocols and the appendix analyses (`read_jax.eval`).

    python evaluate.py --config configs/tiny.py:read --checkpoint runs/read --split reasonseg_test \\
        --out runs/read/eval [--threshold-search] [--analysis runs/read/eval/pictures] [--sweep]
    python evaluate.py --config configs/read_7b_reasonseg.py --checkpoint ckpt/read7b --split reasonseg_val \\
        --config.data.root=dataset
    python evaluate.py --config configs/read_7b_reasonseg.py --checkpoint ckpt/read7b_fprefcoco \\
        --split fprefcoco_val --config.data.root=dataset

--checkpoint is a `train.py --workdir` (frozen base + trained trainables; best-by-cIoU unless --which=latest;
--which=init scores the run's untrained starting point, a baseline) or a converted checkpoint
(`convert_weights.py`, `inference.save_for_inference`: config.json + params/, whose config.json gives the
architecture). --config supplies the data, mesh and eval settings; any field can be overridden with
`--config.<section>.<field>=value`. The model's dtype is the checkpoint's (`--dtype` picks another, e.g.
bf16 scoring of an fp32 conversion; the summary records it).

Splits: reasonseg_{val,test} (teacher-forced, LISA's fixed templates; test adds short/long),
  refcoco_{val,testA,
testB}, refcoco+_{val,testA,testB}, refcocog_{val,test} (teacher-forced), fprefcoco_val, fprefcoco+_val,
fprefcocog_val, R-refcoco_val, R-refcoco+_val, R-refcocog_val (free greedy generation: See / Segment).

Modes (on top of the protocol):
  --threshold-search  Appendix A.1: per query the best threshold (0.01 grid) of the [SEG] similarity map, and
                      the gIoU/cIoU of the similarity map as a mask.
  --analysis DIR      Appendix B: one PNG per query in DIR (image, similarity heat map, SasP points,
  prediction,
                      GT, points-only mask) and the "points as prompt" gIoU/cIoU (Fig. 6).
  --sweep             Appendix C / Table 8: t_pos/t_neg in {.8/.2, .7/.3, .6/.4} x |P| in {10, 30, 60}; prints
                      the table and writes sweep.json (instead of the single protocol run).
  --generate          RefCOCO/+/g by free greedy generation as `test_read.py` runs them (R-RefCOCO/+/g and
                      FP-RefCOCO/+/g always are): See / Segment.
  --dump-masks        every query's predicted and GT masks in OUT/masks/*.npz; `python -m read_jax.cli.rescore
                      OUT` recomputes the figures from them.
Every image is scored at its original size (`--config.eval.max_mask_side=N` caps it, recorded in the summary).
Outputs: OUT/summary.json and OUT/samples.jsonl (one record per query: id, query, IoU, points, presence).
"""

from __future__ import annotations

import sys

from read_jax.cli import common
from read_jax.config import ConfigError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rest, overrides = common.split_overrides(argv)
    except ConfigError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    p = common.parser("evaluate.py", __doc__, config=True)
    p.add_argument("--checkpoint", required=True, help="train.py workdir or converted checkpoint directory")
    p.add_argument(
        "--split",
        default="reasonseg_val",
        help="reasonseg_val|reasonseg_test|refcoco_val|refcoco+_testA|refcocog_test|fprefcoco_val|...",
    )
    p.add_argument("--out", help="output directory (default: CHECKPOINT/eval/SPLIT)")
    p.add_argument(
        "--threshold-search",
        action="store_true",
        help="Appendix A.1: per-query best threshold (0.01 grid) of the [SEG] similarity map",
    )
    p.add_argument(
        "--analysis",
        metavar="DIR",
        help="Appendix B: per-query analysis PNGs in DIR and the points-as-prompt score",
    )
    p.add_argument("--sweep", action="store_true", help="Appendix C / Table 8: sweep t_pos/t_neg x |P|")
    p.add_argument(
        "--generate",
        action="store_true",
        help="RefCOCO/+/g (or ReasonSeg) by free greedy generation, as test_read.py (See / Segment)",
    )
    p.add_argument(
        "--dump-masks",
        action="store_true",
        help="write every query's predicted and GT masks to OUT/masks (python -m read_jax.cli.rescore OUT)",
    )
    p.add_argument(
        "--which",
        default="best",
        choices=("best", "latest", "init"),
        help="train.py workdir: 'best' (by cIoU) or 'latest' checkpoint, or 'init' (the untrained start)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=512, help="FP-RefCOCO generation budget (reference: 512)"
    )
    p.add_argument(
        "--points-prompt-num", type=int, help="Appendix B: number of similarity points (default: SasP's)"
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        help="score in this compute/parameter dtype instead of the checkpoint's (a converted checkpoint's "
        "config.json, a workdir's run config); recorded in the summary",
    )
    p.add_argument("--analysis-limit", type=int, help="Appendix B: at most this many PNGs")
    p.add_argument(
        "--max-batches", type=int, help="stop after this many batches (quick looks; not the protocol)"
    )
    args = p.parse_args(rest)

    def body() -> int:
        from read_jax.eval.run import run

        config = common.load_run_config(args.config, overrides)
        run(
            config,
            common.absolute(args.checkpoint),
            args.split,
            out=common.absolute(args.out),
            threshold_search=args.threshold_search,
            analysis_dir=common.absolute(args.analysis),
            sweep=args.sweep,
            which=args.which,
            max_new_tokens=args.max_new_tokens,
            points_prompt_num=args.points_prompt_num,
            analysis_limit=args.analysis_limit,
            max_batches=args.max_batches,
            generate=args.generate,
            dump_masks=args.dump_masks,
            dtype=args.dtype,
        )
        return 0

    common.setup_logging()
    return common.run_main("evaluate.py", body, args.debug)
