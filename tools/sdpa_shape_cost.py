"""Does a new attention width cost a new kernel plan? SDPA with a mask, growing width vs fixed width.

    python tools/sdpa_shape_cost.py [--rows 7] [--steps 60] [--out results.json]

A decode loop whose mask is [T, L + T] asks for a new shape every step (L grows); one whose mask spans
the whole cache asks for the same shape every step. On a CPU both cost the same. On a GPU whose SDPA
picks cuDNN (Hopper: H100, H200), a new sequence length means a new cuDNN graph (PyTorch PR 155958
made avoiding that an opt-in), which can cost more than the step itself. Written because EAGLE-3's
proposer took 11-60 ms per step live on the H200 while Medusa's took 0.7 ms: EAGLE-3 read the new
context with a growing mask width (fixed since), Medusa runs no attention. Prints the median time per
call of each loop and the attention kernels the profiler saw (and writes them as JSON with --out).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def timed_calls(q, k, v, widths, device) -> list[float]:
    out = []
    for S in widths:
        mask = torch.zeros(q.shape[2], S, dtype=q.dtype, device=device)       # additive, all visible
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S], attn_mask=mask, enable_gqa=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=7, help="query rows per call (a tree level, a few tokens)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--start", type=int, default=1000, help="context length at the first step")
    ap.add_argument("--out", default=None, help="write the medians, maxima and kernels as JSON")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    heads, kv_heads, hd, cap = 12, 2, 128, a.start + 3 * a.steps + 64      # the 1.5B's attention shapes
    q = torch.randn(1, heads, a.rows, hd, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, cap, hd, device=device, dtype=dtype)
    v = torch.randn_like(k)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, bf16, q [1, {heads}, {a.rows}, {hd}], {kv_heads} kv heads")
    timed_calls(q, k, v, [cap] * 3, device)                                   # warm-up of the fixed shape
    growing = timed_calls(q, k, v, range(a.start, a.start + a.steps), device)
    fixed = timed_calls(q, k, v, [cap] * a.steps, device)
    again = timed_calls(q, k, v, range(a.start, a.start + a.steps), device)  # the same widths, seen before
    loops = {"growing width (new every call)": growing, "fixed width (the whole cache)": fixed,
             "growing width, second pass": again}
    if device.type == "cuda":
        # The same growing widths (new ones) with cuDNN left out: does the memory-efficient kernel, which
        # takes an additive mask too, avoid the per-shape cost? (A prefill at a new prompt length is a
        # new shape as well, for every model whose attention runs eagerly.)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        far = a.start + 2 * a.steps
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            timed_calls(q, k, v, [far + a.steps] * 3, device)
            loops["growing width, cuDNN off"] = timed_calls(q, k, v, range(far, far + a.steps), device)
    for label, ts in loops.items():
        print(f"  {label:<34} median {statistics.median(ts):8.3f} ms, max {max(ts):8.3f} ms")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        timed_calls(q, k, v, range(a.start + a.steps, a.start + a.steps + 3), device)
    names = sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower() or "cudnn" in e.key.lower()
                    or "flash" in e.key.lower() or "fmha" in e.key.lower()})
    print("attention ops and kernels seen: " + ("; ".join(n[:70] for n in names) or "none"))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(machine=name, torch=torch.__version__, dtype="bfloat16", rows=a.rows, steps=a.steps,
                           start=a.start, heads=heads, kv_heads=kv_heads, head_dim=hd, kernels=names,
                           loops={k: dict(median_ms=statistics.median(v), max_ms=max(v)) for k, v in loops.items()}),
                      f, indent=1)


if __name__ == "__main__":
    main()
