"""Writing the whole mix into a SESAME-style `dataset/` root, in parallel, resumably.

Scene streams: every scene is drawn from `np.random.default_rng([seed, STREAMS[(pool, split)], index])`
(its geometry and picture; its annotations from a child generator of the same seed). A (pool, split) pair
has its own stream id, so no held-out scene (val/test: ReasonSeg, RefCOCO's, VQA's) is a scene of any
training pool: held-out and training pictures come from different generators by construction (and the
tests hash them). Ids 0-2 are ReasonSeg's train/val/test, as they always were (`reason.make_example`).

Pools and where their pictures go (`root` = the dataset root):
  reason_seg  {reason_seg_dir}/{split}/shapes_{split}_{i}.jpg + .json              train, val, test
  mapillary   mapillary/training/images/shapes_mapillary_train_{i}.jpg (+ v2.0/labels/*.png)   train
  paco_lvis   coco/train2017/shapes_paco_lvis_train_{i}.jpg                                    train
  vqa         coco/train2017/shapes_vqa_train_{i}.jpg; held-out coco/val2017/shapes_vqa_{split}_{i}.jpg
  refer       refer_seg/images/mscoco/images/train2014/shapes_refer_{split}_{i}.jpg    train, val, test
  refclef     refer_seg/images/saiapr_tc-12/shapes_refclef_train_{i}.jpg                       train
The refer pool's scenes carry RefCOCO, RefCOCO+, RefCOCOg, R-RefCOCO(+/g) and FP-RefCOCO(+/g) alike (as
the real sets share COCO's pictures), each with its own expressions.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import pickle
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from read_jax.data.shapes import files, reason, refer, semseg, vqa
from read_jax.data.shapes.scene import SPLITS, layout, render

SOURCES = ("sem_seg", "refer_seg", "correct_refer_seg", "vqa", "neg_refer_seg", "reason_seg")
STREAMS = {
    ("reason_seg", "train"): 0,
    ("reason_seg", "val"): 1,
    ("reason_seg", "test"): 2,
    ("mapillary", "train"): 3,
    ("paco_lvis", "train"): 4,
    ("refer", "train"): 5,
    ("refclef", "train"): 6,
    ("vqa", "train"): 7,
    ("refer", "val"): 8,
    ("refer", "test"): 9,
    ("vqa", "val"): 10,
    ("vqa", "test"): 11,
}
SOURCE_POOLS = {
    "sem_seg": ("mapillary", "paco_lvis"),
    "refer_seg": ("refer", "refclef"),
    "correct_refer_seg": ("refer",),
    "vqa": ("vqa",),
    "neg_refer_seg": ("refer",),
    "reason_seg": ("reason_seg",),
}
# The sub-datasets each source is written as (`mixture.build_reference_sources(sub_datasets=...)`).
SUB_DATASETS = {
    "sem_seg": ("mapillary", "paco_lvis"),
    "refer_seg": ("refclef", "refcoco", "refcoco+", "refcocog"),
    "neg_refer_seg": ("R-refcoco", "R-refcoco+", "R-refcocog"),
    "correct_refer_seg": ("fprefcoco", "fprefcoco+", "fprefcocog"),
}
_REFER_SETS = {
    "refer_seg": ("refcoco", "refcoco+", "refcocog"),
    "neg_refer_seg": ("R-refcoco", "R-refcoco+", "R-refcocog"),
    "correct_refer_seg": ("fprefcoco", "fprefcoco+", "fprefcocog"),
}
IMAGE_ID_BASE = {"train": 1, "val": 100_000_001, "test": 200_000_001}  # COCO ids of the refer pool's scenes
VQA_HELD_OUT_JSON = "llava_dataset/shapes_vqa_{split}.json"  # LLaVA's layout, images coco/val2017/


def vqa_paths(root: str, split: str = "train") -> tuple[str, str]:
    """(LLaVA-layout json, image root) of the VQA conversations of `split`, for `VqaReader(*vqa_paths(...))`.
    The held-out splits (val, test) are not a LLaVA file: they are ours, in its layout."""
    if split == "train":
        return os.path.join(root, "llava_dataset", "llava_instruct_150k.json"), os.path.join(
            root, "coco", "train2017"
        )
    return os.path.join(root, VQA_HELD_OUT_JSON.format(split=split)), os.path.join(root, "coco", "val2017")


def default_reason_seg_dir(root: str) -> str:
    return os.path.join(root, "reason_seg", "ReasonSeg")


def image_path(root: str, pool: str, split: str, index: int) -> str:
    """Where the picture of scene (pool, split, index) goes (the ReasonSeg pool: `reason.example_paths`)."""
    stem = f"shapes_{pool}_{split}_{index:05d}.jpg"
    where = {
        "mapillary": ("mapillary", "training", "images"),
        "paco_lvis": ("coco", "train2017"),
        "vqa": ("coco", "train2017" if split == "train" else "val2017"),
        "refer": ("refer_seg", "images", "mscoco", "images", "train2014"),
        "refclef": ("refer_seg", "images", "saiapr_tc-12"),
    }[pool]
    return os.path.join(root, *where, stem)


def label_path(root: str, index: int) -> str:
    return os.path.join(
        root, "mapillary", "training", "v2.0", "labels", f"shapes_mapillary_train_{index:05d}.png"
    )


def _scene_rngs(seed: int, pool: str, split: str, index: int):
    scene_seq, ann_seq = np.random.SeedSequence([seed, STREAMS[(pool, split)], index]).spawn(2)
    scene_rng, ann_rng = np.random.default_rng(scene_seq), np.random.default_rng(ann_seq)
    return layout(scene_rng), scene_rng, ann_rng


def scene_of(seed: int, pool: str, split: str, index: int) -> tuple[int, int, list[dict]]:
    """The geometry (width, height, instances) of scene `index` of (pool, split), as written (not ReasonSeg,
    whose scenes come from `reason.make_example`)."""
    return _scene_rngs(seed, pool, split, index)[0]


def scene_job(job: tuple) -> object:
    """Write one scene's own files (those absent when `missing_only`) and return what the index files need
    from it. job = (pool, split, index, seed, root, reason_seg_dir, missing_only, refer_sets)."""
    pool, split, index, seed, root, reason_dir, missing_only, refer_sets = job
    if pool == "reason_seg":
        reason.write_example(reason_dir, split, index, seed, missing_only=missing_only)
        return None
    (w, h, shapes), scene_rng, ann_rng = _scene_rngs(seed, pool, split, index)
    jpg = image_path(root, pool, split, index)
    need_image = not (missing_only and os.path.exists(jpg))
    record: object = None
    if pool == "mapillary":
        lab = label_path(root, index)
        if not (missing_only and os.path.exists(lab)):
            files.atomic_image(lab, semseg.label_map(w, h, shapes), "PNG")
    elif pool == "paco_lvis":
        image_id = index + 1
        entry = {"id": image_id, "file_name": f"train2017/{os.path.basename(jpg)}", "height": h, "width": w}
        record = (entry, semseg.paco_annotations(shapes, image_id))
    elif pool == "vqa" and split == "train":
        stem, image = os.path.basename(jpg)[:-4], os.path.basename(jpg)
        record = [{"id": stem, "image": image, "conversations": vqa.conversation(ann_rng, w, h, shapes)}]
    elif pool == "vqa":  # held out: one single-round item per question kind
        record = vqa.probe_items(ann_rng, w, h, shapes, os.path.basename(jpg)[:-4], os.path.basename(jpg))
    else:  # refer, refclef
        image_id = IMAGE_ID_BASE[split] + index
        entry, anns = refer.instances(w, h, shapes, image_id, os.path.basename(jpg))
        refs = refer.scene_refs(
            ann_rng,
            shapes,
            refer_sets,
            lambda d: refer.split_name(d, split, index),
            image_id,
            entry["file_name"],
        )
        record = (entry, anns, refs)
    if need_image:
        files.atomic_image(jpg, render(scene_rng, w, h, shapes), "JPEG")
    return record


def parse_train_of(spec: str) -> dict[str, int]:
    """ "reason_seg:10000,vqa:3000" -> {"reason_seg": 10000, "vqa": 3000}; "" -> {}."""
    out = {}
    for part in (p.strip() for p in str(spec or "").split(",")):
        if not part:
            continue
        src, sep, n = part.partition(":")
        if not sep or src.strip() not in SOURCE_POOLS or not n.strip().isdigit():
            raise ValueError(
                f"training scenes per source {spec!r}: write SOURCE:N[,SOURCE:N], SOURCE one of {SOURCES}"
            )
        out[src.strip()] = int(n)
    return out


def pool_counts(
    sources: Iterable[str], counts: Mapping[str, int], train_of: Mapping[str, int] | None = None
) -> dict[tuple[str, str], int]:
    """{(pool, split): scenes} for `sources` with `counts` = {"train": n, "val": n, "test": n}: every pool
    gets `counts["train"]` training scenes, or `train_of[source]` for a source named there (a pool two
    sources share gets the larger); ReasonSeg, the refer pool (RefCOCO's val/test, FP-RefCOCO's val) and VQA
    also get the held-out counts."""
    train_of = dict(train_of or {})
    unknown = sorted(set(train_of) - set(SOURCE_POOLS))
    if unknown:
        raise ValueError(f"training counts for unknown sources {unknown}; known: {SOURCES}")
    out = {}
    for src in sources:
        if src not in SOURCE_POOLS:
            raise ValueError(f"unknown source {src!r}; known: {SOURCES}")
        for pool in SOURCE_POOLS[src]:
            for split in SPLITS:
                n = int(train_of.get(src, counts.get(split, 0)) if split == "train" else counts.get(split, 0))
                if (pool, split) in STREAMS and n > 0:
                    out[(pool, split)] = max(n, out.get((pool, split), 0))
    return out


def _start_method() -> str:
    """ "fork" (workers start at once) unless JAX has started its backend threads in this process, which a
    fork would copy mid-flight: then "spawn" (each worker imports read_jax, a few seconds)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    xb = sys.modules.get("jax._src.xla_bridge")
    try:
        started = xb is not None and xb.backends_are_initialized()
    except AttributeError:  # another JAX: assume the worst
        started = True
    return "spawn" if started else "fork"


