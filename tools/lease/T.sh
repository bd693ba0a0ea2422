#!/usr/bin/env bash
# Train all three learned proposers AT ONCE, one process each on the same GPU, for one call:
#   BUDGET=380 bash tools/lease/T.sh                 # each loop's budget in s (default 380)
#   TA_pard="--init specdec_lib/assets/checkpoints/pard-small.safetensors" BUDGET=380 bash tools/lease/T.sh
# TM: which methods (default "medusa eagle3 pard"), e.g. TM="eagle3 pard" leaves a plateaued one out.
# TA_<method>: that method's extra train arguments (--init CHECKPOINT continues the committed weights,
# --temperatures 0 trains on the greedy answers only, --steps N asks for fewer steps than the budget fits).
# One method alone leaves the GPU idle between its small kernels (Medusa's heads, EAGLE-3's one layer):
# three processes fill those gaps, and one 10-minute call trains all three. Each run re-plans its steps at
# every evaluation (train.steps_that_fit), so it ends in time however the others slow it down. The call
# needs ~BUDGET + 90 s (loading, the final evaluations, int4/int8 saving and re-evaluation): give it 590.
# Logs $OUT/T_<method>.log; checkpoints kept in ~/ckpt (D.sh uses them); $OUT/train_all.tgz.
source "$(dirname "$0")/env.sh"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
B=${BUDGET:-380}
exec > "$OUT/T.log" 2>&1
stamp start
pids=()
read -r -a methods <<< "${TM:-medusa eagle3 pard}"
for m in "${methods[@]}"; do
    extra=TA_$m
    echo "$m: ${!extra:-}"
    # shellcheck disable=SC2086  # the extra arguments split on spaces
    $PY -m specdec_lib.train "$m" --profile "$P" --time-budget-s "$B" --steps 20000 ${!extra:-} \
        > "$OUT/T_$m.log" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do wait "${pids[$i]}" && echo "job $i done" || echo "job $i FAILED (exit $?)"; done
stamp "all done"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
mkdir -p ~/ckpt && cp specdec_lib/assets/checkpoints/*-$P.safetensors ~/ckpt/
pack train_all specdec_lib/assets/checkpoints/{medusa,eagle3,pard}-$P.safetensors chapters/results/*/train_*_$P.json
