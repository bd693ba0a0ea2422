#!/usr/bin/env bash
# The two training ablations the chapters wait for, each written beside the chapter's stored results:
#   eagle3: training-time test with n = 1 against the committed n = 5 (held-out step-k accuracy)
#   pard:   conditional drop-token against every depth at every anchor, 100 steps each
# ~5-7 min together. $OUT/C.log and $OUT/ablations.tgz.
source "$(dirname "$0")/env.sh"
exec > "$OUT/C.log" 2>&1
stamp start
if [ -z "${SKIP_EAGLE:-}" ]; then   # SKIP_EAGLE=1: the TTT ablation is already stored
    # The same number of steps (and so the same schedule) as the committed drafter's run, read from its log;
    # n = 1 steps are cheaper (292 took 82 s on the H200 on 2026-11-29), the budget is only a guard.
    steps=$($PY -c "import json; print(json.load(open('chapters/results/06_eagle3/train_eagle3_$P.json'))['config']['steps'])")
    $PY -m specdec_lib.train eagle3 --profile "$P" --steps "$steps" --time-budget-s ${EAGLE_BUDGET:-190} --option ttt_steps=1 \
        --out /tmp/eagle3-ttt1.safetensors --log chapters/results/06_eagle3/train_eagle3_${P}_ttt1.json
    stamp "eagle3 ttt_steps=1 done"
fi
for keep in 0.5 1.0; do
    name=$([ $keep = 1.0 ] && echo full || echo cod)
    $PY -m specdec_lib.train pard --profile "$P" --steps 100 --batch-size 8 --eval-every 1000 \
        --option grad_checkpoint=true --option keep=$keep --out /tmp/pard-$name.safetensors \
        --log chapters/results/07_pard/train_pard_${P}_${name}100.json
    stamp "pard keep=$keep done"
done
pack ablations chapters/results/06_eagle3/train_eagle3_${P}_ttt1.json chapters/results/07_pard/train_pard_${P}_*100.json
