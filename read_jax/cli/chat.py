"""Ask READ about an image: prints each answer and writes the mask overlay (with the SasP points) as a PNG.

    python -m read_jax.cli.chat --checkpoint CONVERTED_DIR --image photo.jpg "Which object keeps the food
    cold?"
    python -m read_jax.cli.chat --checkpoint CONVERTED_DIR --image photo.jpg      # an interactive session

With questions on the command line it answers them and exits; without (or with `--interactive`) it is a
chat loop as READ's `demo.py`: type a question, read the answer, the overlay is written to `--out`;
`/image PATH` switches the image, `/quit` (or end of input) ends the session. Every answer is appended to
`--out/answers.json`, with its wall time and number of generated tokens (the first answer includes the
compiles).

`--checkpoint` is a directory written by `convert_weights.py` (config.json, tokenizer/, params/) or by
`read_jax.inference.save_for_inference` (same layout), or a `train.py --workdir` (its best checkpoint, the
tokenizer of its run config). The prompt template is the one the checkpoint's own
chat used (conversion.json's `chat_template`): READ's demo uses the vicuna_v1 system prompt (read_reference.md
§2.3), LISA's chat.py llava_v1; `--template` overrides it. Saying "segment" explicitly helps the model emit a
[SEG]. The web page version is `python -m read_jax.cli.demo`.

`--sasp on|off` switches Similarity-as-Points for this run (default: the checkpoint's config; a converted LISA
has it off, as LISA was trained): off, SAM is prompted with the [SEG] token alone and no points are drawn.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from read_jax.cli import common

PROMPT = "you> "


def parse_args(argv=None):
    p = common.parser("python -m read_jax.cli.chat", __doc__)
    p.add_argument("question", nargs="*", help="questions about the image (none: an interactive session)")
    p.add_argument(
        "--checkpoint", required=True, help="converted READ checkpoint directory, or a train.py --workdir"
    )
    p.add_argument("--image", required=True, help="image file (jpg/png/...)")
    p.add_argument("--out", default="chat_out", help="directory for the overlay PNGs and answers.json")
    p.add_argument(
        "--template",
        default=None,
        choices=("vicuna_v1", "llava_v1"),
        help="conversation template (default: the checkpoint's chat_template, else vicuna_v1)",
    )
    p.add_argument(
        "--sasp",
        default=None,
        choices=("on", "off"),
        help="SasP points on or off (default: the checkpoint's)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--interactive", action="store_true", help="keep asking after the given questions")
    p.add_argument(
        "--dtype",
        default=None,
        choices=(None, "bfloat16", "float32"),
        help="override the checkpoint's compute/param dtype",
    )
    return p.parse_args(argv)


def checkpoint_template(checkpoint: str) -> str:
    """The conversation template the checkpoint's own chat used (conversion.json), else vicuna_v1."""
    info = Path(checkpoint) / "conversion.json"
    if info.is_file():
        return json.loads(info.read_text()).get("chat_template") or "vicuna_v1"
    return "vicuna_v1"


def _read_image(path: str):
    from read_jax.data.preprocess import ImageError, load_image

    try:
        return load_image(common.absolute(path))
    except (ImageError, OSError) as e:
        raise ValueError(f"--image {path}: cannot read it ({e})") from e


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

        if args.question and not any(q.strip() for q in args.question):
            raise ValueError(
                'the question is empty: pass the question as the last argument, e.g. "What keeps food cold? '
                'Please segment it."'
            )
        checkpoint = common.absolute(args.checkpoint)
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
        state = {"image": _read_image(args.image), "path": args.image}
        questions = batch_questions(args.question) if args.question else []
        out = Path(common.absolute(args.out))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermissionError(
                f"--out {out}: cannot create it ({e.strerror}); choose a writable directory"
            ) from e
        model, tok = load_for_inference(checkpoint, dtype=args.dtype)
        template = args.template or checkpoint_template(checkpoint)
        sasp = None if args.sasp is None else args.sasp == "on"
        records = []

        def answer(q: str) -> None:
            image = state["image"]
            t0 = time.perf_counter()
            pred = predict(
                model, tok, image, q, max_new_tokens=args.max_new_tokens, template=template, sasp=sasp
            )
            seconds = time.perf_counter() - t0  # the first answer of a shape includes XLA's compiles
            png = out / f"answer_{len(records):02d}.png"
            overlay(image, pred.masks, pred.points, pred.point_labels).save(png)
            print(
                f"Q: {q}\nA: {pred.text}\n   object present: {pred.object_present}; "
                f"{len(pred.masks)} mask(s) -> {png}; {len(pred.tokens)} new tokens in {seconds:.1f} s",
                flush=True,
            )
            records.append(
                {
                    "image": state["path"],
                    "question": q,
                    "answer": pred.text,
                    "template": template,
                    "sasp": model.config.sasp.enabled if sasp is None else sasp,
                    "points": int((pred.point_labels >= 0).sum()),
                    "object_present": pred.object_present,
                    "num_masks": len(pred.masks),
                    "overlay": str(png),
                    "mask_pixels": [int(m.sum()) for m in pred.masks],
                    "new_tokens": len(pred.tokens),
                    "seconds": round(seconds, 3),
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
