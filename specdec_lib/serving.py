"""Speculation under load: the time of one forward of B rows x k new tokens (the serving view).

A server decodes many requests at once: one forward carries B rows (requests), each with k new
tokens (k = 1 for plain decoding, k = g + 1 to verify a draft of g). At batch 1 the forward is
memory-bound: the weights are read once whatever k is, so t(1, k) ~ t(1, 1) for small k and the
extra tokens are nearly free. At large B the same forward already carries B tokens of arithmetic;
multiplying that by g + 1 makes it compute-bound, t(B, g + 1) grows ~(g + 1)-fold, and the
rejected draft tokens are paid for in full. So speculation helps most at batch 1 / low load and
can slow a busy server down.

    speedup(B) = E[tokens per step] / (g * c_draft + t(B, g + 1) / t(B, 1))

(costmodel.py's formula with a cost curve measured at batch B). Command line, on one GPU:

    python -m specdec_lib.serving --out chapters/results/00b_verification/

times the Qwen2.5-7B shapes (random weights, bf16; only the time matters) after a 1,024-token
prefix for B in 1..64 and k in 1..16, each (B, k) replayed from its own CUDA graph and timed with
CUDA events, and writes batch_costs_gpu_7b.json. On a CPU (`--device cpu --shapes tiny`) the
same code runs eagerly, timed with perf_counter.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from .costmodel import expected_tokens_per_step, relative_cost
from .metrics import write_json
from .models import QWEN25_0_5B, QWEN25_1_5B, QWEN25_7B, TINY_TARGET, machine_name
from .qwen2 import count_parameters, random_model
from .timing import cpu_time
from .tree import chain_inputs

BATCHES = (1, 2, 4, 8, 16, 32, 64)
KS = (1, 2, 3, 4, 5, 6, 8, 12, 16)
SHAPES = {"7b": QWEN25_7B, "1.5b": QWEN25_1_5B, "0.5b": QWEN25_0_5B, "tiny": TINY_TARGET}
OUT = Path(__file__).resolve().parent.parent / "chapters" / "results" / "00b_verification"


def batch_inputs(prefix_len: int, batch: int, k: int, vocab: int, device="cpu"):
    """ids, pos [B, k], slots [k], mask [k, prefix_len + k]: k new tokens in a row after prefix_len
    cached ones, the same positions for every row (all requests equally long: the timing case)."""
    pos, slots, mask = chain_inputs(prefix_len, k, device=device)
    ids = torch.randint(0, vocab, (batch, k), generator=torch.Generator().manual_seed(k)).to(device)
    return ids, pos.expand(batch, k).contiguous(), slots, mask


def _time_cpu(fn, reps: int) -> float:
    return cpu_time(fn, reps)                      # the fastest of reps runs after a warm-up


def _time_cuda_graph(fn, reps: int) -> float:
    """Capture fn() in a CUDA graph (no Python launch overhead in the timing) and return the median
    replay time from CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # warm-up off the capture stream, as CUDA graphs ask
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def measure_batch_costs(model, batches=BATCHES, ks=KS, prefix_len: int = 1024, reps: int = 10,
                        progress: bool = True) -> dict:
    """t(B, k): seconds of one forward of B rows x k new tokens after prefix_len cached tokens.

    Each B gets its own cache [layers, B, nkv, prefix_len + max(ks), hd], filled with noise instead
    of a prefill (the time of attention does not depend on the values; a 64 x 1,024-token prefill
    would cost more than all the timings). Every timed forward writes the same k slots after the
    prefix, so the state is identical each time. Returns {"batch", "k", "time_s" [len(batches)][len(ks)],
    "prefix_len", "timer"}.
    """
    from tqdm.auto import tqdm
    if not batches or not ks or min(batches) < 1 or min(ks) < 1:
        raise ValueError(f"batches and ks must be non-empty lists of positive ints, got {batches}, {ks}")
    on_gpu = model.device.type == "cuda"
    timer = _time_cuda_graph if on_gpu else _time_cpu
    gen = torch.Generator(device=model.device).manual_seed(0)
    table = []
    bar = tqdm(total=len(batches) * len(ks), desc="t(B, k)", disable=not progress)
    for B in batches:
        cache = model.new_cache(prefix_len + max(ks), batch=B)
        for buf in (cache.k, cache.v):
            buf.normal_(generator=gen)
        cache.length = prefix_len
        row = []
        for k in ks:
            ids, pos, slots, mask = batch_inputs(prefix_len, B, k, model.config.vocab_size, model.device)
            row.append(timer(lambda: model(ids, pos, cache, mask, slots), reps))
            bar.update()
        table.append(row)
        del cache
        if on_gpu:
            torch.cuda.empty_cache()
    bar.close()
    return {"batch": list(batches), "k": list(ks), "time_s": table, "prefix_len": prefix_len,
            "timer": "CUDA graph replay, CUDA events, median" if on_gpu else "eager, perf_counter, min",
            "reps": reps}


