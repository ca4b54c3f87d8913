"""The paper's evaluation protocols over batches of the eval pipeline: ReasonSeg/RefCOCO teacher-forced gIoU
and
cIoU (with the appendix analyses), the Table 8 sweep, and FP-RefCOCO "See"/"Segment" through free generation.

PyTorch reference: rui-qian/READ@2549240 `train_read.py:455-506` (`validate`: teacher-forced ReasonSeg and
RefCOCO), `utils.py:80-92` (`intersectionAndUnionGPU`), `test_read.py` + `model/READ.py:900-1012` (FP-RefCOCO
through free generation); read_reference.md §4, §8, §11, §13 items 10-12.

Metrics (read_reference.md §8.1): prediction = the first [SEG]'s mask logits > 0 (all zero for a row that has
no
[SEG]); per query I and U count foreground pixels inside the row's image, GT 255 ignored. I and U leave the
device
as int32 per row, and padding rows are dropped on the host before anything is summed (`records.row_valid`).

Deliberate choices (documented where they differ from the reference):
  * Every row is scored at its image's original size, as the reference does (cIoU weighs each image by its
    native pixel count), in bounded memory: the masks are upsampled and compared band by band
    (`stages.score_bands`). Only an explicit cap (`eval.max_mask_side` > 0) scores a downscaled GT (the mask
    is then decoded straight to that size); each record carries `scored_hw` and `native_hw`, and the summary
    `downscaled_queries` (the protocol's figures need 0).
  * Appendix A.1 thresholds the reference's full-resolution similarity map (`sasp.similarity_map_full`),
    values
    in [0, 1]: pixel predicted iff S >= t, t on the 0.01 grid; the best threshold of each query maximises that
    query's IoU; ties go to the smallest threshold.
  * Appendix B's "points as prompt" uses SasP's "topk" mode (the Q/2 highest cells positive, the Q/2 lowest
    negative) as prompts WITHOUT the [SEG] embedding, through a SAM prompt encoder + mask decoder. The default
    SAM
    is READ's own (its prompt encoder is SAM's, frozen; its mask decoder is fine-tuned); pass `points_sam=` a
    plain `Sam` for the paper's "original SAM".
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from read_jax import sharding as shd
from read_jax.config import SaspConfig
from read_jax.eval import dumps
from read_jax.eval.analysis import TABLE8_NUM_POINTS, TABLE8_THRESHOLDS, best_thresholds
from read_jax.eval.records import (
    batch_records,
    fp_summary_from_records,
    gather_records,
    points_json,
    query_text,
    row_valid,
    summary_from_records,
)
from read_jax.eval.stages import DecodeOptions, Evaluator, check_batch, local_rows
from read_jax.metrics import IoUMeter, query_iou


def _iterate(batches, total: int | None, desc: str, progress: bool):
    if not progress:
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=desc, unit="batch", dynamic_ncols=True)


def _summarise(records: list[dict], summary_fn: Callable, t0: float) -> tuple[dict, list[dict]]:
    """Every host's records (on every host), their summary and the throughput since `t0`."""
    records = gather_records(records)
    wall = time.perf_counter() - t0
    summary = summary_fn(records)
    summary["downscaled_queries"] = sum(r.get("scored_hw") != r.get("native_hw") for r in records)
    summary["wall_s"] = wall
    summary["samples_per_s"] = len(records) / wall if wall > 0 else 0.0
    return summary, records


def _resolution(
    batch: Mapping[str, Any], res: dict, recs: list[dict], rows: np.ndarray, dump_dir: str | None
) -> None:
    """`scored_hw` (the GT extent the row was scored at) and `native_hw` (its image's size) of each record;
    with `dump_dir`, the row's predicted and GT masks at that extent (`dumps.write_masks`)."""
    conv_image = np.asarray(batch["conv_image"])
    for rec, r in zip(recs, rows):
        h, w = (int(v) for v in np.asarray(batch["mask_hw"])[r])
        rec["scored_hw"] = [h, w]
        rec["native_hw"] = [int(v) for v in np.asarray(batch["orig_hw"])[conv_image[r]]]
        if dump_dir is not None:
            dumps.write_masks(
                dump_dir, rec, res["pred_mask"][r, :h, :w], np.asarray(batch["masks"])[r, :h, :w]
            )


