"""Every method with and without the measured back-off (specdec_lib/backoff.py), against our baseline in
the same process, per Spec-Bench category (+ the grounded set): does the back-off make every method
at least break even on this machine, whatever its cost curve? (issue 12's CPU goal)

    python tools/backoff_cpu.py --profile small --per-category 1 --new-tokens 48 \
        --out chapters/results/03_ngram/cpu_measured_backoff.json
    python tools/backoff_cpu.py ... --sets spec_bench:mt_bench,spec_bench:rag,grounded \
        --out .../cpu_measured_backoff_long.json

Writes one summary per (prompt set, method) in the results schema (speedup against the baseline of
the same prompts and run; `greedy_match_rate`), plus `spec_share`: the fraction of steps the
back-off let the method draft, and the back-off's settings (`backoff_max_wait`, `backoff_overhead`,
`backoff_probe_every`: defaults change between versions). Progress on stderr (tqdm).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specdec_lib import experiments  # noqa: E402
from specdec_lib.bench_live import prompt_sets  # noqa: E402
from specdec_lib.metrics import write_json  # noqa: E402
from specdec_lib.methods import make_proposer  # noqa: E402
from specdec_lib.models import load_profile  # noqa: E402
from specdec_lib.notebook import provenance  # noqa: E402

METHODS = {"draft_model": {"draft_len": 3}, "ngram": {"draft_len": 4}, "pard": {"draft_len": 4},
           "medusa": {}, "eagle3": {}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="small")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sets", default="",
                    help="comma-separated prompt sets to run, in this order (default: all); the first "
                         "set of a process is where the back-off warms up")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    models = load_profile(a.profile)
    prov = provenance(models)
    # the live bench's sets: Spec-Bench's six categories, then the grounded prompts (as many)
    sets = prompt_sets(models.tokenizer, ["spec_bench", "grounded"], a.per_category, 0)
    sets["grounded"] = sets["grounded"][:a.per_category]
    if a.sets:
        unknown = [n for n in a.sets.split(",") if n not in sets]
        if unknown:
            raise SystemExit(f"unknown prompt set(s) {unknown}; known: {list(sets)}")
        sets = {n: sets[n] for n in a.sets.split(",")}
    # one proposer per arm for the whole run: the back-off's rates carry across requests
    arms, wrapped = [], {}
    for m in a.methods.split(","):
        opts = METHODS[m]
        arms.append(experiments.Arm(m, experiments.fixed(make_proposer(m, models, **opts)), dict(opts)))
        w = make_proposer(m, models, backoff="measured", **opts)
        wrapped[f"{m}+backoff"] = w
        arms.append(experiments.Arm(f"{m}+backoff", experiments.fixed(w), dict(opts)))
    rows = []
    for name, prompts in sets.items():
        spec_steps = {label: [0, 0] for label in wrapped}

        def count(i, p, outs):
            for label, w in wrapped.items():
                spec_steps[label][0] += w.log.count("spec")
                spec_steps[label][1] += len(w.log)

        runs = experiments.compare(models, arms, prompts, a.new_tokens, desc=name, on_prompt=count)
        for s in experiments.summaries_vs_baseline(models, runs, arms, name, 0.0, a.new_tokens):
            if s["method"] in spec_steps:
                n_spec, n = spec_steps[s["method"]]
                s["spec_share"] = n_spec / max(n, 1)
                w = wrapped[s["method"]]          # the settings that measured it (defaults change)
                s.update(backoff_max_wait=w.max_wait, backoff_overhead=w.overhead,
                         backoff_probe_every=w.probe_every)
            s.update(prov)
            rows.append(s)
            print(f"{name:<28}{s['method']:<20}{s['speedup']:>6.2f}x  tau {s['mean_accepted_len']:.2f}"
                  + (f"  drafted {s['spec_share']:.0%} of steps" if "spec_share" in s else ""), flush=True)
        write_json(Path(a.out), rows)


if __name__ == "__main__":
    main()
