"""Held-out accuracy of the committed Medusa heads, split by the temperature the target's answers were
sampled at (0 = its greedy answers, what greedy decoding is verified against).

    python tools/medusa_by_temperature.py [--batches 6] [--profile small]     (~2.5 min on the course CPU)

Planning evidence for training on a subset of the answers (`python -m specdec_lib.train medusa
--temperatures 0`): if the heads already fit the greedy answers better than the sampled ones, the held-out
accuracy of the training log (all temperatures) understates what greedy decoding sees.
"""
import argparse
import pathlib as _pathlib
import sys as _sys
import time

import torch

_sys.path.insert(0, str(_pathlib.Path(__file__).resolve().parents[1]))  # the repository root: runs without an install
from specdec_lib.checkpoint import checkpoint_path  # noqa: E402
from specdec_lib.methods import medusa  # noqa: E402
from specdec_lib.models import load_profile  # noqa: E402
from specdec_lib.selfdistill import load_data  # noqa: E402
from specdec_lib.train import TrainConfig, evaluate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6, help="held-out batches of 4 answers per temperature")
    ap.add_argument("--profile", default="small")
    a = ap.parse_args(argv)
    models = load_profile(a.profile)
    data = load_data(models)
    learner = medusa.learner(models)
    learner.module, _ = medusa.load_heads(models, checkpoint_path("medusa", a.profile))
    cfg = TrainConfig(steps=1, batch_size=4, max_len=384, eval_every=1, eval_batches=a.batches)
    print(f"{models.provenance()}; heads {checkpoint_path('medusa', a.profile).name}")
    for t in sorted({round(float(s.temperature), 3) for s in data.sequences}):
        held = data.only([t]).split("heldout")
        t0 = time.time()
        with torch.no_grad():
            m = evaluate(learner, models.target, held, cfg)
        print(f"T = {t}: {len(held)} held-out answers, {sum(m['n']) / len(m['n']):.0f} tokens per head; "
              f"top-1 per head {[round(x, 3) for x in m['acc']]}, top-5 {[round(x, 3) for x in m['top5']]} "
              f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
