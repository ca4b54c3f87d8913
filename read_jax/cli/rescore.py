"""Re-score an evaluation from its per-sample mask dumps (`evaluate.py --dump-masks`), as `test_read.py
--cmd metrics` does: every query's I/U from OUT/masks/*.npz, the protocol's figures from those.

    python -m read_jax.cli.rescore runs/eval_refcoco        # prints the figures, checks them against
                                                            # OUT/summary.json, writes OUT/rescored.json

Exit status 0 when the re-scored figures equal the direct run's, 1 when any differs (each listed).
"""

from __future__ import annotations

import json
import os
import sys

from read_jax.cli import common


def main(argv=None) -> int:
    p = common.parser("python -m read_jax.cli.rescore", __doc__)
    p.add_argument("out", help="an evaluate.py output directory written with --dump-masks")
    args = p.parse_args(argv)

    def body() -> int:
        from read_jax.eval import dumps

        out = os.path.abspath(args.out)
        if not os.path.isfile(os.path.join(out, "summary.json")):
            raise FileNotFoundError(
                f"{out} has no summary.json (an evaluate.py --dump-masks output directory)"
            )
        summary, records = dumps.rescore(out)
        with open(os.path.join(out, "summary.json")) as f:
            direct = json.load(f)
        with open(os.path.join(out, "rescored.json"), "w") as f:
            json.dump(summary, f, indent=2)
        figures = "  ".join(
            f"{k} {100 * summary[k]:.2f}" for k in ("gIoU", "cIoU", "See", "Segment") if k in summary
        )
        print(f"{direct.get('split', out)}: {figures}  ({len(records)} queries, from {dumps.MASK_DIR}/)")
        diff = dumps.differences(direct, summary)
        for line in diff:
            print(f"differs from summary.json: {line}")
        if not diff:
            print("equal to summary.json")
        return 1 if diff else 0

    return common.run_main("rescore", body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
