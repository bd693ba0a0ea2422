"""A smaller model of the same family drafts g tokens; the target verifies them in one forward.

(Leviathan et al., 2023; Chen et al., 2023.) Each step the draft runs g times, one token at a
time, from the accepted context; the target checks all g in one forward (decoding.generate).

The draft keeps its own KV cache between steps. After a verification, the context it sees next
is `tokens` = everything accepted so far + the bonus (the root). What it has already fed is
`seen` = old context + its first g - 1 drafts (the last draft token is proposed, never fed).
So each step:
  1. roll the cache back to the common prefix of `seen` and `tokens` (rolling back = moving a length)
  2. feed what is missing in ONE forward: the bonus alone if a draft was rejected; the last draft
     token and the bonus when all g were accepted (no wasted one-token step); the whole prompt at
     the first step
  3. draft g - 1 more tokens, one forward each.

Greedy (T = 0): drafts are the draft's argmax and q = None (one-hot); each argmax is fed back where
it was made (on a GPU, without the host reading it), and the chain goes to the verifier from there.
Sampling: each token is drawn
from sampling.probs_from_logits(draft logits, ctx.params) with ctx.generator, and q holds those
rows, so the shared verifier can accept with min(1, p/q) and stay lossless.

Vocabularies may differ (Qwen2.5-7B pads to 152064 rows, the 0.5B has 151936): the draft never
proposes an id outside the smaller vocabulary, and q is padded (or cropped) to the target's width.
"""
from __future__ import annotations

import torch

