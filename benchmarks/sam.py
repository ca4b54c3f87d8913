"""SAM forward speed: read_jax (jit) vs Meta's segment_anything (torch eval, no_grad), same weights, same run.

Times the image encoder and READ's prompt path (points + padding point + [SEG] text token -> prompt encoder ->
mask decoder, multimask off) on CPU, fp32, median of several runs after warm-up (compile excluded).

  .venv/bin/python benchmarks/sam.py            # "mid" config: 512 px, width 192, 4 blocks (2 global)
  .venv/bin/python benchmarks/sam.py --config tiny
  .venv/bin/python benchmarks/sam.py --full     # ViT-H shapes (slow on CPU: minutes)

(with the package installed, `pip install -e ".[test]"`, or `PYTHONPATH=.` from the repository root: the Meta
reference comes from `torchref.sam`). The last line is `SAM JAX/torch speed ratio: <torch time / jax time>x`
for encoder + decoder together.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax.config import ReadConfig, SamConfig

jax.config.update("jax_default_matmul_precision", "float32")  # fp32 like torch's CPU matmuls

CONFIGS = {
    "tiny": ReadConfig.tiny().sam,
    "mid": SamConfig(
        image_size=512,
        encoder_embed_dim=192,
        encoder_depth=4,
        encoder_num_heads=3,
        window_size=7,
        global_attn_indexes=(1, 3),
        prompt_embed_dim=64,
        transformer_mlp_dim=256,
        transformer_num_heads=4,
        iou_head_hidden_dim=64,
        mask_in_chans=16,
        dtype="float32",
        param_dtype="float32",
    ),
    "full": SamConfig(dtype="float32", param_dtype="float32"),
}


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    ap.add_argument("--full", action="store_true", help="ViT-H shapes (same as --config full)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=3, help="[SEG] prompts per image (n)")
    ap.add_argument("--points", type=int, default=30, help="SasP points per prompt (Np)")
    args = ap.parse_args(argv)
    name = "full" if args.full else args.config
    cfg = CONFIGS[name]
    reps = args.reps or (2 if name == "full" else 10)

    import torch

    from torchref.sam import build_pair  # Meta reference + the real key table

    torch.set_grad_enabled(False)
    ref, ours = build_pair(cfg)
    s, c, n = cfg.image_size, cfg.prompt_embed_dim, args.prompts
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, s, s, 3)).astype(np.float32)
    points = rng.uniform(0, s, (n, args.points, 2)).astype(np.float32)
    labels = rng.integers(-1, 2, (n, args.points)).astype(np.int32)
    text = rng.normal(size=(n, 1, c)).astype(np.float32)

    # ---- JAX: split once, jit pure functions of the state (no per-call graph traversal) ----
    graphdef, state = nnx.split(ours)

    @jax.jit
    def encode(state, image):
        return nnx.merge(graphdef, state).image_encoder(image)

    @jax.jit
    def decode(state, emb, points, labels, text):
        sam = nnx.merge(graphdef, state)
        sparse, dense = sam.prompt_encoder(points, labels, text)
        return sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)[0]

    j_img, j_pts, j_lab, j_txt = map(jnp.asarray, (image, points, labels, text))
    t0 = time.perf_counter()
    emb = encode(state, j_img).block_until_ready()
    decode(state, emb, j_pts, j_lab, j_txt).block_until_ready()
    compile_s = time.perf_counter() - t0
    jax_enc = _median_time(lambda: encode(state, j_img).block_until_ready(), reps)
    jax_dec = _median_time(lambda: decode(state, emb, j_pts, j_lab, j_txt).block_until_ready(), reps)

    # ---- torch: Meta's modules, eval + no_grad, READ's token order ----
    t_img = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
    t_pts, t_lab, t_txt = torch.from_numpy(points), torch.from_numpy(labels).long(), torch.from_numpy(text)

    def torch_decode(t_emb):
        sparse, dense = ref.prompt_encoder(points=(t_pts, t_lab), boxes=None, masks=None)
        sparse = torch.cat([sparse, t_txt], dim=1)
        return ref.mask_decoder(t_emb, ref.prompt_encoder.get_dense_pe(), sparse, dense, False)[0]

    t_emb = ref.image_encoder(t_img)  # warm-up
    torch_decode(t_emb)
    torch_enc = _median_time(lambda: ref.image_encoder(t_img), reps)
    torch_dec = _median_time(lambda: torch_decode(t_emb), reps)

    # Same computation: check before reporting speed.
    got = np.asarray(decode(state, emb, j_pts, j_lab, j_txt))
    err = float(np.abs(got - torch_decode(t_emb).numpy()).max())

    print(
        f"config={name} image={s} width={cfg.encoder_embed_dim} depth={cfg.encoder_depth} "
        f"window={cfg.window_size} global={cfg.global_attn_indexes} prompts={n} points={args.points}"
    )
    print(
        f"devices: jax={jax.devices()[0].platform} x{jax.device_count()}, "
        f"torch threads={torch.get_num_threads()}, reps={reps}, jax compile={compile_s:.2f}s, "
        f"max |mask logit diff|={err:.2e}"
    )
    print(f"{'':18s}{'jax (ms)':>10s}{'torch (ms)':>12s}{'torch/jax':>11s}")
    for label, j, t in (
        ("image encoder", jax_enc, torch_enc),
        ("prompt+decoder", jax_dec, torch_dec),
        ("total", jax_enc + jax_dec, torch_enc + torch_dec),
    ):
        print(f"{label:18s}{1e3 * j:10.2f}{1e3 * t:12.2f}{t / j:10.2f}x")
    ratio = (torch_enc + torch_dec) / (jax_enc + jax_dec)
    print(f"SAM JAX/torch speed ratio: {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
