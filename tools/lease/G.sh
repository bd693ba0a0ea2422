#!/usr/bin/env bash
# The GPU checks that can fail (tools/gpu_check.py: every graph and fused path against the eager forward in
# float32, bucketing and padding included; ~1-2 min), then every method's greedy output against our
# baseline in float32 through the live path (one Spec-Bench prompt per category, 64 new tokens).
# Run after the last change to a GPU path. GB=0: gpu_check alone; GC=0: the float32 bench alone. The two do not fit
# one call (2026-12-07, H100: gpu_check 311 s, then the float32 capture 126 s for the draft runner alone): run
# `GB=0 bash tools/lease/G.sh` and `GC=0 GB=520 bash tools/lease/G.sh` as two calls.
# $OUT/G.log (GLOG=name: $OUT/name.log, so the two can run side by side in one call: neither is a timing),
# $OUT/live_fp32.tgz; exit status 1 if a check fails.
source "$(dirname "$0")/env.sh"
exec > "$OUT/${GLOG:-G}.log" 2>&1
stamp start
use_new_checkpoints
status=0
if [ "${GC:-1}" != 0 ]; then                            # GC=0: the float32 live bench alone
    $PY tools/gpu_check.py ${GC_ARGS:-} || status=1   # GC_ARGS=--cpu for a dry run here
    stamp "gpu_check exit $status"
fi
[ "${GB:-300}" = 0 ] || $PY -m specdec_lib.bench_gpu live --profile "$P" --dtype float32 --tag _fp32 --prompts spec_bench --per-category 1 \
    --new-tokens 64 --peer-prompts 0 --oracle-prompts 0 --budget-s ${GB:-300} --out "$OUT/chapters/results" \
    --methods "$(grep -v '^#' "${ML:-tools/lease/methods.txt}" | paste -sd, -)" || status=1
if [ -d "$OUT/chapters" ]; then (cd "$OUT" && tar czf live_fp32.tgz chapters && rm -rf chapters); fi   # h200_live_fp32.json per chapter
stamp "done, exit $status"
exit $status