from ..decoding import prefill
from ..qwen2 import KVCache, Qwen2
from ..sampling import probs_from_logits, sample
from ..tree import Draft


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix. [1, 2, 3], [1, 2, 4, 5] -> 2."""
    n = min(len(a), len(b))
    # a proposer's lists agree up to their last few entries: compare all but those at C speed (a
    # slice comparison), then walk the tail (a Python loop over a 1,000-token prompt every step is
    # ~30 us of host time that the GPU waits for)
    start = max(n - 32, 0)
    if a[:start] != b[:start]:
        start = 0
    for i in range(start, n):
        if a[i] != b[i]:
            return i
    return n


def fit_vocab(probs: torch.Tensor, vocab: int, width: int) -> torch.Tensor:
    """[..., Vd] draft probabilities -> [..., width], zero outside the first `vocab` ids, renormalised.

    vocab = ids both models share (min of the two sizes); width = the target's vocab size.
    Example: probs [.5, .3, .2], vocab 2, width 4 -> [.625, .375, 0, 0].
    """
    probs = probs[..., :vocab]
    probs = probs / probs.sum(-1, keepdim=True)
    if width > vocab:
        probs = torch.nn.functional.pad(probs, (0, width - vocab))
    return probs


class DraftModel:
    """Proposer: a chain of g tokens from a small Qwen2 with its own, rolled-back KV cache."""
    hidden_layers = ()

    def __init__(self, draft: Qwen2, draft_len: int = 4, target_vocab: int | None = None,
                 name: str | None = None):
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        self.draft, self.draft_len = draft, draft_len
        self.target_vocab = target_vocab or draft.config.vocab_size
        self.vocab = min(self.target_vocab, draft.config.vocab_size)   # ids the draft may propose
        self.name = name or f"draft_model(g={draft_len})"
        self.cache: KVCache | None = None
        self.seen: list[int] = []        # tokens whose keys/values fill cache slots [0, len(seen))
        self.unread: torch.Tensor | None = None   # fed after `seen`, still on the device (greedy drafts)
        self.fed_per_step: list[int] = []  # tokens fed to the draft per propose call (for the chapter)

    def reset(self, prompt_ids) -> None:
        self.cache, self.seen, self.unread, self.fed_per_step = None, [], None, []

    def _settle(self) -> None:
        """Move the drafted tokens fed on the device into `seen`: one small copy, made at the next
        proposal, when the verify step has been read back and the GPU has nothing queued."""
        if self.unread is not None:
            self.seen.extend(self.unread.tolist())
            self.unread = None

    def _ensure_capacity(self, n: int) -> None:
        """Grow the cache (copying what it holds) so that n slots fit."""
        if self.cache is not None and n <= self.cache.max_len:
            return
        new = self.draft.new_cache(max(2 * n, 256))
        if self.cache is not None and self.cache.length:
            L = self.cache.length
            new.k[:, :, :, :L] = self.cache.k[:, :, :, :L]
            new.v[:, :, :, :L] = self.cache.v[:, :, :, :L]
            new.keep(0, list(range(L)))              # slots 0..L-1 hold accepted tokens (nothing moves)
        self.cache = new

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run the draft over ids after the cached ones; returns the logits of the last one [V_draft]."""
        # subtle: a target-only id (in the padding rows of a larger vocab) has no draft embedding;
        # the draft reads it as id 0. Its guesses get worse there, the output stays the target's.
        known = [t if t < self.draft.config.vocab_size else 0 for t in ids]
        logits, _ = prefill(self.draft, torch.tensor([known], device=self.draft.device), self.cache)
        self.seen.extend(ids)
        return logits[0, -1]

    def _feed_drafted(self, x: torch.Tensor) -> torch.Tensor:
        """Feed a drafted token x [1] where it was made (the GPU): no read-back between draft steps,
        so the host queues all g forwards (and the verify) without waiting. Returns logits [V_draft]."""
        logits, _ = prefill(self.draft, x.view(1, 1), self.cache)
        self.unread = x if self.unread is None else torch.cat([self.unread, x])
        return logits[0, -1]

    @torch.inference_mode()
    def propose(self, ctx) -> Draft:
        g = min(self.draft_len, ctx.max_draft)
        tokens = ctx.tokens
        if g < 1:
            return Draft.empty()
        self._ensure_capacity(len(tokens) + g)
        self._settle()
        # 1. keep the cached prefix that still agrees with the context (at least the root is re-fed)
        keep = min(common_prefix_len(self.seen, tokens), len(tokens) - 1)
        self.cache.rollback(keep)
        del self.seen[keep:]
        # 2. catch up in one forward, 3. then one forward per further draft token
        missing = tokens[keep:]
        self.fed_per_step.append(len(missing) + g - 1)
        logits = self._feed(missing)
        drafted, q_rows = [], []
        for i in range(g):
            if ctx.params.greedy:    # the argmax stays where the logits are: fed back, never read
                x = logits[:self.vocab].argmax().view(1)
            else:
                q = fit_vocab(probs_from_logits(logits, ctx.params), self.vocab, self.target_vocab)
                x = int(sample(q.to(ctx.generator.device) if ctx.generator is not None else q, ctx.generator))
                q_rows.append(q)
            drafted.append(x)
            if i + 1 < g:    # the last draft token is proposed, not fed
                logits = self._feed_drafted(x) if ctx.params.greedy else self._feed([x])
        q = torch.stack(q_rows) if q_rows else None
        # greedy: the chain stays where the draft ran (the GPU), for the verify to take from there
        return Draft.chain(torch.cat(drafted) if ctx.params.greedy else drafted, q)


OPTIONS = ("target_vocab", "name")   # passed on to DraftModel


def build(models=None, draft_len: int = 4, draft: Qwen2 | None = None, **options):
    """make_proposer("draft_model", models, draft_len=4); or pass draft= (a Qwen2, or a GraphDraft standing in
    for one) with models, or with target_vocab= alone."""
    if draft is None:
        if models is None:
            raise ValueError("draft_model needs models (from load_profile) or draft=<a Qwen2>")
        draft = models.draft
    if models is not None:       # also with draft= (e.g. experiments.fast_model(models.draft, ...))
        options.setdefault("target_vocab", models.target.config.vocab_size)
    unknown = set(options) - {"target_vocab", "name"}
    if unknown:
        raise ValueError(f"unknown draft_model options {sorted(unknown)}: use draft_len, draft, target_vocab")
    return DraftModel(draft, draft_len, **options)