def evaluate_reasonseg(
    model,
    batches_or_loader: Iterable[Mapping[str, Any]],
    *,
    mesh=None,
    canvas_hw: tuple[int, int] | None = None,
    sasp_cfg: SaspConfig | None = None,
    threshold_search: bool = False,
    points_prompt: SaspConfig | None = None,
    tokenizer=None,
    meta_fn: Callable[[int, int], dict] | None = None,
    on_maps: Callable[[Mapping[str, Any], dict, np.ndarray], None] | None = None,
    points_sam=None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    total: int | None = None,
    desc: str = "eval",
    dump_dir: str | None = None,
) -> tuple[dict, list[dict]]:
    """The teacher-forced protocol (ReasonSeg val/test, RefCOCO/+/g): gIoU and cIoU.

    The batches come from `read_jax.data.pipeline.eval_dataset` (prompt + GT answer, e.g. ReasonSeg's
    "Sure, the segmentation result is [SEG]."); usable from a training loop with the live model.

    Args:
      model: ReadModel.
      batches_or_loader: eval batches (numpy dicts as the pipeline yields them).
      mesh: data-parallel mesh (None: default device). The per-host batch must split over its devices.
      canvas_hw: expected (Hc, Wc) of the batches' GT canvas (checked; default: the batch's).
      sasp_cfg: SasP override (Table 8 sweeps); default the model's.
      threshold_search: Appendix A.1 (adds `threshold`, `ts_intersection`, `ts_union` to the records).
      points_prompt: Appendix B points-only SasP setting (`points_prompt_config`); adds `pp_*` fields.
      tokenizer: fills each record's `query` (decoded question).
      meta_fn: (example_index, query_index) -> extra record fields (`reason_seg_meta(reader)` gives
        `is_sentence`, which enables the short/long figures).
      on_maps: callback(batch, results, valid_rows) with the maps (turns on `return_maps`): pictures.
      evaluator: reuse an `Evaluator` (its model and mesh win over `model`/`mesh`).
      dump_dir: write every query's predicted and GT masks under it (`dumps`; re-scored by `dumps.rescore`).
    Returns:
      (summary {"gIoU", "cIoU", "num_queries", ["short", "long", "threshold_search", "points_as_prompt"],
      "samples_per_s"}, per-query records).
    """
    ev = evaluator or Evaluator(model, mesh, points_sam)
    records: list[dict] = []
    seen: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for batch in _iterate(batches_or_loader, total, desc, progress):
        canvas = check_batch(batch, canvas_hw, ev.mesh)
        opts = DecodeOptions(
            canvas_hw=canvas,
            sasp=sasp_cfg,
            threshold_search=threshold_search,
            points_prompt=points_prompt,
            return_maps=on_maps is not None,
            return_pred=dump_dir is not None,
        )
        res = ev.run(batch, opts)
        valid = row_valid(batch)
        recs = batch_records(batch, res, valid, tokenizer, meta_fn, seen)
        rows = np.flatnonzero(valid)
        _resolution(batch, res, recs, rows, dump_dir)
        for rec, r in zip(recs, rows):
            rec.update(fg_intersection=int(res["fg_inter"][r]), fg_union=int(res["fg_union"][r]))
        if threshold_search:
            thr, ti, tu = best_thresholds(res["hist_fg"][rows], res["hist_all"][rows])
            for rec, t, i, u in zip(recs, thr, ti, tu):
                rec.update(
                    threshold=round(float(t), 2),
                    ts_intersection=int(i),
                    ts_union=int(u),
                    ts_iou=float(query_iou(i, u)),
                )
        if points_prompt is not None:
            for rec, r in zip(recs, rows):
                i, u = int(res["pp_inter"][r]), int(res["pp_union"][r])
                rec.update(
                    pp_intersection=i,
                    pp_union=u,
                    pp_iou=float(query_iou(i, u)),
                    pp_points=points_json(res["pp_points"][r], res["pp_labels"][r]),
                )
        if on_maps is not None:
            on_maps(batch, res, rows)
        records.extend(recs)
    return _summarise(records, summary_from_records, t0)


