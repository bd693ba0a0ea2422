# Sourced by every script here that runs on the GPU machine (one H200; see README.md).
# Staged files live outside the repository (~/stage), so they survive between calls while the
# machine stays warm; the converted models go to ~/models.
set -euo pipefail
# SPECDEC_PROFILE=tiny (and OUT=/tmp/x) dry-runs every script on a CPU here, in seconds.
export SPECDEC_MODELS_DIR=${SPECDEC_MODELS_DIR:-$HOME/models} SPECDEC_PROFILE=${SPECDEC_PROFILE:-small}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # tools/*.py import specdec_lib
P=$SPECDEC_PROFILE
OUT=${OUT:?run these through the device tool: \$OUT is its folder that comes back}
PY=${PY:-python}
mkdir -p ~/stage "$SPECDEC_MODELS_DIR" "$OUT"
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
# Results come back as one tarball per call: a call returns at most 8 files.
# pack NAME FILE...: the files that exist (a glob that matched nothing is skipped, and said)
pack() {
    local name=$1 f=() x
    shift
    for x in "$@"; do if [ -e "$x" ]; then f+=("$x"); else echo "pack: no $x"; fi; done
    tar czf "$OUT/$name.tgz" "${f[@]}" && ls -l "$OUT"
}
# A tracked file changed on the GPU machine is replaced by this checkout's copy at the next call: B.sh keeps
# what it trains in ~/ckpt, and the scripts that use checkpoints put those back into the tree first.
use_new_checkpoints() {
    local c
    for c in ~/ckpt/*-"$P".safetensors; do
        [ -e "$c" ] && cp "$c" specdec_lib/assets/checkpoints/ && echo "using this lease's $(basename "$c")"
    done
    return 0
}
