"""Where a proposer's time per step goes, outside the benchmark harness.

python tools/profile_proposer.py "eagle3:total_tokens=15" "medusa:draft_len=15" [--tokens 64] [--profile small]

For each method: generate with the plain (eager) target on one Spec-Bench prompt, twice (the first run
warms up and, for EAGLE-3 on a GPU, captures its proposal graph), then report the median proposer and
verifier time per step, and a torch.profiler table of a short run (host and device time per op).
Written because EAGLE-3 took 11-44 ms per proposal in the H200 live run of 2026-11-29 while Medusa took
0.7 ms: this separates the proposer's own cost from the graph runner's.
"""
import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import pathlib as _pathlib  # noqa: E402
import sys as _sys  # noqa: E402
_sys.path.insert(0, str(_pathlib.Path(__file__).resolve().parents[1]))  # the repository root: runs without an install
from specdec_lib.bench import parse_options
from specdec_lib.data import spec_bench
from specdec_lib.decoding import generate
from specdec_lib.methods import make_proposer
from specdec_lib.models import EOS_IDS, load_profile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+", help='e.g. "eagle3:total_tokens=15" (method:key=value:...)')
    ap.add_argument("--profile", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=18, help="rows of each profiler table")
    ap.add_argument("--no-cudnn-sdpa", action="store_true",
                    help="leave cuDNN out of attention (it builds a graph per new shape on Hopper GPUs)")
    a = ap.parse_args()
    if a.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
        print("cuDNN attention off: SDPA picks flash / memory-efficient / math")
    models = load_profile(a.profile)
    on_gpu = models.target.device.type == "cuda"
    prompt = spec_bench(models.tokenizer, "mt_bench", limit=1)[0].prompt_ids
    print(models.provenance(), f"prompt {len(prompt)} tokens, {a.tokens} new tokens, eager target")
    for spec in a.methods:
        name, _, rest = spec.partition(":")
        opts = parse_options(rest.split(":")) if rest else {}
        prop = make_proposer(name, models, **opts)
        for _ in range(2):                                  # warm-up, then the measured run
            res = generate(models.target, prop, prompt, a.tokens, eos_ids=EOS_IDS)
        ms = lambda key: 1e3 * statistics.median(getattr(s, key) for s in res.steps)  # noqa: E731
        graph = getattr(prop, "graph", None)
        state = "-" if graph is None else ("failed" if graph.failed else
                                           "captured" if graph.graph is not None else "not captured")
        print(f"\n=== {spec}: {len(res.steps)} steps, tau {len(res.tokens) / len(res.steps):.2f}; median per step: "
              f"propose {ms('propose_s'):.2f} ms, verify {ms('verify_s'):.2f} ms; graph: {state}")
        if on_gpu and state == "captured":
            # the recorded proposal alone, replayed on the last step's inputs (it rewrites the same cache
            # slots with the same values): the device time of the graph, without the verify's tail
            from specdec_lib.timing import cuda_time
            print(f"    graph replay alone: {1e3 * cuda_time(graph.graph.replay, reps=50, warmup=5):.3f} ms")
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=acts) as prof:
            generate(models.target, prop, prompt, min(a.tokens, 16), eos_ids=EOS_IDS)
            if on_gpu:
                torch.cuda.synchronize()
        sort = "cuda_time_total" if on_gpu else "cpu_time_total"
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=a.rows, max_name_column_width=50))
        if on_gpu:
            print(prof.key_averages().table(sort_by=sort, row_limit=a.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
