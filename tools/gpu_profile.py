"""Kernel-level profile of one graph-replayed, compiled 1-token step of the 7B-shapes model."""
import torch
from torch.profiler import profile, ProfilerActivity

from specdec_lib.bench_gpu import timing_model_7b
from specdec_lib.cuda_graphs import GraphRunner
from specdec_lib.tree import chain_inputs

model = timing_model_7b()
for compile in (False, True):
    r = GraphRunner(model, 1100, buckets=(1,), compile=compile).capture()
    pos, slots, mask = chain_inputs(1000, 1, 1100, "cuda")
    r.cache.length = 1000
    r(torch.tensor([[5]], device="cuda"), pos, r.cache, mask, slots)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            r.graphs[1].replay()
        torch.cuda.synchronize()
    print(f"compile={compile}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    del r
