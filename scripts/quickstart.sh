#!/usr/bin/env bash
# The main job on the embedded default: generate the shapes set, train a tiny READ on it, evaluate it
# (ReasonSeg protocol on the held-out split) and draw the analysis pictures. Self-sufficient: it makes
# .venv and installs read_jax into it. CPU is enough (2 cores: ~15 minutes). Outputs under runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-runs/quickstart}
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -e .
PY="$VENV/bin/python"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
"$PY" -m read_jax.data.make_shapes --out "$OUT/data" --sources reason_seg --reason-seg-dir "$OUT/data" \
  --num-train 2000 --num-val 40 --num-test 40
"$PY" train.py --config configs/tiny_shapes.py --workdir "$OUT/train" --config.data.root="$OUT/data"
"$PY" evaluate.py --config configs/tiny_shapes.py --checkpoint "$OUT/train" --split reasonseg_test \
  --config.data.root="$OUT/data" --out "$OUT/eval" --analysis "$OUT/eval/pictures"
# The untrained baseline: the same run's starting point (it also prints the all-foreground baseline).
"$PY" evaluate.py --config configs/tiny_shapes.py --checkpoint "$OUT/train" --which init --split reasonseg_test \
  --config.data.root="$OUT/data" --out "$OUT/eval_untrained"
echo "done in ${SECONDS}s: metrics in $OUT/eval/summary.json (untrained: $OUT/eval_untrained/summary.json), \
pictures in $OUT/eval/pictures/"
