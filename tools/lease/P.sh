#!/usr/bin/env bash
# Where the time of a step goes (~4-5 min). $OUT/P.log, $OUT/profile_verify_1.5b.json, $OUT/sdpa_shape_cost.json.
# 1. the target's k-token verify step, kernel by kernel (tools/profile_verify.py, random 1.5B weights): which
#    kernels make c(16) = 2.0 on the H200 when the weights read are the same for every k (issue 12);
# 2. each proposer's time per step with the eager target (tools/profile_proposer.py): EAGLE-3 with its whole
#    proposal in one CUDA graph (ProposeGraph), against Medusa's 1.0 ms and its own earlier 4.2 ms;
# 3. attention at a new width every call, with and without cuDNN (tools/sdpa_shape_cost.py), and PARD's eager
#    proposer with cuDNN off: is an eager drafter's per-shape cost the cuDNN graph build?
source "$(dirname "$0")/env.sh"
exec > "$OUT/P.log" 2>&1
stamp start
use_new_checkpoints
$PY tools/profile_verify.py 1.5b --out "$OUT/profile_verify_1.5b.json" || echo "profile_verify failed"
stamp "profile_verify done"
$PY tools/profile_proposer.py "eagle3:total_tokens=15" "eagle3:total_tokens=15:compile_block=true" \
    "eagle3:chain=true:depth=5" "medusa:draft_len=15" \
    --tokens 64 --rows 25 || echo "profile_proposer failed"
stamp "profile_proposer done"
$PY tools/sdpa_shape_cost.py --out "$OUT/sdpa_shape_cost.json" || echo "sdpa_shape_cost failed"
$PY tools/profile_proposer.py "pard:draft_len=4" --tokens 64 --rows 8 --no-cudnn-sdpa || echo "profile_proposer failed"
stamp done
