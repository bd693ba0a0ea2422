"""Where a k-token verify step's time goes: kernel tables of the graph-replayed target step, k = 1..32.

    python tools/profile_verify.py [1.5b|0.5b|7b] [--out FILE.json]   (random weights of those shapes)

Issue 12 asks for c(k) = t(k) / t(1) <= 1.3 for k <= 8 on the real 1.5B; the H200 gave c(5) = 1.67 and
c(16) = 2.02 while the weights read are the same for every k. This prints, for the live runner's graphs
(GraphRunner with compile and the fused kernels, each bucket keeping its faster variant) and for the
plain graphs, the replay time per bucket, then the kernels of buckets 1 and 16 side by side, grouped
(GEMM / attention / fused Triton / other), so the kernels whose time grows with k stand out.
"""
import argparse
import json
import pathlib as _pathlib
import sys as _sys

import torch
from torch.profiler import ProfilerActivity, profile

_sys.path.insert(0, str(_pathlib.Path(__file__).resolve().parents[1]))  # the repository root: runs without an install
from specdec_lib.cuda_graphs import GraphRunner  # noqa: E402
from specdec_lib.models import QWEN25_0_5B, QWEN25_1_5B, QWEN25_7B  # noqa: E402
from specdec_lib.qwen2 import random_model  # noqa: E402
from specdec_lib.timing import cuda_time  # noqa: E402
from specdec_lib.tree import chain_inputs  # noqa: E402

BUCKETS = (1, 2, 4, 8, 16, 32)
PREFIX = 1024


def group(name: str) -> str:
    n = name.lower()
    if "gemm" in n or "gemv" in n or "cutlass" in n or "sm90_xmma" in n or "cublas" in n:
        return "gemm"
    if "attention" in n or "sdpa" in n or "fmha" in n or "flash" in n or "softmax" in n:
        return "attention"
    if "triton" in n or "_kernel" in n:
        return "triton"
    return "other"


def kernel_table(replay, reps: int = 10) -> dict:
    """{kernel name: microseconds per replay} over reps replays."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            replay()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us:
            out[e.key] = out.get(e.key, 0.0) + us / reps
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="?", default="1.5b", choices=["1.5b", "0.5b", "7b"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    config = {"1.5b": QWEN25_1_5B, "0.5b": QWEN25_0_5B, "7b": QWEN25_7B}[a.shapes]
    model = random_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = 4.8e12 if "H200" in torch.cuda.get_device_name() else None
    print(f"{a.shapes} shapes, bf16, {torch.cuda.get_device_name()}, prefix {PREFIX}; weights {weight_bytes / 1e9:.2f} GB"
          + (f" (bound at 4.8 TB/s: {weight_bytes / bw * 1e3:.3f} ms)" if bw else ""), flush=True)
    result = {"shapes": a.shapes, "device": torch.cuda.get_device_name(), "prefix": PREFIX, "dtype": "bfloat16",
              "weight_bytes": weight_bytes, "runners": {}}
    for label, kw in (("live (compiled + fused, faster kept)", dict(compile=True, fused=True)), ("plain graphs", {})):
        r = GraphRunner(model, PREFIX + 64, buckets=BUCKETS, **kw).capture()
        r.cache.length = PREFIX
        times, tables = {}, {}
        for b in BUCKETS:
            pos, slots, mask = chain_inputs(PREFIX, b, PREFIX + 64, "cpu")
            r(torch.arange(b)[None] + 5, pos, r.cache, mask, slots)        # fills the static inputs
            times[b] = cuda_time(r.graphs[b].replay, reps=50, warmup=10) * 1e3
            if b in (1, 16):
                tables[b] = kernel_table(r.graphs[b].replay)
        t1 = times[1]
        print(f"\n=== {label}: replay ms (c(k)) and variant per bucket", flush=True)
        for b in BUCKETS:
            print(f"  k={b:3d}  {times[b]:7.3f} ms  c={times[b] / t1:5.2f}  {r.variant.get(b, '-')}")
        groups = {b: {} for b in tables}
        for b, t in tables.items():
            for k, us in t.items():
                groups[b][group(k)] = groups[b].get(group(k), 0.0) + us
        print("  per group, us per step:   k=1      k=16")
        for gname in ("gemm", "attention", "triton", "other"):
            print(f"    {gname:10s}           {groups[1].get(gname, 0):8.1f} {groups[16].get(gname, 0):8.1f}")
        names = sorted(set(tables[1]) | set(tables[16]), key=lambda k: -tables[16].get(k, 0))
        print("  kernels (us per step), largest at k=16 first:")
        for k in names[:18]:
            print(f"    {tables[1].get(k, 0):8.1f} {tables[16].get(k, 0):8.1f}  {k[:110]}")
        result["runners"][label] = {"replay_ms": times, "variant": {b: r.variant.get(b) for b in BUCKETS},
                                    "groups_us": groups, "kernels_us": {b: dict(sorted(t.items(), key=lambda x: -x[1])[:40])
                                                                        for b, t in tables.items()}}
        del r
        torch.cuda.empty_cache()
    from specdec_lib.kernels import tuned_configs
    result["tuned_linear_configs"] = tuned_configs()      # what the tuner kept, per projection shape and T
    picked = {}
    for key, cfg in result["tuned_linear_configs"].items():
        kind = cfg["dot"] if cfg["dot"] in ("swap", "splitk") else "3d" if cfg["acc2d"] == "3d" else \
            "acc2d" if cfg["acc2d"] is True else "dot" if cfg["dot"] is True else "fma"
        picked[kind] = picked.get(kind, 0) + 1
    print("linear configurations the tuner kept, by kind:", picked)
    if a.out:
        _pathlib.Path(a.out).write_text(json.dumps(result, indent=1))
        print("wrote", a.out)


if __name__ == "__main__":
    main()