def cost_curve_at(costs: dict, batch: int) -> dict:
    """The cost curve c(k) = t(B, k) / t(B, 1) at one measured batch size, in costmodel's format."""
    if batch not in costs["batch"]:
        raise ValueError(f"batch {batch} was not measured; measured: {costs['batch']}")
    times = costs["time_s"][costs["batch"].index(batch)]
    return {"k": costs["k"], "relative_time": [t / times[0] for t in times], "time_s": times}


def speedup_at(costs: dict, batch: int, a: float, g: int, draft_cost: float = 0.0) -> float:
    """Predicted speedup of chains of g at batch B: E(a, g) / (g * draft_cost + c_B(g + 1)).
    Example: a flat curve (c = 1), a = 0.8, g = 4 -> 3.36 at any B."""
    curve = cost_curve_at(costs, batch)
    if g + 1 > curve["k"][-1]:
        raise ValueError(f"g + 1 = {g + 1} is past the largest measured k ({curve['k'][-1]})")
    return expected_tokens_per_step(a, g) / (g * draft_cost + relative_cost(curve, g + 1))


def best_draft_len(costs: dict, batch: int, a: float, draft_cost: float = 0.0) -> tuple[int, float]:
    """(g, speedup) maximising speedup_at over the measured k (g = 0 means: do not speculate)."""
    best = (0, 1.0)
    for g in range(1, costs["k"][-1]):
        s = speedup_at(costs, batch, a, g, draft_cost)
        if s > best[1]:
            best = (g, s)
    return best


def tokens_per_s(costs: dict) -> list[list[float]]:
    """Tokens processed per second, B * k / t(B, k): flat once the forward is compute-bound."""
    return [[B * k / t for k, t in zip(costs["k"], row)] for B, row in zip(costs["batch"], costs["time_s"])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--shapes", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (float32 for tiny)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (with --shapes tiny and small sizes)")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if a.shapes == "tiny" else torch.bfloat16)
    t0 = time.time()
    model = random_model(SHAPES[a.shapes], seed=0, dtype=dtype, device=a.device).eval()
    label = f"Qwen2.5-{a.shapes.upper()} shapes, random weights (timing only)" if a.shapes != "tiny" else \
        "tiny random Qwen2 (timing only)"
    print(f"{label}: {count_parameters(model) / 1e9:.2f} B parameters, built in {time.time() - t0:.0f} s")
    costs = measure_batch_costs(model, [int(x) for x in a.batches.split(",")], [int(x) for x in a.ks.split(",")],
                                a.prefix, a.reps)
    kind = "gpu" if model.device.type == "cuda" else "cpu"
    costs.update(model=label, shapes=a.shapes, device=kind, machine=machine_name(a.device),
                 profile=f"{a.shapes} shapes, random weights (timing only)",
                 dtype=str(dtype).replace("torch.", ""), torch=torch.__version__, python=platform.python_version(),
                 date=time.strftime("%Y-%m-%d"), wall_s=time.time() - t0, parameters=count_parameters(model))
    path = Path(a.out) / f"batch_costs_{kind}_{a.shapes}.json"
    write_json(path, costs)
    print(f"t(B, k) in ms ({costs['machine']}, {costs['dtype']}, prefix {a.prefix}):")
    print("    B \\ k " + " ".join(f"{k:>8}" for k in costs["k"]))
    for B, row in zip(costs["batch"], costs["time_s"]):
        print(f"{B:>8} " + " ".join(f"{t * 1e3:8.2f}" for t in row))
    for B in costs["batch"]:
        g, s = best_draft_len(costs, B, 0.8)
        print(f"B = {B:>2}: c(g+1=5) = {relative_cost(cost_curve_at(costs, B), 5):.2f}; at a = 0.8 the best g is {g} "
              f"-> predicted speedup {s:.2f}")
    print(f"wrote {path} in {costs['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
