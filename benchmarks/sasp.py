"""SasP + DtoC benchmark: the jitted, batched JAX kernel vs the reference's per-[SEG] torch loop.

Workload: N [SEG]s (default 64), each with its own image size drawn in [200, 1000] px per side, bf16
similarity maps, the READ-7B preset. Both sides start from the same [N, 576] similarity maps:
  * torch: `torchref.sasp.similarity_map_to_points` in a Python loop, as READ does
    (`READ.py:672-679`): full-resolution map at (H, W), one pass over all H*W pixels per point.
  * JAX: `select_points` + `dtoc` for all maps at once, jitted once (compile excluded), one call.
The similarity itself (dot products over C) is timed separately and reported, but is not part of the
headline ratio: it is a plain batched dot product, not the SasP algorithm.

Timings are wall-clock medians over repetitions with `block_until_ready`; torch runs with
`torch.set_num_threads(1)` (faster than 2 threads on the shared 2-core CPU, i.e. the reference's best
case here). Run: `.venv/bin/python benchmarks/sasp.py [--n 64] [--preset 7b|13b]` (with the package
installed, `pip install -e ".[test]"`, or `PYTHONPATH=.` from the repository root). Last line:
`SasP speedup: NNNNx` (torch time / JAX time).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from read_jax import sasp as S
from read_jax.config import SaspConfig
from torchref import sasp as ref


def smooth_maps(rng, n: int, g: int = 24) -> np.ndarray:
    """[n, g*g] float32 maps: a few Gaussian blobs on low-frequency noise, like real similarity maps."""
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32)
    maps = rng.normal(scale=0.3, size=(n, g, g)).astype(np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx, s = rng.uniform(0, g), rng.uniform(0, g), rng.uniform(1.5, 5)
            maps[i] += rng.uniform(2, 6) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return (maps * 10).reshape(n, g * g)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64, help="[SEG]s in the batch")
    ap.add_argument("--preset", choices=["7b", "13b"], default="7b")
    ap.add_argument("--jax-reps", type=int, default=30)
    ap.add_argument("--torch-reps", type=int, default=2)
    ap.add_argument(
        "--hidden", type=int, default=4096, help="C for the separately reported similarity timing"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = SaspConfig.read_7b() if args.preset == "7b" else SaspConfig.read_13b_eval()
    down_sample = 24 // cfg.grid_size

    rng = np.random.default_rng(0)
    hw_np = rng.integers(200, 1001, size=(args.n, 2)).astype(np.int32)
    sim_t = torch.from_numpy(smooth_maps(rng, args.n)).to(torch.bfloat16)  # the reference's sim is bf16
    sim_j = jnp.asarray(sim_t.float().numpy()).astype(jnp.bfloat16)
    hw_j = jnp.asarray(hw_np)
    print(
        f"device: {jax.devices()[0].device_kind}; {args.n} [SEG]s, "
        f"sizes {hw_np.min()}..{hw_np.max()} px, preset {args.preset}"
    )

    # ---- JAX: one jitted call for the whole batch ----
    @jax.jit
    def kernel(sim, hw):
        pts, labels, _ = S.select_points(sim, hw, cfg)
        return (
            S.dtoc(sim, pts, hw, radius=cfg.dtoc_radius, similarity_dtype=cfg.similarity_dtype),
            labels,
            pts,
        )

    t0 = time.perf_counter()
    jax.block_until_ready(kernel(sim_j, hw_j))
    compile_s = time.perf_counter() - t0
    jax_times = timed(lambda: jax.block_until_ready(kernel(sim_j, hw_j)), args.jax_reps)
    pts_j, labels_j, pint_j = (np.asarray(x) for x in kernel(sim_j, hw_j))

    # ---- torch: the reference's per-[SEG] Python loop ----
    results = []

    def torch_loop():
        results.clear()
        for i in range(args.n):
            results.append(
                ref.similarity_map_to_points(
                    sim_t[i],
                    (int(hw_np[i, 0]), int(hw_np[i, 1])),
                    down_sample=down_sample,
                    num_points=cfg.num_points,
                    t_pos=cfg.t_pos,
                    t_neg=cfg.t_neg,
                    return_debug=True,
                )
            )

    torch_times = timed(torch_loop, args.torch_reps)

    # ---- agreement on this workload (bf16 maps have exact ties; those slots may legitimately differ) ----
    same_labels = sum(int(np.array_equal(r[1].numpy(), labels_j[i])) for i, r in enumerate(results))
    same_points = [i for i, r in enumerate(results) if np.array_equal(r[2]["points_int"].numpy(), pint_j[i])]
    dtoc_err = max(
        (float(np.abs(results[i][0].numpy() - pts_j[i]).max()) for i in same_points), default=float("nan")
    )

    # ---- similarity (dot product over C), reported separately ----
    c = args.hidden
    img = rng.normal(size=(args.n, 576, c)).astype(np.float32)
    seg = rng.normal(size=(args.n, c)).astype(np.float32)
    img_j, seg_j = jnp.asarray(img, jnp.bfloat16), jnp.asarray(seg, jnp.bfloat16)
    sim_fn = jax.jit(lambda a, b: S.similarity(a, b, jnp.bfloat16))
    jax.block_until_ready(sim_fn(img_j, seg_j))
    sim_jax_t = timed(lambda: jax.block_until_ready(sim_fn(img_j, seg_j)), 5)
    img_t, seg_t = torch.from_numpy(img).to(torch.bfloat16), torch.from_numpy(seg).to(torch.bfloat16)
    sim_torch_t = timed(
        lambda: [ref.compute_similarity_map(img_t[i : i + 1], seg_t[i : i + 1]) for i in range(args.n)], 2
    )

    tj, tt = float(np.median(jax_times)), float(np.median(torch_times))
    print(
        f"jax    select+DtoC, batched: median {tj * 1e3:9.3f} ms (min {min(jax_times) * 1e3:.3f} ms, "
        f"{args.jax_reps} reps; compile {compile_s:.1f} s, excluded)"
    )
    print(
        f"torch  select+DtoC, per-SEG loop: median {tt * 1e3:9.1f} ms "
        f"({tt / args.n * 1e3:.1f} ms per [SEG], {args.torch_reps} reps)"
    )
    print(
        f"agreement: labels identical {same_labels}/{args.n}, "
        f"integer points identical {len(same_points)}/{args.n}, "
        f"max |DtoC jax - torch| on those {dtoc_err:.2e} px"
    )
    print(
        f"similarity C={c} (not in the ratio): jax batched {np.median(sim_jax_t) * 1e3:.1f} ms, "
        f"torch per-SEG loop {np.median(sim_torch_t) * 1e3:.1f} ms"
    )
    print(f"SasP speedup: {tt / tj:.0f}x")


if __name__ == "__main__":
    main()
