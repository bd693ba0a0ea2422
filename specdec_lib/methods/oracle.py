"""The oracle: it already knows the target's greedy continuation and proposes it.

Its measured speedup at draft length g is the ceiling for any proposer at that g (every draft is
accepted), and its gap to the cost model's prediction is the loop's own overhead. With
`error_rate` > 0 some draft tokens are replaced by random ones, and with `branches` > 1 each
node gets random siblings, giving trees with partial acceptance: the tests use both.
"""
from __future__ import annotations

import random

import torch

from ..tree import Draft


class Oracle:
    hidden_layers = ()

    def __init__(self, continuations: dict, draft_len: int, error_rate: float = 0.0, branches: int = 1,
                 vocab_size: int = 151936, seed: int = 0):
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        self.continuations = {tuple(k): list(v) for k, v in continuations.items()}  # prompt ids -> greedy output
        self.draft_len, self.error_rate, self.branches = draft_len, error_rate, branches
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.name = f"oracle(g={draft_len})" if error_rate == 0 and branches == 1 else "noisy_oracle"
        self.reference: list[int] = []

    def reset(self, prompt_ids):
        key = tuple(prompt_ids)
        if key not in self.continuations:
            raise KeyError("the oracle has no reference continuation for this prompt")
        self.reference = self.continuations[key]

    def propose(self, ctx):
        done = len(ctx.tokens) - ctx.prompt_len
        chain = self.reference[done:done + min(self.draft_len, ctx.max_draft)]
        chain = [t if self.rng.random() >= self.error_rate else self.rng.randrange(self.vocab_size) for t in chain]
        if self.branches == 1:
            return Draft.chain(chain)
        # Tree: the chain, plus (branches - 1) random leaf siblings at every depth. The siblings come
        # first at odd depths, so verification must look past a rejected sibling to find the right one.
        tokens, parents, prev = [], [], -1
        for depth, t in enumerate(chain):
            noise = [self.rng.randrange(self.vocab_size) for _ in range(self.branches - 1)]
            order = noise + [t] if depth % 2 else [t] + noise
            for tok in order:
                tokens.append(tok)
                parents.append(prev)
            prev = len(tokens) - len(order) + order.index(t)
        return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


OPTIONS = ("error_rate", "branches", "vocab_size", "seed")   # passed on to Oracle


def build(models=None, continuations=None, draft_len: int = 4, **options):
    if continuations is None:
        raise ValueError("the oracle needs continuations={prompt ids: target greedy output}")
    if models is not None:
        options.setdefault("vocab_size", models.tokenizer.vocab_size)
    return Oracle(continuations, draft_len, **options)
