"""bf16 error table: read_jax in bf16 vs the torch references in bf16, per component, with the fp32 torch
references as the truth; the runs, bounds and figures of `tests/test_bf16_*.py` (`torchref.bf16`).

Components (tiny random weights, the same on both sides, rounded to bf16): HF LLaMA (MHA and GQA), HF CLIP
vision, Meta's SAM (image encoder; prompt encoder + mask decoder from the same embedding and prompts) and READ
end to end (the torch READ of `torchref.read`): the chained forward, the mask path from the reference's own
bf16 states (mask IoU against the IoU the error bound guarantees, SasP labels and points), and the fully
chained masks (mask IoU and SasP label agreement between the two paths).

Columns: D (the bf16-rounded stages on the longest path), max abs = max |read_jax - torch| (both bf16), max
rel = that / max |fp32|, norm rel = ||read_jax - torch|| / ||fp32||, tol = 3 sqrt(2 D) 2^-8 (the bound both
relative figures must meet), and each bf16 result's distance to fp32 (normwise relative).

    PYTHONPATH=. python benchmarks/bf16.py            # ~1-3 min on a CPU
    PYTHONPATH=. python benchmarks/bf16.py --markdown # the README table

Last line: `bf16: <k>/<n> outputs within their bound (worst <x> of it: <output>); SasP labels from the
reference states identical in <a>/<b> [SEG]s; chained: mask IoU >= <iou>, label agreement >= <agree>`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")  # as the tests: XLA's dots as written


def runs() -> tuple[list, list[tuple[str, float, float]], list[dict], list[bool]]:
    """(outputs, per-mask IoU rows (name, IoU, guaranteed), chained rows, SasP labels identical per [SEG])."""
    import torch

    from torchref import bf16 as B

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    outputs = []
    for kv, name in ((4, "llama (MHA)"), (2, "llama (GQA)")):
        outputs += B.llama_outputs(B.llama_run(kv), prefix=name)
    outputs += B.clip_outputs(B.clip_run())
    models = B.sam_models()
    outputs += [
        B.sam_embeddings_output(B.sam_embeddings_run(models)),
        B.sam_mask_logits_output(B.sam_mask_logits_run(models)),
    ]
    run = B.read_run()
    outputs += B.read_forward_outputs(run)
    masks = B.read_mask_outputs(run)
    outputs += [o for o, _, _ in masks]
    ious = [(o.name, got, guaranteed) for o, got, guaranteed in masks[1:]]
    labels = [
        bool(np.array_equal(run["forced"].point_labels[i], seg["labels"].numpy()))
        for i, seg in enumerate(run["t16"]["segs"])
    ]
    return outputs, ious, B.read_chained(run), labels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown (README)")
    args = ap.parse_args(argv)
    from torchref.bf16 import figures

    t0 = time.perf_counter()
    outputs, ious, chained, labels = runs()
    rows = [(o, figures(o)) for o in outputs]
    head = ("output", "D", "max abs", "max rel", "norm rel", "tol", "read_jax vs fp32", "torch vs fp32")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print(f"{head[0]:30s} {'D':>3s} {'max abs':>8s} {'max rel':>8s} {'norm rel':>8s} {'tol':>8s} "
              f"{'jax-fp32':>8s} {'torch-fp32':>10s}")  # fmt: skip
    for o, f in rows:
        vals = (f["max_abs"], f["max_rel"], f["norm_rel"], f["tol"], f["jax_vs_fp32"], f["torch_vs_fp32"])
        if args.markdown:
            print(f"| {o.name} | {o.depth} | " + " | ".join(f"{v:.2e}" for v in vals) + " |")
        else:
            print(
                f"{o.name:30s} {o.depth:3d} " + " ".join(f"{v:8.2e}" for v in vals[:5]) + f" {vals[5]:10.2e}"
            )
    print()
    for name, got, guaranteed in ious:
        print(
            f"{name}, from the reference's states: mask IoU {got:.4f} (the bound guarantees {guaranteed:.4f})"
        )
    for i, r in enumerate(chained):
        print(
            f"read chained [SEG] {i}: mask IoU {r['mask_iou']:.4f}, SasP label agreement "
            f"{r['label_agreement']:.3f}"
        )
    ok = [max(f["norm_rel"], f["max_rel"]) <= f["tol"] and f["finite"] for _, f in rows]
    worst_o, worst_f = max(rows, key=lambda r: max(r[1]["norm_rel"], r[1]["max_rel"]) / r[1]["tol"])
    worst = max(worst_f["norm_rel"], worst_f["max_rel"]) / worst_f["tol"]
    print(f"({time.perf_counter() - t0:.0f} s)")
    print(
        f"bf16: {sum(ok)}/{len(ok)} outputs within their bound (worst {worst:.2f} of it: {worst_o.name}); "
        f"SasP labels from the reference states identical in {sum(labels)}/{len(labels)} [SEG]s; chained: "
        f"mask IoU >= {min(r['mask_iou'] for r in chained):.4f}, label agreement >= "
        f"{min(r['label_agreement'] for r in chained):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
