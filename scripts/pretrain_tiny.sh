#!/usr/bin/env bash
# The tiny pretraining chain that makes the shipped tiny SESAME release (assets/tiny-sesame), READ's own
# starting point in miniature: vision stage (CLIP learns what covers each patch) -> LLaVA stage (projector +
# LLaMA on the shapes world's conversations, on that CLIP, frozen) -> SAM stage (SAM on point, box and
# attribute prompts) -> SESAME stage (the [SEG] model, SasP off, on a ReasonSeg-weighted mix of every source,
# with the similarity-map term: configs/tiny.py says why) -> points stage (its best checkpoint continued with
# the term on the map as SasP reads it) -> export of the points stage's best checkpoint in a SESAME release's
# layout. Each stage resumes from its own checkpoints when rerun, and a stage whose predecessor is missing
# stops with a message naming the command that makes it.
#
#   bash scripts/pretrain_tiny.sh                 # everything, CPU (see README for the wall time)
#   OUT=runs/tiny SEED=0 bash scripts/pretrain_tiny.sh
#   README=README.md bash scripts/pretrain_tiny.sh  # also rewrite README's release block with the figures
#   SMOKE=1 bash scripts/pretrain_tiny.sh         # the same chain at smoke size (seconds per stage; tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/tiny}
DATA=${DATA:-data/shapes}
RELEASE=${RELEASE:-assets/tiny-sesame}
SEED=${SEED:-0}
SMOKE=${SMOKE:-}
README=${README:-}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
v=""; sam_cfg=configs/pretrain_sam.py:attributes; vision_cfg=configs/pretrain_vision.py
if [ -n "$SMOKE" ]; then
  v=",smoke"; sam_cfg=configs/pretrain_sam.py:attributes,smoke; vision_cfg=configs/pretrain_vision.py:smoke
fi
common=(--config.data.root="$DATA" --config.init.seed="$SEED")

echo "== vision stage -> $OUT/vision"
"$PY" -m read_jax.cli.pretrain_vision --config "$vision_cfg" --workdir "$OUT/vision" --config.init.seed="$SEED"

echo "== LLaVA stage -> $OUT/llava"
"$PY" train.py --config "configs/tiny.py:llava$v" --workdir "$OUT/llava" "${common[@]}" \
  --config.init.clip="$OUT/vision/clip"
# The stage's saved config, with this checkout's tokenizer (configs/tiny.py's): a stage trained in another
# checkout names that checkout's.
"$PY" -m read_jax.cli.vqa_eval --checkpoint "$OUT/llava" --split val --image-control \
  --out "$OUT/llava/vqa_val.json" --config.data.tokenizer="$PWD/tests/assets/tokenizer" --config.data.root="$DATA"

echo "== SAM stage -> $OUT/sam"
"$PY" -m read_jax.cli.pretrain_sam --config "$sam_cfg" --workdir "$OUT/sam"

echo "== SESAME stage -> $OUT/sesame"
"$PY" train.py --config "configs/tiny.py:sesame$v" --workdir "$OUT/sesame" "${common[@]}" \
  --config.init.llava="$OUT/llava" --config.init.sam="$OUT/sam/sam"
"$PY" evaluate.py --config "configs/tiny.py:sesame$v" --checkpoint "$OUT/sesame" --split reasonseg_test \
  --config.data.root="$DATA" --out "$OUT/sesame/eval_test"

echo "== points stage -> $OUT/points"
"$PY" train.py --config "configs/tiny.py:points$v" --workdir "$OUT/points" "${common[@]}" \
  --config.init.llava="$OUT/llava" --config.init.sam="$OUT/sam/sam" --config.init.trainables_from="$OUT/sesame"
"$PY" evaluate.py --config "configs/tiny.py:points$v" --checkpoint "$OUT/points" --split reasonseg_test \
  --config.data.root="$DATA" --out "$OUT/points/eval_test"

echo "== export -> $RELEASE, converted back and evaluated (the bf16-rounded weights a user gets)"
base=shapes
if [ -n "$SMOKE" ]; then base=smoke; fi
"$PY" convert_weights.py --export "$OUT/points" --out "$RELEASE" --dtype bf16 --overwrite
"$PY" convert_weights.py --hf "$RELEASE" --clip "$RELEASE/vision_tower" --base "$base" --dtype fp32 \
  --out "$OUT/release_converted" --overwrite --no-progress
"$PY" evaluate.py --config "configs/tiny.py:sesame$v" --checkpoint "$OUT/release_converted" \
  --split reasonseg_test --config.data.root="$DATA" --out "$OUT/release_eval"
"$PY" scripts/release_card.py --release "$RELEASE" --chain "$OUT" --converted-eval "$OUT/release_eval" \
  --seed "$SEED" --seconds "$SECONDS" ${README:+--readme "$README"}
echo "pretrain_tiny: done in ${SECONDS}s; release in $RELEASE"