def _die_with_parent() -> None:
    """A worker ends when the writer does (Linux): a killed run leaves no orphans writing behind it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run(jobs: list[tuple], workers: int, progress: bool) -> list:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="shapes mix", unit="scene", disable=not progress)
    results = []
    if workers <= 1 or len(jobs) < 64:
        for j in jobs:
            results.append(scene_job(j))
            bar.update(1)
    else:
        ctx = multiprocessing.get_context(_start_method())
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_die_with_parent) as ex:
            for r in ex.map(scene_job, jobs, chunksize=32):
                results.append(r)
                bar.update(1)
    bar.close()
    return results


def _dump_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _refer_index(records: list, sets: Sequence[str]) -> dict[str, bytes]:
    """{relative path: bytes} of the refer sets' instances.json and refs pickles."""
    out = {}
    if not records:
        return out
    images = [r[0] for r in records]
    anns = [a for r in records for a in r[1]]
    inst = _dump_json({"images": images, "annotations": anns, "categories": refer.CATEGORIES})
    for d in sets:
        from read_jax.data.readers.refer import split_by

        refs = [ref for r in records for ref in r[2].get(d, [])]
        out[f"refer_seg/{d}/instances.json"] = inst
        # Through json first: the pickle's memo then depends on the data alone, not on which objects the
        # scene records share (they differ between in-process and worker results).
        out[f"refer_seg/{d}/refs({split_by(d)}).p"] = pickle.dumps(json.loads(json.dumps(refs)), protocol=2)
    return out


