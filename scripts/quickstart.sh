#!/usr/bin/env bash
# The main job: READ's own workflow in miniature, on the generated shapes world, from the shipped tiny SESAME
# release (assets/tiny-sesame, made by scripts/pretrain_tiny.sh), as a READ user takes it from SESAME's:
#   1. convert the release with convert_weights.py (SESAMEForCausalLM: SasP off, as SESAME was trained);
#   2. fine-tune it with READ's recipe (configs/tiny.py:read: LoRA on q/v, embed/lm_head/mask decoder/fcs
#      trainable, towers frozen, CE + 2 BCE + 0.5 Dice, SasP on with READ-7B's rule, READ-7B's data mix);
#   3. evaluate both on the held-out test split with the ReasonSeg protocol (the READ fine-tune also draws the
#      analysis pictures) and on FP-RefCOCO ("See");
#   4. chat with the fine-tune about one test image, then print the side-by-side report (README's quickstart
#      block is its output) and one machine-readable last line:
#      quickstart: READ gIoU 0.xxx cIoU 0.xxx on N held-out queries (tiny SESAME gIoU 0.xxx) in T s
# Self-sufficient: makes .venv and installs read_jax into it. CPU is enough (2 cores). Rerun after an
# interruption, it resumes the fine-tune from its checkpoints and recomputes every figure (none is reused).
#
#   bash scripts/quickstart.sh                    # outputs in runs/quickstart/
#   README=README.md bash scripts/quickstart.sh   # also rewrites README's quickstart block with the figures
#   SMOKE=1 bash scripts/quickstart.sh            # the same pipeline at smoke size (tests; a smoke release)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-runs/quickstart}
RELEASE=${RELEASE:-assets/tiny-sesame}
SMOKE=${SMOKE:-}
DATA=${DATA:-$([ -n "$SMOKE" ] && echo "$OUT/data" || echo data/shapes)}
README=${README:-}
fail() {
  echo "quickstart: $*" >&2
  exit 1
}

if [ -z "${SKIP_INSTALL:-}" ]; then
  if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e .
fi
PY="$VENV/bin/python"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
v="" base=shapes
if [ -n "$SMOKE" ]; then v=",smoke" base=smoke; fi

# -- the release: present and intact (every file against the SHA256SUMS written with it)
make_it="it is committed with the repository (\`git checkout -- $RELEASE\` restores it) and made by \
\`bash scripts/pretrain_tiny.sh\`"
[ -f "$RELEASE/SHA256SUMS" ] || fail "no tiny SESAME release in $RELEASE (no SHA256SUMS there): $make_it"
if ! bad=$(cd "$RELEASE" && sha256sum --check --quiet SHA256SUMS 2>&1); then
  fail "the release in $RELEASE is corrupt ($(echo "$bad" | grep ': FAILED' | sed 's/: FAILED.*//' | sort -u | \
tr '\n' ' ' | sed 's/ $//') do not match its SHA256SUMS): $make_it"
fi

# -- a rerun resumes what this release and size made; another release or size starts over. The figures are
#    always recomputed: nothing of an interrupted run is reported.
stamp="$(sha256sum "$RELEASE/SHA256SUMS" | cut -c1-64) smoke=${SMOKE:-0}"
if [ -f "$OUT/release.stamp" ] && [ "$(cat "$OUT/release.stamp")" != "$stamp" ]; then
  echo "quickstart: $OUT was made from another release or size; starting over"
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
echo "$stamp" >"$OUT/release.stamp"
rm -rf "$OUT/eval_sesame" "$OUT/eval_read" "$OUT/see_sesame" "$OUT/see_read" "$OUT/chat" "$OUT/report.md"

echo "== 1. convert the tiny SESAME release -> $OUT/tiny-sesame"
# In fp32 (the release's bf16 values, upcast): a converted checkpoint computes in its own dtype, the fine-tune
# in configs/tiny.py's fp32, and the chain scores the release converted the same way; so both rows of the
# report, and the release card, come from the same arithmetic.
"$PY" convert_weights.py --hf "$RELEASE" --clip "$RELEASE/vision_tower" --base "$base" --dtype fp32 \
  --out "$OUT/tiny-sesame" --overwrite --no-progress

echo "== 2. fine-tune it with READ's recipe -> $OUT/read"
common=(--config.data.root="$DATA")
"$PY" train.py --config "configs/tiny.py:read$v" --workdir "$OUT/read" "${common[@]}" \
  --config.init.checkpoint="$OUT/tiny-sesame"

echo "== 3. evaluate on the held-out test split (ReasonSeg protocol) and FP-RefCOCO (See)"
ev=("$PY" evaluate.py --config "configs/tiny.py:read$v" "${common[@]}")
"${ev[@]}" --checkpoint "$OUT/tiny-sesame" --split reasonseg_test --out "$OUT/eval_sesame"
"${ev[@]}" --checkpoint "$OUT/read" --split reasonseg_test --out "$OUT/eval_read" \
  --analysis "$OUT/eval_read/pictures" --analysis-limit 24
# See: free generation on the first 200 FP-RefCOCO validation queries (25 batches of 8), the same for both.
"${ev[@]}" --checkpoint "$OUT/tiny-sesame" --split fprefcoco_val --out "$OUT/see_sesame" --max-batches 25
"${ev[@]}" --checkpoint "$OUT/read" --split fprefcoco_val --out "$OUT/see_read" --max-batches 25

echo "== 4. chat with the fine-tune about one test image"
# The first held-out test image and its query, asked as READ's ReasonSeg templates ask it.
mapfile -t ask < <("$PY" - "$DATA/reason_seg/ReasonSeg/test" <<'EOF'
import glob, json, sys
path = sorted(glob.glob(sys.argv[1] + "/*.json"))[0]
item = json.load(open(path))
q = item["text"][0]
print(path[: -len(".json")] + ".jpg")
print(f"{q} Please output segmentation mask." if item["is_sentence"] else f"Can you segment the {q} in this image?")
EOF
)
"$PY" -m read_jax.cli.chat --checkpoint "$OUT/read" --image "${ask[0]}" --out "$OUT/chat" --max-new-tokens 32 \
  "${ask[1]}"

compare=(--run "tiny SESAME (SasP off)" "$OUT/eval_sesame" --run "READ fine-tune (SasP on)" "$OUT/eval_read"
  --see "tiny SESAME (SasP off)" "$OUT/see_sesame" --see "READ fine-tune (SasP on)" "$OUT/see_read"
  --markdown "$OUT/report.md")
if [ -n "$README" ]; then compare+=(--readme "$README"); fi
echo "outputs: $OUT/report.md, pictures in $OUT/eval_read/pictures/, the chat's overlay in $OUT/chat/"
"$PY" -m read_jax.eval.compare "${compare[@]}" --seconds "$SECONDS"
