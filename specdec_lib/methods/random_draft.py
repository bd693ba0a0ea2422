"""A proposer of uniformly random tokens: acceptance near zero, a worst case for the loop."""
from __future__ import annotations

import torch

from ..tree import Draft


class RandomDraft:
    hidden_layers = ()

    def __init__(self, draft_len: int, vocab_size: int, seed: int = 0):
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        self.draft_len, self.vocab_size = draft_len, vocab_size
        self.generator = torch.Generator().manual_seed(seed)
        self.name = f"random(g={draft_len})"

    def reset(self, prompt_ids):
        pass

    def propose(self, ctx):
        g = min(self.draft_len, ctx.max_draft)
        return Draft.chain(torch.randint(self.vocab_size, (g,), generator=self.generator))


def build(models=None, draft_len: int = 4, vocab_size: int | None = None, seed: int = 0):
    vocab_size = vocab_size or (models.tokenizer.vocab_size if models is not None else 151936)
    return RandomDraft(draft_len, vocab_size, seed)
