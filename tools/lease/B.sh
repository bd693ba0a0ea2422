#!/usr/bin/env bash
# Train one learned proposer on the committed self-distilled data and bring back its checkpoint and log.
#   bash tools/lease/B.sh eagle3 300 --steps 1000   # method, time budget of the loop in seconds, then
#   bash tools/lease/B.sh pard 200 --steps 1000     # anything for specdec_lib.train (the budget only cuts
#                                                   # the planned steps, so plan more than fit)
# Budget the call: ~10 s to load, the loop, then ~20 s of final evaluation and saving. $OUT/train_<m>.tgz.
source "$(dirname "$0")/env.sh"
use_new_checkpoints   # another method retrained earlier in this lease
m=$1 budget=$2
shift 2
exec > "$OUT/B_$m.log" 2>&1
stamp start
$PY -m specdec_lib.train "$m" --profile "$P" --time-budget-s "$budget" "$@"
stamp done
mkdir -p ~/ckpt && cp specdec_lib/assets/checkpoints/$m-$P.safetensors ~/ckpt/
pack "train_$m" specdec_lib/assets/checkpoints/$m-$P.safetensors chapters/results/*/train_${m}_$P.json
