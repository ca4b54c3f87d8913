"""Ask READ about an image: prints each answer and writes the mask overlay (with the SasP points) as a PNG.

    python -m read_jax.cli.chat --checkpoint CONVERTED_DIR --image photo.jpg "Which object keeps the food
    cold?"
    python -m read_jax.cli.chat --checkpoint CONVERTED_DIR --image photo.jpg      # an interactive session

With questions on the command line it answers them and exits; without (or with `--interactive`) it is a
chat loop as READ's `demo.py`: type a question, read the answer, the overlay is written to `--out`;
`/image PATH` switches the image, `/quit` (or end of input) ends the session. Every answer is appended to
`--out/answers.json`.

`--checkpoint` is a directory written by `convert_weights.py` (config.json, tokenizer/, params/) or by
`read_jax.inference.save_for_inference` (same layout). READ's demo uses the vicuna_v1 system prompt
(read_reference.md §2.3); `--template llava_v1` uses the training one. Saying "segment" explicitly helps the
model emit a [SEG]. The web page version is `python -m read_jax.cli.demo`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from read_jax.cli import common

PROMPT = "you> "


def parse_args(argv=None):
    p = common.parser("python -m read_jax.cli.chat", __doc__)
    p.add_argument("question", nargs="*", help="questions about the image (none: an interactive session)")
    p.add_argument("--checkpoint", required=True, help="converted READ checkpoint directory")
    p.add_argument("--image", required=True, help="image file (jpg/png/...)")
    p.add_argument("--out", default="chat_out", help="directory for the overlay PNGs and answers.json")
    p.add_argument("--template", default="vicuna_v1", choices=("vicuna_v1", "llava_v1"))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--interactive", action="store_true", help="keep asking after the given questions")
    p.add_argument(
        "--dtype",
        default=None,
        choices=(None, "bfloat16", "float32"),
        help="override the checkpoint's compute/param dtype",
    )
    return p.parse_args(argv)


def _read_image(path: str):
    from read_jax.data.preprocess import ImageError, load_image

    try:
        return load_image(path)
    except (ImageError, OSError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e


def session_lines(stream=None):
    """The interactive session's inputs: stripped non-empty lines until `/quit` or end of input."""
    stream = stream or sys.stdin
    while True:
        if stream.isatty():
            print(PROMPT, end="", flush=True)
        line = stream.readline()
        if not line:
            return
        line = line.strip()
        if line in ("/quit", "/exit"):
            return
        if line:
            yield line


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        from read_jax.inference import batch_questions, load_for_inference, overlay, predict

        if not os.path.isdir(args.checkpoint):
            raise FileNotFoundError(f"checkpoint directory {args.checkpoint!r} does not exist")
        state = {"image": _read_image(args.image), "path": args.image}
        questions = batch_questions(args.question) if args.question else []
        model, tok = load_for_inference(os.path.abspath(args.checkpoint), dtype=args.dtype)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        records = []

        def answer(q: str) -> None:
            image = state["image"]
            pred = predict(model, tok, image, q, max_new_tokens=args.max_new_tokens, template=args.template)
            png = out / f"answer_{len(records):02d}.png"
            overlay(image, pred.masks, pred.points, pred.point_labels).save(png)
            print(
                f"Q: {q}\nA: {pred.text}\n   object present: {pred.object_present}; "
                f"{len(pred.masks)} mask(s) -> {png}",
                flush=True,
            )
            records.append(
                {
                    "image": state["path"],
                    "question": q,
                    "answer": pred.text,
                    "object_present": pred.object_present,
                    "num_masks": len(pred.masks),
                    "overlay": str(png),
                    "mask_pixels": [int(m.sum()) for m in pred.masks],
                }
            )
            (out / "answers.json").write_text(json.dumps(records, indent=2))

        for q in questions:
            answer(q)
        if questions and not args.interactive:
            return 0
        print(f"chatting about {state['path']}: /image PATH switches the image, /quit ends", flush=True)
        for line in session_lines():
            if line.startswith("/image"):
                path = line[len("/image") :].strip()
                try:
                    state["image"], state["path"] = _read_image(path), path
                    print(f"image: {path}", flush=True)
                except ValueError as e:
                    print(f"chat: {e}", file=sys.stderr, flush=True)
                continue
            answer(line)
        return 0

    return common.run_main("chat", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
