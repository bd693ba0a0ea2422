"""What a probe of a draft model costs the measured back-off on this machine (specdec_lib/backoff.py).

    python tools/catchup_cost.py [--profile small] [--out FILE.json]

After plain steps, a probe of a draft model (or PARD) is the proposer's first call on this text: the
0.5B first catches up on the whole context (one prefill), then drafts. The back-off counts that
catch-up in what the probe cost and waits `cost / step / overhead` steps before the next one, at
most `max_wait`. This times, for the first prompt of three sets (short, long, grounded), the 0.5B's
prefill of as many tokens as the prompt (best of 3) and one 1-token step of the target after
that many (`costmodel.measure_forward_time`), and prints the wait
the 5% rule asks for against the wrapper's max_wait: where the cap is shorter, probes cost more
than `overhead` of the time.
"""
import argparse
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specdec_lib.backoff import MeasuredBackOff  # noqa: E402
from specdec_lib.bench_live import prompt_sets  # noqa: E402
from specdec_lib.costmodel import measure_forward_time, measure_prefill_time  # noqa: E402
from specdec_lib.metrics import write_json  # noqa: E402
from specdec_lib.models import load_profile  # noqa: E402
from specdec_lib.notebook import provenance  # noqa: E402

SETS = ("spec_bench:mt_bench", "spec_bench:rag", "grounded")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="small")
    ap.add_argument("--out")
    a = ap.parse_args()
    models = load_profile(a.profile)
    sets = prompt_sets(models.tokenizer, ["spec_bench", "grounded"], 1, 0)
    params = inspect.signature(MeasuredBackOff).parameters
    overhead, max_wait = params["overhead"].default, params["max_wait"].default
    rows = []
    for name in SETS:
        ids = sets[name][0].prompt_ids
        c = measure_prefill_time(models.draft, len(ids), repeats=3)
        s = measure_forward_time(models.target, 1, len(ids))[0]
        need = c / s / overhead
        rows.append(dict(provenance(models), prompt_set=name, prompt_tokens=len(ids), catch_up_s=c,
                         step_s=s, steps_worth=c / s, wait_asked=need, max_wait=max_wait,
                         probe_share_at_cap=c / (c + max_wait * s)))
        print(f"{name:<22}{len(ids):>5} prompt tokens: the 0.5B's catch-up {c:6.2f} s = {c / s:5.0f} "
              f"target steps of {s * 1e3:.0f} ms; at {overhead:.0%} overhead the rule asks for "
              f"{need:,.0f} steps between probes, capped at {max_wait}: a probe then costs "
              f"{rows[-1]['probe_share_at_cap']:.0%} of the time", flush=True)
    if a.out:
        write_json(Path(a.out), rows)


if __name__ == "__main__":
    main()
