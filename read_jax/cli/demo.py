"""Serve READ's web demo of a converted checkpoint: image + question -> answer, mask, SasP points, similarity.

    python -m read_jax.cli.demo --checkpoint ckpt/read7b [--port 7860] [--host 127.0.0.1]

`--checkpoint` is a converted checkpoint directory (`convert_weights.py`, `inference.save_for_inference`;
the tiny one included). The page (`read_jax.demo`) runs locally and needs nothing from the network. The
interactive terminal version is `python -m read_jax.cli.chat --checkpoint DIR --image photo.jpg`.
"""

from __future__ import annotations

import os
import sys

from read_jax.cli import common


def main(argv=None) -> int:
    p = common.parser("python -m read_jax.cli.demo", __doc__)
    p.add_argument("--checkpoint", required=True, help="converted READ checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--template", default="vicuna_v1", choices=("vicuna_v1", "llava_v1"))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default=None, choices=(None, "bfloat16", "float32"))
    args = p.parse_args(argv)

    def body() -> int:
        from read_jax import demo
        from read_jax.inference import load_for_inference

        ckpt = os.path.abspath(args.checkpoint)
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"checkpoint directory {args.checkpoint!r} does not exist")
        model, tok = load_for_inference(ckpt, dtype=args.dtype)
        page = demo.build_demo(model, tok, template=args.template, max_new_tokens=args.max_new_tokens)
        print(f"READ demo of {ckpt} on http://{args.host}:{args.port} (Ctrl-C to stop)")
        demo.serve(page, args.host, args.port, block=True)
        return 0

    common.setup_logging()
    return common.run_main("demo", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
