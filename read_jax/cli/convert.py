"""Convert released READ / SESAME checkpoints into read_jax, or export read_jax weights back to HF.

    # a released READ checkpoint (HF dir) + the HF CLIP ViT-L/14-336 directory -> read_jax checkpoint
    python convert_weights.py --hf READ-LLaVA-v1.5-7B-for-ReasonSeg-testset \\
        --clip clip-vit-large-patch14-336 --out ckpt/read7b [--dtype bf16|fp32]

    # from-scratch init: a LLaVA-1.5 base (vocab 32000) + Meta's SAM
    python convert_weights.py --hf llava-v1.5-7b --clip clip-vit-large-patch14-336 \\
        --sam sam_vit_h_4b8939.pth --resize-vocab --out ckpt/init7b

    # read_jax checkpoint -> HF READ layout (safetensors), LoRA merged on request
    python convert_weights.py --export ckpt/read7b --out hf/read7b [--merge-lora]

Flags -> `read_jax.convert.read.convert_read_checkpoint` / `read_jax.convert.export.export_checkpoint`. See
read_reference.md §10 for the layouts.
"""

from __future__ import annotations

import sys

from read_jax.cli import common


def parse_args(argv=None):
    p = common.parser("convert_weights.py", __doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--hf", metavar="DIR", help="HF checkpoint directory to convert (config.json, shards, tokenizer)"
    )
    mode.add_argument(
        "--export",
        metavar="CKPT",
        help="read_jax checkpoint, or a train.py --workdir (its --which checkpoint), to export as HF READ",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (must not exist unless --overwrite)"
    )
    p.add_argument(
        "--clip", metavar="DIR", help="HF CLIP directory (READ releases do not contain the vision tower)"
    )
    p.add_argument(
        "--sam", metavar="PTH", help="Meta SAM checkpoint (sam_vit_h_4b8939.pth) replacing the SAM weights"
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="parameter dtype of the output")
    p.add_argument(
        "--base",
        default="auto",
        choices=["auto", "read_7b", "read_13b", "tiny", "shapes", "smoke"],
        help="ReadConfig factory for the SAM/SasP/LoRA settings (auto: by hidden size)",
    )
    p.add_argument(
        "--resize-vocab",
        action="store_true",
        help="accept a 32000-token vocabulary and append [SEG], <im_start>, <im_end> (N(0, 0.02) rows)",
    )
    p.add_argument(
        "--lora-alpha",
        type=float,
        help="alpha of an unmerged PEFT checkpoint (default: adapter_config.json, else 16)",
    )
    p.add_argument("--merge-lora", action="store_true", help="--export: fold LoRA into the base weights")
    p.add_argument(
        "--which",
        choices=("best", "latest", "init"),
        help="--export of a train.py workdir: its 'best' checkpoint (by the run's best metric, else the "
        "latest; the default), its 'latest', or 'init' (the run's untrained start), as evaluate.py --which",
    )
    p.add_argument(
        "--part-mb", type=int, default=256, help="converted MiB buffered per orbax part (memory knob)"
    )
    p.add_argument(
        "--no-compress", action="store_true", help="no zstd in the orbax parts (faster, ~20%% larger)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --resize-vocab rows")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse config.json attributes read_jax does not use (default: record them in conversion.json)",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert leaves holding NaN/Inf (listed in conversion.json) instead of refusing them",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a read_jax output (never an input, nor a folder holding one)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.which and not args.export:
        p.error("--which picks the checkpoint of a train.py --workdir to --export; --hf converts one release")
    return args


def _export_run(src: str, out: str, args, dtype: str):
    """A `train.py --workdir` (its `--which` checkpoint, by default the best, else the latest, on the config
    it saved) -> the HF layout, with the run's tokenizer (`data.tokenizer`) beside the weights."""
    import os

    from read_jax.build import load_model
    from read_jax.convert.export import export_model
    from read_jax.train.checkpoints import saved_run_config

    if not os.path.isdir(os.path.join(src, "checkpoints")):
        raise FileNotFoundError(
            f"--export {src}: neither a converted read_jax checkpoint (config.json + params/) nor a train.py "
            "--workdir with checkpoints"
        )
    config = saved_run_config(src)
    model = load_model(src, run_config=config, which=args.which or "best")
    tok = config.data.get("tokenizer") or None
    return export_model(
        model,
        model.config,
        out,
        merge_lora=args.merge_lora,
        dtype=dtype,
        tokenizer_dir=tok,
        overwrite=args.overwrite,
    )


def main(argv=None, *, model_fn=None) -> int:
    """CLI entry point; `model_fn(cfg) -> () -> nnx.Module` overrides the target model (tests)."""
    args = parse_args(argv)
    out = common.absolute(args.out)

    def body() -> int:
        if args.export:
            from read_jax.build import is_converted_checkpoint
            from read_jax.checkpoint import check_output
            from read_jax.convert.export import export_checkpoint

            src = common.absolute(args.export)
            check_output(out, overwrite=args.overwrite, inputs=[src])
            dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
            if is_converted_checkpoint(src):
                if args.which:
                    raise ValueError(
                        f"--which {args.which}: {args.export} is a converted checkpoint, which holds one set "
                        "of weights; --which picks a checkpoint of a train.py --workdir"
                    )
                path = export_checkpoint(
                    src, out, merge_lora=args.merge_lora, dtype=dtype, overwrite=args.overwrite
                )
            else:
                path = _export_run(src, out, args, dtype)
            print(f"exported {args.export} -> {path}")
            return 0
        from read_jax.convert.read import convert_read_checkpoint

        convert_read_checkpoint(
            common.absolute(args.hf),
            out,
            clip_dir=common.absolute(args.clip),
            sam_path=common.absolute(args.sam),
            dtype=args.dtype,
            base=args.base,
            resize_vocab=args.resize_vocab,
            lora_alpha=args.lora_alpha,
            seed=args.seed,
            part_bytes=args.part_mb << 20,
            compress=not args.no_compress,
            overwrite=args.overwrite,
            allow_nonfinite=args.allow_nonfinite,
            strict=args.strict,
            progress=not args.no_progress,
            model_fn=model_fn,
        )
        return 0

    return common.run_main("convert_weights.py", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
