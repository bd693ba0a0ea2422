"""`python -m specdec_lib.bench`: a method against our autoregressive baseline, in the same process.

A thin command line over experiments.run_benchmark: for each prompt the baseline runs, then the
method (interleaved, so drift in machine speed hits both alike), after one warm-up generation.
Optionally transformers' `generate` runs on the same weights and prompts (greedy, or sampling at
the same temperature): what a reader would otherwise use. Output: per-request records (JSONL)
and one summary per method (JSON, the fields of metrics.SUMMARY_FIELDS plus provenance).

  python -m specdec_lib.bench --method baseline --profile small --prompts spec_bench:summarization --limit 3

Every argument is checked before any model is loaded.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .data import load_prompt_set
from .experiments import run_benchmark, time_transformers, to_transformers  # noqa: F401 (bench_gpu.py imports the last two from here)
from .methods import METHODS, check_options
from .metrics import write_json, write_jsonl
from .models import PROFILES, load_profile


def parse_options(pairs: list[str]) -> dict:
    """["max_n=3", "policy=frequent"] -> {"max_n": 3, "policy": "frequent"} (values parsed as JSON when possible)."""
    options = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"--option {kv!r}: write KEY=VALUE, e.g. --option max_n=3")
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    return options


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="baseline", help=f"one of: {', '.join(sorted(METHODS))}")
    ap.add_argument("--profile", default=None, help=f"{' | '.join(PROFILES)} (default: $SPECDEC_PROFILE)")
    ap.add_argument("--prompts", default="spec_bench:summarization")
    ap.add_argument("--limit", type=int, default=3, help="number of prompts (>= 1)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-len", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra proposer option, e.g. --option max_n=3 (value parsed as JSON when possible)")
    ap.add_argument("--no-transformers", action="store_true", help="skip timing transformers' generate")
    ap.add_argument("--out", default=None, help="folder for summary.json and records.jsonl")
    a = ap.parse_args(argv)

    # Check everything cheap first: loading the small pair takes minutes on a CPU.
    if a.method not in METHODS:
        ap.error(f"unknown --method {a.method!r}: choose one of {', '.join(sorted(METHODS))}")
    if a.profile is not None and a.profile not in PROFILES:
        ap.error(f"unknown --profile {a.profile!r}: choose one of {', '.join(PROFILES)}")
    if a.limit < 1:
        ap.error(f"--limit must be >= 1 (the number of prompts), got {a.limit}")
    if a.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        ap.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {a.temperature}")
    try:
        options = parse_options(a.option)
        if a.draft_len is not None:
            if a.draft_len < 1:
                raise ValueError(f"--draft-len must be >= 1, got {a.draft_len}")
            options["draft_len"] = a.draft_len
        check_options(a.method, options)
    except ValueError as e:
        ap.error(str(e))
    dtype = getattr(torch, a.dtype) if a.dtype else None
    models = load_profile(a.profile, a.device, dtype)
    prompts = load_prompt_set(a.prompts, models.tokenizer, a.limit)
    if not prompts:
        raise ValueError(f"prompt set {a.prompts!r} is empty: choose another --prompts")
    result = run_benchmark(models, a.method, a.prompts, prompts, a.max_new_tokens, a.temperature, options,
                           transformers_generate=not a.no_transformers)
    print(f"\n{models.provenance()}")
    print(f"{'method':<14}{'tok/s':>9}{'speedup':>9}{'accept':>8}{'tau':>6}")
    for s in result["summaries"]:
        print(f"{s['method']:<14}{s['tokens_per_s']:>9.2f}{s['speedup']:>9.2f}{s['acceptance_rate']:>8.2f}"
              f"{s['mean_accepted_len']:>6.2f}")
        if "transformers_tokens_per_s" in s:
            print(f"{'transformers':<14}{s['transformers_tokens_per_s']:>9.2f}{s['transformers_speedup']:>9.2f}"
                  + ("   (generate, same weights, sampling at the same temperature)" if a.temperature > 0 else
                     f"   (generate, same weights; greedy outputs equal ours: "
                     f"{s.get('transformers_match_rate', float('nan')):.0%})"))
    if a.out:
        write_json(Path(a.out) / "summary.json", result["summaries"])
        write_jsonl(Path(a.out) / "records.jsonl", result["records"])
    return result


if __name__ == "__main__":
    main()
