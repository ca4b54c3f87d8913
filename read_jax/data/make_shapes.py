"""The generated shapes world as READ's whole data mix, in a SESAME-style `dataset/` root.

    python -m read_jax.data.make_shapes --out DIR [--num-train 2000 --num-val 200 --num-test 200 --seed 0]
        [--num-train-of reason_seg:10000]
        [--sources sem_seg,refer_seg,correct_refer_seg,vqa,neg_refer_seg,reason_seg] [--workers N]

writes scenes of coloured shapes (circle, triangle, square, pentagon, hexagon, star in six colours, at
several image sizes and aspect ratios) as every source READ trains on, each at its real path and in its real
format (read_reference.md §9), so the real readers read them:

  reason_seg/ReasonSeg/{train,val,test}/   ReasonSeg: one-step reasoning queries + false_premise_QA
  mapillary/, vlpart/paco/ + coco/train2017/   sem_seg: a class per kind (Mapillary), per colour + kind (PACO)
  refer_seg/{refclef,refcoco,refcoco+,refcocog}/ + refer_seg/images/   refer_seg: explicit references
  refer_seg/R-refcoco{,+,g}/               neg_refer_seg: R-RefCOCO, with expressions of absent objects
  refer_seg/fprefcoco{,+,g}/               correct_refer_seg: FP-RefCOCO, false premises + gt_sent
  llava_dataset/llava_instruct_150k.json + coco/train2017/   vqa: LLaVA-Instruct conversations
  llava_dataset/shapes_vqa_{val,test}.json + coco/val2017/   held-out VQA (same layout; one single-round
                                           item per scene and question kind, for scoring per kind)

Train counts are per source (`--num-train`, or `--num-train-of` for the sources it names); the held-out
val/test counts apply to ReasonSeg, RefCOCO's val/test splits (FP-RefCOCO's and R-RefCOCO's val) and VQA,
whose held-out scenes share no scene with any training source. Read it with
`mixture.build_reference_sources(DIR, sub_datasets=SUB_DATASETS)` or a run config with `data.root=DIR`,
`data.sem_seg_data="mapillary||paco_lvis"`. Every file is written atomically; a rerun writes only what is
missing (resumable, and a larger count extends the set); the same seed writes the same bytes. DIR must be new,
empty, or written by this command (it holds its marker, `.read_jax_shapes.json`). The scenes, queries and
formats: `read_jax.data.shapes`."""

from __future__ import annotations

import argparse
import sys
import time

from read_jax.data.shapes import (  # noqa: F401  (the public names of the shapes world, importable from here)
    COLORS,
    MARKER,
    QUERY_KIND_PATTERNS,
    SHAPES,
    SOURCES,
    SPLITS,
    SUB_DATASETS,
    VQA_KINDS,
    default_reason_seg_dir,
    example_paths,
    is_foreign,
    make_example,
    parse_train_of,
    query_kind,
    random_scene,
    read_marker,
    scene_of,
    vqa_key,
    vqa_kind,
    vqa_paths,
    write_marker,
    write_mix,
    write_split,
)
from read_jax.data.shapes.reason import _make_example  # noqa: F401  (tests read the query kind it drew)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the dataset root to write (new, empty, or this command's)")
    p.add_argument("--num-train", type=int, default=2000, help="training scenes per source")
    p.add_argument(
        "--num-train-of",
        default="",
        help="SOURCE:N[,SOURCE:N]: another training count for these sources (e.g. reason_seg:10000)",
    )
    p.add_argument("--num-val", type=int, default=200, help="held-out val scenes (ReasonSeg, RefCOCO, VQA)")
    p.add_argument("--num-test", type=int, default=200, help="held-out test scenes (ReasonSeg, RefCOCO, VQA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sources", default=",".join(SOURCES), help="comma-separated sources to write")
    p.add_argument(
        "--reason-seg-dir",
        default=None,
        help="ReasonSeg directory inside --out (default OUT/reason_seg/ReasonSeg)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: the CPU count)")
    args = p.parse_args(argv)
    counts = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    if any(n < 0 for n in counts.values()):
        p.error("split sizes must be >= 0")
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    t0 = time.perf_counter()
    try:
        plan = write_mix(
            args.out,
            counts,
            args.seed,
            sources,
            reason_seg_dir=args.reason_seg_dir,
            train_of=parse_train_of(args.num_train_of),
            workers=args.workers,
        )
    except (FileExistsError, ValueError) as e:
        print(f"make_shapes: {e}", file=sys.stderr)
        return 2
    took = time.perf_counter() - t0
    print(f"wrote {sum(plan.values())} scenes ({', '.join(sources)}; {counts}) to {args.out} in {took:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
