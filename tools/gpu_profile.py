"""Kernel-level profile of one graph-replayed 1-token step: compiled forward vs fused Triton kernels.

python tools/gpu_profile.py [7b|1.5b]   (random weights of those shapes; timing only)"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import pathlib as _pathlib  # noqa: E402
import sys as _sys  # noqa: E402
_sys.path.insert(0, str(_pathlib.Path(__file__).resolve().parents[1]))  # the repository root: runs without an install
from specdec_lib.cuda_graphs import GraphRunner, cuda_time
from specdec_lib.models import QWEN25_1_5B, QWEN25_7B
from specdec_lib.qwen2 import random_model
from specdec_lib.tree import chain_inputs

config = {"7b": QWEN25_7B, "1.5b": QWEN25_1_5B}[sys.argv[1] if len(sys.argv) > 1 else "1.5b"]
model = random_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
for fused in (False, True):
    r = GraphRunner(model, 1100, buckets=(1,), compile=True, fused=fused).capture()
    pos, slots, mask = chain_inputs(1000, 1, 1100, "cuda")
    r.cache.length = 1000
    r(torch.tensor([[5]], device="cuda"), pos, r.cache, mask, slots)
    step_ms = cuda_time(r.graphs[1].replay, reps=50, warmup=10) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            r.graphs[1].replay()
        torch.cuda.synchronize()
    print(f"\n=== fused={fused} (kept: {r.variant[1]}): {step_ms:.3f} ms per 1-token step (graph replay)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    del r
