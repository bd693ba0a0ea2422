#!/usr/bin/env bash
# GPU machine, after staging: assemble and check both GGUF files, install gguf, convert both models to
# safetensors and load them once on the GPU (~100-120 s). Log: $OUT/A.log.
source "$(dirname "$0")/env.sh"
exec > "$OUT/A.log" 2>&1
stamp start
cat ~/stage/t[0-9][0-9] > $SPECDEC_MODELS_DIR/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
cat ~/stage/d[0-9][0-9] > $SPECDEC_MODELS_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
(cd "$SPECDEC_MODELS_DIR" && sha256sum -c ~/stage/w/SHA256)
$PY -m pip install -q --no-deps ~/stage/w/gguf-*.whl
stamp "assembled, checked, gguf installed"
$PY -c "from specdec_lib.models import load_profile; m = load_profile('small', 'cuda'); print(m.provenance())"
stamp "converted and loaded"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
