#!/usr/bin/env bash
# HERE (not on the GPU machine), before a lease: split the two GGUF files of `make models` and the
# `gguf` wheel into chunks that fit one device call beside the tracked tree, under .stage/ (git-ignored).
#   bash tools/lease/prepare.sh            -> .stage/t00.. (target), .stage/d00.. (draft), .stage/w (wheel + SHA256)
# A device call carries at most 64 MiB, the tracked tree included; the margin covers untracked files.
set -euo pipefail
cd "$(dirname "$0")/../.."
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
# SLIM=1: chunks for calls that carry no tree (fewer calls; how to stage them: tools/lease/README.md, which
# keeps .gitignore in the emptied work tree)
[ -z "${SLIM:-}" ] || tree=$(( 1024 * 1024 ))
chunk=$(( 60 * 1024 * 1024 - tree ))
(( chunk > 4 * 1024 * 1024 )) || { echo "tracked tree is $tree bytes: no room for a chunk"; exit 1; }
rm -rf .stage && mkdir -p .stage/w
for f in models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf; do
    [ -f "$f" ] || { echo "no $f: run 'make models' first"; exit 1; }
done
split -b "$chunk" -d -a 2 models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf .stage/t
split -b "$chunk" -d -a 2 models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf .stage/d
(cd models && sha256sum qwen2.5-coder-1.5b-instruct-q4_k_m.gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf) > .stage/w/SHA256
.venv/bin/python -m pip download -q --no-deps -d .stage/w "gguf==$(.venv/bin/python -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')"
n=$(ls .stage | grep -c '^[td][0-9]')
echo "tree $(( tree / 1024 / 1024 )) MiB, chunks of $(( chunk / 1024 / 1024 )) MiB: $n staging calls (~4.5 s each) + .stage/w with the first"
ls .stage .stage/w
