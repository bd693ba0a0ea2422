"""The autoregressive baseline: propose nothing, so every step is one ordinary decode step."""
from __future__ import annotations

from ..tree import Draft


class Baseline:
    name = "baseline"
    hidden_layers = ()

    def reset(self, prompt_ids):
        pass

    def propose(self, ctx):
        return Draft.empty()


OPTIONS = ()   # none


def build(models=None, **options):
    if options:
        raise ValueError(f"the baseline takes no options, got {sorted(options)}")
    return Baseline()
