"""convert_weights.py memory and speed on a multi-shard checkpoint of >= 2 GB (random bf16, 7B layer shapes).

Builds a READ-layout HF directory in a temporary folder: `pytorch_model-0000k-of-0000n.bin` shards
(torch.save, bf16, <= --shard-gb each, HF `save_pretrained` sharding) + `pytorch_model.bin.index.json` +
config.json + tokenizer, with LLaMA-7B layer shapes (C=4096, MLP 11008, vocab 32003) but only --layers
layers, and the projector, text_hidden_fcs, SAM and CLIP of `ReadConfig.tiny()` (the converter maps the whole
READ table; the tiny vision parts add < 1% of the bytes). The key names and shapes come from the target
model through the exporter's layout (`read_jax.convert.export.export_layout`): exactly the released names.

Then it runs the converter as a child process (`convert_weights.py --base tiny --dtype bf16`) and reports
its peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`) divided by the largest shard, against the goal "never
the whole model in host memory twice" (<= 1.5), and the throughput (source bytes / wall time of the child,
start-up included).

The RSS is read by a small intermediate Python process that starts the converter and waits for it: Linux
carries the pre-exec high-water mark of a (v)forked child's address space into its `ru_maxrss`, so a
converter started directly from this script, which has just held a whole shard in memory to write it, would
report this script's peak instead of its own.

  .venv/bin/python benchmarks/convert.py                 # 5 layers: ~2.6 GB in 2 shards of <= 2 GB
  .venv/bin/python benchmarks/convert.py --layers 8 --shard-gb 3 --keep

(with the package installed, `pip install -e ".[convert]"`, or `PYTHONPATH=.` from the repository root).

The last line is `peak RSS / largest shard: <ratio>x`. Temporary files are removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import torch

from read_jax.config import ReadConfig

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "assets" / "tokenizer" / "tokenizer.model"
# Runs the converter (argv) and prints its peak RSS from a clean process (see the module docstring).
MEASURE = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:])\n"
    "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
    "sys.exit(r.returncode)\n"
)


def hf_config(cfg: ReadConfig) -> dict:
    c = cfg.llama
    return {
        "architectures": ["READForCausalLM"],
        "model_type": "llava",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "mm_vision_tower": "../dataset/clip-vit-large-patch14-336",
        "mm_hidden_size": cfg.clip.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "square",
        "out_dim": cfg.out_dim,
        "train_mask_decoder": True,
        "torch_dtype": "bfloat16",
        "use_cache": False,
    }


def _order(key: str) -> tuple:
    """save_pretrained order of READForCausalLM: embed, layers by index, norm, vision parts, lm_head last."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    group = 0 if key.startswith("model.embed_tokens") else 1 if m else 3 if key == "lm_head.weight" else 2
    return (group, int(m.group(1)) if m else 0, key)


