#!/usr/bin/env bash
# The live benchmark (CUDA graphs, real pair, every method with our baseline and the transformers peers in
# the same run), written under $OUT/results/<chapter>/h200_live*.json and packed into $OUT/live.tgz.
#   ML=tools/lease/methods.txt LB=300 PC=3 bash tools/lease/D.sh
# ML: one method spec per line; LB: budget of the whole command in s (setup takes ~175 s of it, then
# rounds of ~100 s); PC: prompts per Spec-Bench category. Copy the files into chapters/results/ here.
source "$(dirname "$0")/env.sh"
ML=${ML:-tools/lease/methods.txt} LB=${LB:-300} PC=${PC:-3}
exec > "$OUT/D.log" 2>&1
stamp start
use_new_checkpoints
$PY -m specdec_lib.bench_gpu live --profile "$P" --methods "$(grep -v '^#' "$ML" | paste -sd, -)" \
    --per-category "$PC" --budget-s "$LB" --out "$OUT/results" ${D_ARGS:-}
stamp done
(cd "$OUT" && tar czf live.tgz results && rm -rf results)
