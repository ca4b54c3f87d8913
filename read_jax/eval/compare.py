"""Side-by-side figures of several evaluations of the same held-out queries (the quickstart's report).

    python -m read_jax.eval.compare --run "tiny SESAME (SasP off)" runs/q/eval_sesame \\
        --run "READ (SasP on)" runs/q/eval_read [--see "tiny SESAME (SasP off)" runs/q/fp_sesame ...] \\
        [--markdown runs/q/results.md] [--readme README.md] [--seconds 812]

Each `--run NAME DIR` is an `evaluate.py --out DIR` of the ReasonSeg protocol (its `summary.json` and
`samples.jsonl`); `--see NAME DIR` adds that model's FP-RefCOCO "See" accuracy (an `evaluate.py` run of an
`fprefcoco*` split). The table has gIoU / cIoU overall and per query kind, the all-foreground baseline (the
same queries scored with every pixel predicted), See, and for SasP runs how often the similarity map's maximum
(SasP's first point) lies on the target (`summary["sasp_points"]`). The runs must have scored the same queries
(same ids), or the comparison is refused. `--readme` replaces the block between `<!-- quickstart:begin -->`
and `<!-- quickstart:end -->` with the table, so the README's figures are the command's, not typed by hand.

The last line printed is machine-readable:

    quickstart: READ gIoU 0.xxx cIoU 0.xxx on N held-out queries (tiny SESAME gIoU 0.xxx) in T s

with the last `--run` as "READ" and the first as "tiny SESAME".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence

BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"


def read_run(directory: str) -> tuple[dict, list[str]]:
    """(summary, sorted query ids) of an `evaluate.py --out` directory."""
    summary_path = os.path.join(directory, "summary.json")
    if not os.path.isfile(summary_path):
        raise FileNotFoundError(f"{directory}: no summary.json (run evaluate.py --out {directory} first)")
    with open(summary_path) as f:
        summary = json.load(f)
    ids = []
    samples = os.path.join(directory, "samples.jsonl")
    if os.path.isfile(samples):
        with open(samples) as f:
            ids = sorted(json.loads(line)["id"] for line in f if line.strip())
    return summary, ids


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def table(runs: Sequence[tuple[str, dict]], see: Mapping[str, float]) -> str:
    """A markdown table: a row per run, then the all-foreground baseline of the first run's queries."""
    kinds = sorted({k for _, s in runs for k in s.get("by_query_kind", {})})
    head = ["model", "gIoU", "cIoU", *(f"{k} gIoU" for k in kinds), "See", "SasP top point on target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in runs:
        per = s.get("by_query_kind", {})
        cells = [name, _fmt(s["gIoU"]), _fmt(s["cIoU"])]
        cells += [_fmt(per.get(k, {}).get("gIoU")) for k in kinds] + [_fmt(see.get(name))]
        cells.append(_fmt(s.get("sasp_points", {}).get("top_on_target")))
        lines.append("| " + " | ".join(cells) + " |")
    fg = runs[0][1].get("all_foreground")
    if fg:  # scored overall only
        cells = ["all-foreground baseline", _fmt(fg["gIoU"]), _fmt(fg["cIoU"]), *(["—"] * (len(kinds) + 2))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_line(runs: Sequence[tuple[str, dict]], seconds: float | None) -> str:
    first, last = runs[0][1], runs[-1][1]
    t = "" if seconds is None else f" in {seconds:.0f} s"
    return (
        f"quickstart: READ gIoU {last['gIoU']:.3f} cIoU {last['cIoU']:.3f} on {int(last['num_queries'])} "
        f"held-out queries (tiny SESAME gIoU {first['gIoU']:.3f}){t}"
    )


def replace_block(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    """`text` with the lines between `begin` and `end` replaced by `block`."""
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}\n{end}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", nargs=2, action="append", metavar=("NAME", "DIR"), required=True)
    p.add_argument("--see", nargs=2, action="append", metavar=("NAME", "DIR"), default=[])
    p.add_argument("--markdown", help="write the table to this file")
    p.add_argument("--readme", help="replace the quickstart block of this README with the table")
    p.add_argument("--seconds", type=float, help="wall time to report on the last line")
    args = p.parse_args(argv)
    try:
        loaded = [(name, *read_run(d)) for name, d in args.run]
        ids = {name: i for name, _, i in loaded}
        if any(i and i != ids[loaded[0][0]] for i in ids.values()):
            raise ValueError("the runs did not score the same queries: compare evaluations of one split")
        runs = [(name, s) for name, s, _ in loaded]
        see = {name: float(read_run(d)[0]["See"]) for name, d in args.see}
    except (OSError, ValueError, KeyError) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    text = table(runs, see)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.readme:
        with open(args.readme) as f:
            readme = f.read()
        with open(args.readme, "w") as f:
            f.write(
                replace_block(
                    readme, f"{text}\n\nThe last line of that run:\n`{final_line(runs, args.seconds)}`"
                )
            )
    print(final_line(runs, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