def index_files(results: Mapping[tuple[str, str], list], sources: Sequence[str]) -> dict[str, bytes]:
    """The annotation files that list many scenes, from the scene records of each (pool, split)."""
    out: dict[str, bytes] = {}
    if "sem_seg" in sources:
        out["mapillary/config_v2.0.json"] = _dump_json(semseg.mapillary_config())
        paco = results.get(("paco_lvis", "train"), [])
        out["vlpart/paco/annotations/paco_lvis_v1_train.json"] = _dump_json(
            {
                "images": [r[0] for r in paco],
                "annotations": [a for r in paco for a in r[1]],
                "categories": semseg.paco_categories(),
            }
        )
    if "vqa" in sources:
        items = [it for r in results.get(("vqa", "train"), []) for it in r]
        out["llava_dataset/llava_instruct_150k.json"] = _dump_json(items)
        for split in ("val", "test"):
            if ("vqa", split) in results:
                items = [it for r in results[("vqa", split)] for it in r]
                out[VQA_HELD_OUT_JSON.format(split=split)] = _dump_json(items)
    sets = [d for src in sources for d in _REFER_SETS.get(src, ())]
    refer_records = [r for split in SPLITS for r in results.get(("refer", split), [])]
    out.update(_refer_index(refer_records, sets))
    if "refer_seg" in sources:
        out.update(_refer_index(results.get(("refclef", "train"), []), ["refclef"]))
    return out