def sweep_sasp(
    model,
    batches_or_loader: Iterable[Mapping[str, Any]],
    *,
    mesh=None,
    thresholds: Sequence[tuple[float, float]] = TABLE8_THRESHOLDS,
    num_points: Sequence[int] = TABLE8_NUM_POINTS,
    base: SaspConfig | None = None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    total: int | None = None,
) -> dict[tuple[float, float, int], dict]:
    """Appendix C / Table 8: the protocol for every (t_pos, t_neg) x |P|, LLM forward run once per batch.

    Returns:
      {(t_pos, t_neg, num_points): {"gIoU", "cIoU", "num_queries"}}.
    """
    ev = evaluator or Evaluator(model, mesh)
    base = base or ev.config.sasp
    # Built (and so validated) on the host before anything compiles.
    settings = {
        (tp, tn, n): dataclasses.replace(base, t_pos=tp, t_neg=tn, num_points=n)
        for tp, tn in thresholds
        for n in num_points
    }
    pairs: dict[tuple, list] = {k: [] for k in settings}  # per setting: [(I, U)] of every counted query
    for batch in _iterate(batches_or_loader, total, "sweep", progress):
        canvas = check_batch(batch, None, ev.mesh)
        valid = row_valid(batch)
        enc = ev.encode(batch)  # the LLM once per batch
        for tp, tn, n in settings:
            # The static part names |P| only (thresholds of the base), so all (t_pos, t_neg) share a compile.
            opts = DecodeOptions(canvas_hw=canvas, sasp=dataclasses.replace(base, num_points=n))
            res = ev.decode_thresholds(enc, batch, opts, tp, tn)
            pairs[(tp, tn, n)] += [[int(i), int(u)] for i, u in zip(res["inter"][valid], res["union"][valid])]
    out = {}
    for k, iu in pairs.items():
        iu = np.array([p for rec in gather_records([{"iu": iu}]) for p in rec["iu"]], np.int64).reshape(-1, 2)
        m = IoUMeter()
        m.update(iu[:, 0], iu[:, 1])
        out[k] = m.summary()
    return out


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded rows -> left-padded rows (the generation convention); pad id 0."""
    ids = np.zeros_like(input_ids)
    mask = np.zeros_like(attention_mask, dtype=bool)
    t = input_ids.shape[1]
    for r in range(len(ids)):
        n = int(np.asarray(attention_mask[r]).sum())
        ids[r, t - n :] = input_ids[r, :n]
        mask[r, t - n :] = True
    return ids, mask


def generate_answers(
    model,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
    mesh=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy answers for every row of a prompt batch (`LlavaModel.generate`: KV cache, one jitted loop).

    Rows without a conversation get a copy of a real prompt (generation validates every row); their
    output is ignored.
    Returns:
      (tokens int32[R, M], lengths int32[R]) with EOS counted in the length.
    """
    valid = np.asarray(batch["conv_valid"], bool)
    if not valid.any():
        r = len(valid)
        return np.zeros((r, max_new_tokens), np.int32), np.zeros((r,), np.int32)
    ids, mask = left_pad(np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"], bool))
    first = int(np.flatnonzero(valid)[0])
    conv_image = np.asarray(batch["conv_image"]).copy()
    ids[~valid], mask[~valid], conv_image[~valid] = ids[first], mask[first], conv_image[first]
    arrays = {"ids": ids, "mask": mask, "images": np.asarray(batch["images_clip"]), "conv_image": conv_image}
    if mesh is not None:
        arrays = shd.shard_batch(arrays, mesh)
        with shd.use_mesh(mesh):
            tokens, lengths, _ = model.llava.generate(
                arrays["ids"],
                arrays["images"],
                arrays["mask"],
                arrays["conv_image"],
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
    else:
        tokens, lengths, _ = model.llava.generate(
            jnp.asarray(ids),
            jnp.asarray(arrays["images"]),
            jnp.asarray(mask),
            jnp.asarray(conv_image),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    return local_rows(tokens, mesh).astype(np.int32), local_rows(lengths, mesh).astype(np.int32)


def with_answers(batch: Mapping[str, Any], tokens: np.ndarray, lengths: np.ndarray, total_len: int) -> dict:
    """The batch with each row's prompt followed by its generated tokens, right-padded to `total_len`
    (one static length: one compile). The full forward over it gives READ's generation-path hidden states
    (read_reference.md §4: equivalent to the reference's no-cache generation)."""
    ids_in = np.asarray(batch["input_ids"])
    mask_in = np.asarray(batch["attention_mask"], bool)
    r = len(ids_in)
    ids = np.zeros((r, total_len), np.int32)
    mask = np.zeros((r, total_len), bool)
    for i in range(r):
        row = list(ids_in[i, : int(mask_in[i].sum())]) + list(np.asarray(tokens[i, : int(lengths[i])]))
        if len(row) > total_len:
            raise ValueError(f"row {i}: prompt + answer is {len(row)} tokens > total_len {total_len}")
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return {**batch, "input_ids": ids, "attention_mask": mask}


def evaluate_fprefcoco(
    model,
    batches_or_loader: Iterable[Mapping[str, Any]],
    tokenizer,
    *,
    mesh=None,
    max_new_tokens: int = 64,
    total_len: int | None = None,
    generate_fn: Callable[[Mapping[str, Any]], tuple[np.ndarray, np.ndarray]] | None = None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    total: int | None = None,
    sasp_cfg: SaspConfig | None = None,
    dump_dir: str | None = None,
    desc: str = "fp-refcoco",
) -> tuple[dict, list[dict]]:
    """FP-RefCOCO(+/g) "See" and "Segment" through free greedy generation (read_reference.md §8.4).

    Per query: generate (no forced [SEG]); run one full forward over prompt + answer; presence = a [SEG]
    was generated AND the first [SEG]'s mask is non-empty (an all-zero mask when none was generated).
    See = accuracy of presence against the premise (`batch["exists"]`); Segment = cIoU over all queries,
    with the all-zero GT of false premises (predicted pixels there only enlarge U).

    Args:
      batches_or_loader: prompt batches (readers with `eval_answer=False`, template "vicuna_v1" as
        `test_read.py`), with `exists`.
      max_new_tokens: generation budget (the reference: 512), capped by the model's position table.
      total_len: static length of the full forward (default: prompt length + max_new_tokens).
      generate_fn: batch -> (tokens int[R, M], lengths int[R]); default greedy `generate_answers`.
      sasp_cfg: SasP override (e.g. the 13B evaluation preset); default the model's.
      dump_dir: write every query's predicted and GT masks under it (`dumps`).
    Returns:
      (summary {"See", "Segment", "gIoU", "num_queries", ...}, records with `answer`, `presence`,
      `gt_presence`, IoU fields).
    """
    ev = evaluator or Evaluator(model, mesh)

    def default_generate(b):
        # The budget cannot pass the position table: prompt + image tokens + answer <=
        # max_position_embeddings.
        cfg = ev.config
        room = cfg.llama.max_position_embeddings - (np.shape(b["input_ids"])[1] + cfg.clip.num_patches - 1)
        if room < 1:
            raise ValueError(
                f"prompts of {np.shape(b['input_ids'])[1]} tokens leave no room to generate within "
                f"max_position_embeddings={cfg.llama.max_position_embeddings}"
            )
        return generate_answers(
            model,
            b,
            max_new_tokens=min(max_new_tokens, room),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            mesh=ev.mesh,
        )

    gen = generate_fn or default_generate
    records: list[dict] = []
    seen: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for batch in _iterate(batches_or_loader, total, desc, progress):
        if "exists" not in batch:
            raise ValueError("FP-RefCOCO batches need `exists` (the premise of each query)")
        tokens, lengths = gen(batch)
        full_len = total_len or (np.shape(batch["input_ids"])[1] + tokens.shape[1])
        full = with_answers(batch, tokens, lengths, full_len)
        canvas = check_batch(full, None, ev.mesh)
        res = ev.run(full, DecodeOptions(canvas_hw=canvas, sasp=sasp_cfg, return_pred=dump_dir is not None))
        valid = row_valid(full)
        recs = batch_records(full, res, valid, None, None, seen)
        _resolution(full, res, recs, np.flatnonzero(valid), dump_dir)
        for rec, r in zip(recs, np.flatnonzero(valid)):
            rec["query"] = query_text(tokenizer, batch["input_ids"][r]) if tokenizer is not None else None
            rec["answer"] = (
                tokenizer.decode(tokens[r, : lengths[r]].tolist(), skip_special_tokens=True)
                if tokenizer is not None
                else None
            )
        records.extend(recs)
    return _summarise(records, fp_summary_from_records, t0)
