#!/usr/bin/env bash
# Where each proposer's time per step goes, with the eager target (tools/profile_proposer.py): written for
# EAGLE-3's 11-60 ms per proposal in the live runs of 2026-11-29 (Medusa: 0.7 ms). ~2-3 min. $OUT/P.log.
source "$(dirname "$0")/env.sh"
exec > "$OUT/P.log" 2>&1
stamp start
use_new_checkpoints
$PY tools/sdpa_shape_cost.py --out "$OUT/sdpa_shape_cost.json"   # a new mask width per step: a new cuDNN graph per step?
$PY tools/profile_proposer.py "eagle3:total_tokens=15" "eagle3:chain=true:depth=5" "eagle3:total_tokens=15:graph=false" \
    "medusa:draft_len=15" "pard:draft_len=4" "suffix:cache_size=0" "suffix" --tokens 64
# the same with cuDNN attention off: is an eager drafter's per-shape cost (PARD 22 ms, EAGLE-3 20 ms eager)
# the graph build of each new attention shape?
$PY tools/profile_proposer.py "eagle3:total_tokens=15:graph=false" "pard:draft_len=4" --tokens 64 --rows 8 --no-cudnn-sdpa
stamp done