def build_checkpoint(d: Path, cfg: ReadConfig, shard_bytes: int) -> tuple[int, int, int]:
    """Write the READ directory and the CLIP directory; returns (total bytes, largest shard bytes, shards)."""
    from safetensors.torch import save_file

    from read_jax.convert.export import export_layout
    from read_jax.convert.read import default_model_fn, target_leaves

    leaves = {p: (tuple(v.shape), v.dtype) for p, v in target_leaves(default_model_fn(cfg)).items()}
    main, clip = export_layout(leaves, cfg, dtype="float32")
    g = torch.Generator().manual_seed(0)

    def rand(shape):
        # bf16 straight from randn, scaled like trained weights (the converter never looks at the values).
        return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    hf = d / "read"
    hf.mkdir()
    keys = sorted(main, key=_order)
    shards, cur, size = [], [], 0
    for k in keys:
        nb = int(np.prod(main[k][0])) * 2
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    shards.append(cur)
    n, wm, sizes = len(shards), {}, []
    for i, ks in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        sd = {k: rand(main[k][0]) for k in ks}
        torch.save(sd, hf / name)
        del sd
        sizes.append((hf / name).stat().st_size)
        wm.update(dict.fromkeys(ks, name))
        print(f"  wrote {name}: {sizes[-1] / 2**30:.2f} GiB, {len(ks)} tensors", flush=True)
    total = sum(int(np.prod(s)) * 2 for s, _ in main.values())
    (hf / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm})
    )
    (hf / "config.json").write_text(json.dumps(hf_config(cfg)))
    shutil.copyfile(TOKENIZER, hf / "tokenizer.model")
    (hf / "added_tokens.json").write_text(
        json.dumps({"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002})
    )
    cd = d / "clip"
    cd.mkdir()
    c = cfg.clip
    save_file(
        {k: rand(s) for k, (s, _) in clip.items()}, str(cd / "model.safetensors"), metadata={"format": "pt"}
    )
    (cd / "config.json").write_text(
        json.dumps(
            {
                "model_type": "clip_vision_model",
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "image_size": c.image_size,
                "patch_size": c.patch_size,
                "layer_norm_eps": c.layer_norm_eps,
                "hidden_act": c.hidden_act,
            }
        )
    )
    return sum(sizes), max(sizes), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--layers", type=int, default=5, help="LLaMA-7B-shaped decoder layers (405 MB each in bf16)"
    )
    ap.add_argument(
        "--shard-gb", type=float, default=2.0, help="max shard size (save_pretrained max_shard_size)"
    )
    ap.add_argument("--part-mb", type=int, default=256, help="converter --part-mb")
    ap.add_argument("--tmp", default=None, help="where to build the checkpoint (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files")
    args = ap.parse_args()

    tiny = ReadConfig.tiny("bfloat16")
    llama = type(tiny.llama)(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
    cfg = tiny.replace(llama=llama)
    need = (2 * args.layers * 405e6 + 2 * 262e6) * 2.2  # source + converted output + slack
    free = shutil.disk_usage(args.tmp or tempfile.gettempdir()).free
    if free < need:
        sys.exit(f"not enough disk: {free / 2**30:.1f} GiB free, need ~{need / 2**30:.1f} GiB")

    d = Path(tempfile.mkdtemp(prefix="read_jax_convert_bench_", dir=args.tmp))
    try:
        t0 = time.time()
        print(f"building a {args.layers}-layer 7B-shaped READ checkpoint in {d} ...", flush=True)
        total, largest, n = build_checkpoint(d, cfg, int(args.shard_gb * 2**30))
        print(
            f"  {total / 2**30:.2f} GiB in {n} shards (largest {largest / 2**30:.2f} GiB), "
            f"{time.time() - t0:.0f} s",
            flush=True,
        )
        cmd = [
            sys.executable,
            str(ROOT / "convert_weights.py"),
            "--hf",
            str(d / "read"),
            "--clip",
            str(d / "clip"),
            "--out",
            str(d / "out"),
            "--base",
            "tiny",
            "--dtype",
            "bf16",
            "--part-mb",
            str(args.part_mb),
            "--no-progress",
        ]
        t1 = time.time()
        r = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t1
        if r.returncode:
            sys.exit(f"converter failed:\n{r.stdout}\n{r.stderr}")
        print("  " + r.stdout.strip().splitlines()[-2])
        peak = int(r.stdout.strip().splitlines()[-1].split()[1]) * 1024  # ru_maxrss is in KiB on Linux
        manifest = json.loads((d / "out" / "params" / "manifest.json").read_text())
        print(f"converted {len(manifest['leaves'])} leaves in {len(manifest['parts'])} orbax parts")
        print(
            f"wall time: {wall:.1f} s, throughput: {total / 2**20 / wall:.0f} MB/s "
            f"(source bytes / converter wall time)"
        )
        print(
            f"peak RSS of the converter: {peak / 2**30:.2f} GiB; largest shard: {largest / 2**30:.2f} GiB; "
            f"total: {total / 2**30:.2f} GiB"
        )
        print(f"peak RSS / largest shard: {peak / largest:.2f}x")
    finally:
        if args.keep:
            print(f"kept {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