def scene_files(root: str, reason_dir: str, pool: str, split: str, index: int) -> list[str]:
    """The files of one scene (besides the index files)."""
    if pool == "reason_seg":
        return list(reason.example_paths(reason_dir, split, index))
    jpg = image_path(root, pool, split, index)
    return [jpg, label_path(root, index)] if pool == "mapillary" else [jpg]


def _complete(root: str, reason_dir: str, plan: Mapping[tuple[str, str], int], key: dict) -> bool:
    """True when the last completed write of `root` was this plan and none of its files is gone."""
    m = files.read_marker(root) or {}
    if m.get("complete") != key:
        return False
    if not all(os.path.exists(os.path.join(root, rel)) for rel in m.get("written") or {}):
        return False
    return all(
        os.path.exists(p)
        for (pool, split), n in plan.items()
        for i in range(n)
        for p in scene_files(root, reason_dir, pool, split, i)
    )


def write_mix(
    root: str,
    counts: Mapping[str, int],
    seed: int = 0,
    sources: Sequence[str] = SOURCES,
    *,
    reason_seg_dir: str | None = None,
    train_of: Mapping[str, int] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[tuple[str, str], int]:
    """Write (or top up) the shapes mix of `sources` into `root`; returns {(pool, split): scenes}.

    Resumable: a scene's own files (pictures, label maps, ReasonSeg jsons) are written only when absent (a
    pure function of (seed, pool, split, index): an interrupted run resumes, a larger count extends); the
    index files (refs, instances, LLaVA and PACO jsons) list the scenes of this call's counts and are
    rewritten unless edited by hand (`files.write_index_files`). A call whose plan the marker records as
    complete, with every file present, returns at once. `root` must be the generator's or new
    (FileExistsError otherwise) and of the same seed; `reason_seg_dir` (default `root/reason_seg/ReasonSeg`)
    must lie inside it. `train_of`: {source: training scenes} where a source takes another count than
    `counts["train"]` (`pool_counts`). `workers`: processes (None: the CPU count; small jobs run in-process).
    """
    reason_dir = reason_seg_dir or default_reason_seg_dir(root)
    rel = os.path.relpath(os.path.abspath(reason_dir), os.path.abspath(root))
    if rel.startswith(os.pardir):
        raise ValueError(f"the ReasonSeg directory {reason_dir} is outside the generated root {root}")
    marker_seed = files.claim(root, seed)
    if marker_seed != int(seed):
        raise ValueError(f"{root} was generated with seed {marker_seed}, not {seed}: use another directory")
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {SOURCES}")
    sources = [s for s in SOURCES if s in sources]
    plan = pool_counts(sources, counts, train_of)
    key = {"sources": sources, "counts": {s: int(counts.get(s, 0)) for s in SPLITS}, "reason_seg_dir": rel}
    if train_of:
        key["train_of"] = {k: int(v) for k, v in sorted(train_of.items())}
    if _complete(root, reason_dir, plan, key):
        return plan
    files.remove_stale_tmp(root)  # what an interrupted run left half-written
    coco_sets = tuple(d for src in sources for d in _REFER_SETS.get(src, ()))
    jobs = [
        (pool, split, i, int(seed), root, reason_dir, True, ("refclef",) if pool == "refclef" else coco_sets)
        for (pool, split), n in plan.items()
        for i in range(n)
    ]
    flat = _run(jobs, (os.cpu_count() or 1) if workers is None else workers, progress)
    results: dict[tuple[str, str], list] = {}
    for job, rec in zip(jobs, flat):
        results.setdefault((job[0], job[1]), []).append(rec)
    files.write_index_files(root, index_files(results, sources))
    files.update_marker(root, complete=key)
    return plan
