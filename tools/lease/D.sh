#!/usr/bin/env bash
# The live benchmark (CUDA graphs, real pair, every method with our baseline and the transformers peers in
# the same run), written as chapters/results/<chapter>/h200_live<TAG>.json (+ _run) into $OUT/live.tgz:
# `tar xzf live.tgz` at the repository root here puts them where the chapters read them.
#   ML=tools/lease/methods.txt LB=300 PC=3 TAG=_repeat bash tools/lease/D.sh
# ML: one method spec per line; LB: budget of the whole command in s (setup takes ~175 s of it, then
# rounds of ~100 s); PC: prompts per Spec-Bench category; TAG: file-name suffix (default none).
source "$(dirname "$0")/env.sh"
ML=${ML:-tools/lease/methods.txt} LB=${LB:-300} PC=${PC:-3}
exec > "$OUT/D.log" 2>&1
stamp start
use_new_checkpoints
$PY -m specdec_lib.bench_gpu live --profile "$P" --methods "$(grep -v '^#' "$ML" | paste -sd, -)" \
    --per-category "$PC" --budget-s "$LB" --out "$OUT/chapters/results" --tag "${TAG:-}" ${D_ARGS:-}
stamp done
(cd "$OUT" && tar czf live.tgz chapters && rm -rf chapters)
