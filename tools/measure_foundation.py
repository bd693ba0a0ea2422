"""The foundation's closing-note numbers on the real small pair (run under the CPU lock):
the baseline bench in bf16 and float32 (ours vs transformers' generate), and the logit agreement
of our Qwen2 with transformers' on the real 1.5B (float32)."""
import json
import subprocess
import sys

import torch

for dtype in ("bfloat16", "float32"):
    subprocess.run([sys.executable, "-m", "specdec_lib.bench", "--method", "baseline", "--profile", "small",
                    "--prompts", "spec_bench:summarization", "--limit", "3", "--dtype", dtype,
                    "--out", f"chapters/results/00_setup/bench_baseline_{dtype}"], check=True)

from transformers import AutoModelForCausalLM
import pathlib as _pathlib  # noqa: E402
import sys as _sys  # noqa: E402
_sys.path.insert(0, str(_pathlib.Path(__file__).resolve().parents[1]))  # the repository root: runs without an install
from specdec_lib.models import gguf_path
from specdec_lib.qwen2 import from_transformers
from specdec_lib.decoding import prefill
from specdec_lib.tree import step_inputs, root_to_leaf_paths

path = gguf_path("target")
hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
ours = from_transformers(hf, "cpu", torch.float32)
g = torch.Generator().manual_seed(0)
seq = torch.randint(0, 151000, (64,), generator=g).tolist()
out = {}
with torch.inference_mode():
    ref = hf(torch.tensor([seq])).logits[0]
    cache = ours.new_cache(128)
    pre, _ = prefill(ours, torch.tensor([seq[:48]]), cache)
    out["prefill_48"] = (pre[0] - ref[:48]).abs().max().item()
    steps = []
    for i in range(48, 56):
        s, _ = prefill(ours, torch.tensor([[seq[i]]]), cache)
        steps.append((s[0, 0] - ref[i]).abs().max().item())
    out["incremental_8_steps"] = max(steps)
    parents = [-1, 0, -1, 2, 2]
    tokens = [seq[57], seq[58], 17, 18, 19]
    pos, slots, mask = step_inputs(cache.length, torch.tensor(parents))
    tl, _ = ours(torch.tensor([[seq[56]] + tokens]), pos, cache, mask, slots)
    diffs = []
    for p in root_to_leaf_paths(torch.tensor(parents)):
        r = hf(torch.tensor([seq[:57] + [tokens[i] for i in p]])).logits[0, 56:]
        diffs.append((tl[0, [0] + [i + 1 for i in p]] - r).abs().max().item())
    out["tree_step_vs_each_path"] = max(diffs)
out["logit_scale"] = ref.abs().max().item()
print(json.dumps(out, indent=1))
json.dump(out, open("chapters/results/00_setup/logit_agreement_1.5b_float32.json", "w"), indent=1)
