"""Score the shapes world's held-out VQA questions (the LLaVA stage's probe): greedy exact-match and token
accuracy under teacher forcing, overall and per question kind (`read_jax.eval.vqa`).

    python -m read_jax.cli.vqa_eval --checkpoint runs/tiny/llava --split val [--out FILE] \\
        [--data-root data/shapes] [--config.eval.batch_size=16 ...]

`--checkpoint`: a train.py workdir (its best, else latest, checkpoint on the config it saved) or a
converted checkpoint (then `--config` gives the data settings). The questions are
`llava_dataset/shapes_vqa_{split}.json` of the generated mix in the run's `data.root` (or `--data-root`),
one question per row.

`--image-control` scores the same questions a second time with each asked about another scene's image
(`vqa.other_image_items`): a kind whose accuracy does not drop is answered from the question alone.
"""

from __future__ import annotations

import copy
import json
import os
import sys

from read_jax.cli import common
from read_jax.config import ConfigError


def parse_args():
    p = common.parser("vqa_eval", __doc__)
    p.add_argument("--checkpoint", required=True, help="train.py workdir or converted checkpoint")
    p.add_argument("--config", help="run config FILE[:ARG] (default: the one the workdir saved)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--data-root", help="the generated mix (default: the config's data.root)")
    p.add_argument("--out", help="write the figures to this json file")
    p.add_argument(
        "--image-control",
        action="store_true",
        help="also score each question asked about another image (what the model answers without looking)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    p = parse_args()
    try:
        rest, overrides = common.split_overrides(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"vqa_eval: error: {e}", file=sys.stderr)
        return 2
    args = p.parse_args(rest)

    def body() -> int:
        from tqdm import tqdm

        from read_jax.build import load_model, tokenizer_dir
        from read_jax.data import loaders
        from read_jax.data import pipeline as Pl
        from read_jax.data.readers import VqaReader
        from read_jax.data.shapes import vqa_kind
        from read_jax.data.shapes.write import vqa_paths
        from read_jax.eval import vqa
        from read_jax.train.checkpoints import saved_run_config

        ckpt = common.absolute(args.checkpoint)
        if args.config:
            config = common.load_run_config(args.config, overrides)
        else:
            config = common.apply_overrides(saved_run_config(ckpt), overrides)
        model = load_model(ckpt, run_config=config)
        root = common.absolute(args.data_root) or str(config.data.root)
        js, images = vqa_paths(root, args.split)
        if not os.path.isfile(js):
            raise FileNotFoundError(
                f"{js}: no held-out VQA questions; write the shapes mix with "
                f"`python -m read_jax.data.make_shapes --out {root}`"
            )
        reader = VqaReader(js, images, mode="eval")
        dc = loaders.data_config(
            config.data, model.config, batch_size=int(config.eval.get("batch_size", 8)), max_convs=1
        )
        tok = str(config.data.get("tokenizer") or tokenizer_dir(ckpt))
        batches = Pl.eval_dataset(reader, dc, model.config.sam, tok)
        question_of = {f"vqa/{sid}": rounds[0][0] for sid, _, rounds in reader.items}
        total = -(-len(reader) // dc.batch_size)
        with tqdm(total=total, desc=f"vqa {args.split}", disable=args.no_progress) as bar:
            out = vqa.vqa_accuracy(model, batches, question_of, vqa_kind, progress=bar)
        if args.image_control:
            control = copy.copy(reader)
            control.items = vqa.other_image_items(reader.items)
            batches = Pl.eval_dataset(control, dc, model.config.sam, tok)
            with tqdm(total=total, desc=f"vqa {args.split}, another image", disable=args.no_progress) as bar:
                out["other_image"] = vqa.vqa_accuracy(model, batches, question_of, vqa_kind, progress=bar)
        out["split"], out["checkpoint"] = args.split, ckpt
        other = out.get("other_image")
        for k, v in [("all", out), *out["per_kind"].items()]:
            line = (
                f"{k:>10}: exact {v['exact']:.3f}  token accuracy {v['token_accuracy']:.3f}  "
                f"({v['num_questions']} questions)"
            )
            if other is not None:
                o = other if k == "all" else other["per_kind"][k]
                line += f"  another image: exact {o['exact']:.3f}"
            print(line)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)
        return 0

    return common.run_main("vqa_eval", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
