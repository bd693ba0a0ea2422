"""bf16 against float32 on this CPU: a prefill, a 1-token step and a k-token step of the real pair.

    python tools/cpu_dtype_costs.py [--prefix 256] [--out FILE.json]

The course runs the real models in bf16 on a CPU because a decode step reads half the bytes
(`models.default_dtype`). A prefill and a k-token verify step are compute-bound instead, and a
CPU without bf16 arithmetic (AVX2) may then do better in float32. This times, for each dtype, the
0.5B's prefill of `prefix` tokens (what a draft model's catch-up costs; best of 2), the 0.5B's
1-token step after that many, and the 1.5B's k-token steps (c(k) = t(k) / t(1); the median of 3,
`costmodel.measure_cost_curve`).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specdec_lib.costmodel import measure_cost_curve, measure_forward_time, measure_prefill_time  # noqa: E402
from specdec_lib.metrics import write_json  # noqa: E402
from specdec_lib.models import load_profile  # noqa: E402
from specdec_lib.notebook import provenance  # noqa: E402

KS = (1, 2, 4, 8, 16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="small")
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        models = load_profile(a.profile, "cpu", dtype=dtype)
        n = a.prefix
        curve = measure_cost_curve(models.target, KS, prefix_len=n, progress=False)
        t = dict(zip(KS, curve["time_s"]))
        row = dict(provenance(models), prefix=n, draft_prefill_s=measure_prefill_time(models.draft, n),
                   draft_step_s=measure_forward_time(models.draft, 1, n)[0],
                   target_step_s={str(k): v for k, v in t.items()})
        rows.append(row)
        print(f"{row['dtype']:<9} 0.5B prefill of {n} tokens {row['draft_prefill_s']:6.2f} s "
              f"({row['draft_prefill_s'] / n * 1e3:4.1f} ms a token); 0.5B step "
              f"{row['draft_step_s'] * 1e3:4.0f} ms; 1.5B t(1) {t[1] * 1e3:4.0f} ms, "
              + " ".join(f"c({k}) {t[k] / t[1]:.2f}" for k in KS[1:]), flush=True)
        del models
    if a.out:
        write_json(Path(a.out), rows)


if __name__ == "__main__":
    main()
