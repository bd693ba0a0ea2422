"""Time PARD's tree step alone on a GPU, three ways (prediction 28 in notes/gpu_performance.md):

- host:     top-k on the GPU, one copy to the host, sparse_tree there (ParallelDraft.tree, the default),
            then step_inputs on the host;
- recorded: pard.TreeGraph, the same step from the logits to the verify inputs as one CUDA graph;
- compiled: the same graph, its function through torch.compile first (compile_tree=True).

No model is needed: the drafter's k rows of logits are random (Qwen2.5's vocabulary), so the trees are
as wide as a real step's. Each way is timed as the host sees it (wall time until the verify inputs are
ready where the forward takes them) and, for the graphs, as the GPU sees it (CUDA events around the
replay). Writes a JSON list to --out.

    python tools/tree_step_bench.py --out /tmp/tree_step.json
"""
import argparse
import json
import time
from types import SimpleNamespace

import torch

from specdec_lib.methods import pard
from specdec_lib.sampling import SamplingParams
from specdec_lib.tree import step_inputs

SHAPES = ((4, 4, 7), (6, 8, 7), (6, 8, 15))       # (k, width, nodes)
VOCAB, KV_LEN, L, REPS = 151665, 2048, 900, 200


def host_step(logits, width, nodes):
    # ParallelDraft.tree as a proposer runs it (only its tree settings are read), then what generate builds
    settings = SimpleNamespace(tree_width=width, device_tree=False)
    draft = pard.ParallelDraft.tree(settings, logits, nodes, SamplingParams(0.0))
    return step_inputs(L, draft.parents, KV_LEN, "cpu")


def wall(fn, sync=True):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(REPS):
        fn()
        if sync:
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / REPS


def gpu_time(graph):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(REPS):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / REPS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for k, width, nodes in SHAPES:
        logits = torch.randn(k, VOCAB, device=dev, dtype=torch.bfloat16) * 4
        row = dict(draft_len=k, tree_width=width, tree_nodes=nodes, machine=torch.cuda.get_device_name(),
                   torch=torch.__version__)
        row["host_wall_s"] = wall(lambda: host_step(logits, width, nodes))
        for how, compiled in (("recorded", False), ("compiled", True)):
            step = pard.TreeGraph(k, VOCAB, width, nodes, KV_LEN, logits, compiled=compiled)
            t0 = time.perf_counter()
            step(logits, L, 7)                        # records (and compiles) the step
            torch.cuda.synchronize()
            row[f"{how}_setup_s"] = time.perf_counter() - t0
            row[f"{how}_wall_s"] = wall(lambda: step(logits, L, 7))
            row[f"{how}_gpu_s"] = gpu_time(step.graph)
        ref = pard.TreeGraph(k, VOCAB, width, nodes, KV_LEN, logits)(logits, L, 7)
        got = step(logits, L, 7)
        row["compiled_equals_recorded"] = bool(torch.equal(ref.tokens, got.tokens)
                                               and all(torch.equal(a, b) for a, b in zip(ref.inputs, got.inputs)))
        print({k_: (f"{v * 1e3:.3f} ms" if k_.endswith("_s") and isinstance(v, float) else v)
               for k_, v in row.items()}, flush=True)
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
