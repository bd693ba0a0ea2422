#!/usr/bin/env bash
# Execute chapters on the GPU machine as a reader with a GPU would (issue 12, item 4): setup_course() picks
# the profile that fits, the chapters run their methods through the fast path and measure this GPU.
#   CH="07_pard" bash tools/lease/N.sh          # after A.sh; the Jupyter wheels staged in ~/stage/whl
#   (2026-12-07, H100: chapter 00 took 47 s, 01 64 s, 03 141 s; NT=540 cuts a chapter off, keeping what ran)
# The image has no Jupyter: the wheels (.whl here, 33 wheels, 17 MiB; tools/lease/README.md says how to fetch them)
# are installed into ~/site. Each executed notebook comes back as $OUT/<chapter>.ipynb, its log as
# $OUT/N_<chapter>.log. SPECDEC_PROFILE stays `small` (the staged pair; qwen7b needs the hub).
source "$(dirname "$0")/env.sh"
exec > "$OUT/${NLOG:-N}.log" 2>&1   # NLOG: another name, so two N.sh can share a call
stamp start
touch ~/"${NLOG:-N}"_start                      # results written after this came from these chapters
if [ ! -d ~/site ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target ~/site ~/stage/whl/*.whl
fi
export PYTHONPATH=$PYTHONPATH:$HOME/site
stamp "jupyter ready"
use_new_checkpoints
for ch in ${CH:-07_pard}; do
    src=$(ls chapters/"$ch"*.ipynb | head -1)
    # NT: seconds per chapter (one chapter a call: a call ends at 600 s); the notebook so far and each cell's
    # time are in $OUT even when it is cut off
    timeout "${NT:-540}" $PY tools/execute_chapter.py "$src" "$OUT/$(basename "$src")" > "$OUT/N_$ch.log" 2>&1 \
        && stamp "$ch done" || stamp "$ch FAILED (exit $?)"
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
# what the chapters wrote on this GPU (their gpu_* curves and results), to compare with the stored CPU ones
find chapters/results -type f -newer ~/"${NLOG:-N}"_start -print0 | tar czf "$OUT/${NLOG:-N}_results.tgz" --null -T - && ls -l "$OUT"
