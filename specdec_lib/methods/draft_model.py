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

Greedy (T = 0): drafts are the draft's argmax and q = None (one-hot). Sampling: each token is drawn
from sampling.probs_from_logits(draft logits, ctx.params) with ctx.generator, and q holds those
rows, so the shared verifier can accept with min(1, p/q) and stay lossless.

Vocabularies may differ (Qwen2.5-7B pads to 152064 rows, the 0.5B has 151936): the draft never
proposes an id outside the smaller vocabulary, and q is padded (or cropped) to the target's width.
"""
from __future__ import annotations

import torch

from ..qwen2 import KVCache, Qwen2
from ..sampling import probs_from_logits, sample
from ..tree import Draft, chain_inputs


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix. [1, 2, 3], [1, 2, 4, 5] -> 2."""
    n = min(len(a), len(b))
    for i in range(n):
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
        self.fed_per_step: list[int] = []  # tokens fed to the draft per propose call (for the chapter)

    def reset(self, prompt_ids) -> None:
        self.cache, self.seen, self.fed_per_step = None, [], []

    def _ensure_capacity(self, n: int) -> None:
        """Grow the cache (copying what it holds) so that n slots fit."""
        if self.cache is not None and n <= self.cache.max_len:
            return
        new = self.draft.new_cache(max(2 * n, 256))
        if self.cache is not None and self.cache.length:
            L = self.cache.length
            new.k[:, :, :, :L] = self.cache.k[:, :, :, :L]
            new.v[:, :, :, :L] = self.cache.v[:, :, :, :L]
            new.length = L
        self.cache = new

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run the draft over ids after the cached ones; returns the logits of the last one [V_draft]."""
        cache, dev = self.cache, self.draft.device
        pos, slots, mask = chain_inputs(cache.length, len(ids), device=dev)
        # subtle: a target-only id (in the padding rows of a larger vocab) has no draft embedding;
        # the draft reads it as id 0. Its guesses get worse there, the output stays the target's.
        known = [t if t < self.draft.config.vocab_size else 0 for t in ids]
        logits, _ = self.draft(torch.tensor([known], device=dev), pos, cache, mask, slots)
        cache.length += len(ids)
        self.seen.extend(ids)
        return logits[0, -1]

    @torch.inference_mode()
    def propose(self, ctx) -> Draft:
        g = min(self.draft_len, ctx.max_draft)
        tokens = ctx.tokens
        if g < 1:
            return Draft.empty()
        self._ensure_capacity(len(tokens) + g)
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
            if ctx.params.greedy:
                x = int(logits[:self.vocab].argmax())
            else:
                q = fit_vocab(probs_from_logits(logits, ctx.params), self.vocab, self.target_vocab)
                x = int(sample(q.to(ctx.generator.device) if ctx.generator is not None else q, ctx.generator))
                q_rows.append(q)
            drafted.append(x)
            if i + 1 < g:    # the last draft token is proposed, not fed
                logits = self._feed([x])
        q = torch.stack(q_rows) if q_rows else None
        return Draft.chain(drafted, q)


def build(models=None, draft_len: int = 4, draft: Qwen2 | None = None, **options):
    """make_proposer("draft_model", models, draft_len=4); or pass draft= (and target_vocab=) directly."""
    if draft is None:
        if models is None:
            raise ValueError("draft_model needs models (from load_profile) or draft=<a Qwen2>")
        draft = models.draft
        options.setdefault("target_vocab", models.target.config.vocab_size)
    unknown = set(options) - {"target_vocab", "name"}
    if unknown:
        raise ValueError(f"unknown draft_model options {sorted(unknown)}: use draft_len, draft, target_vocab")
    return DraftModel(draft, draft_len, **options)


# ---------------------------------------------------------------- for the chapter: a g sweep
def sweep(models, prompt_sets: dict, draft_lens, max_new_tokens: int = 48, temperature: float = 0.0,
          seed: int = 0, progress: bool = True) -> dict:
    """Baseline once per prompt, then the draft model at every g, interleaved (same run, same prompts).

    prompt_sets: {"spec_bench:mt_bench": [Prompt, ...], ...}. Returns {'summaries', 'records'}
    with the fields of bench.run_benchmark (speedup against the baseline of the same category).
    Running the baseline once instead of once per g halves the cost of a sweep on a slow machine.
    """
    from tqdm.auto import tqdm
    from ..decoding import generate
    from ..metrics import check_summary, summarize
    from ..models import EOS_IDS
    from . import make_proposer

    base = make_proposer("baseline")
    first = next(iter(prompt_sets.values()))[0]
    generate(models.target, base, first.prompt_ids, 4, eos_ids=EOS_IDS)                 # warm-up
    generate(models.target, build(models, draft_len=2), first.prompt_ids, 4, eos_ids=EOS_IDS)
    summaries, records = [], []
    jobs = [(name, i, p) for name, ps in prompt_sets.items() for i, p in enumerate(ps)]
    recs = {}   # (prompt_set, g or None) -> [RequestRecord]
    outs = {}
    for name, i, p in tqdm(jobs, desc=f"draft_model sweep T={temperature}", disable=not progress):
        for g in [None, *draft_lens]:
            proposer = base if g is None else build(models, draft_len=g)
            out = generate(models.target, proposer, p.prompt_ids, max_new_tokens, temperature, seed=seed + i,
                           eos_ids=EOS_IDS, prompt_id=p.prompt_id)
            recs.setdefault((name, g), []).append(out.record)
            outs[(name, g, i)] = out.tokens
    for name, ps in prompt_sets.items():
        common = dict(models.provenance(), prompt_set=name, category=name.partition(":")[2] or "all",
                      temperature=float(temperature), max_new_tokens=max_new_tokens)
        b = summarize(recs[(name, None)], method="baseline", draft_len=None, **common)
        b.update(baseline_tokens_per_s=b["tokens_per_s"], speedup=1.0)
        summaries.append(b)
        for g in draft_lens:
            s = summarize(recs[(name, g)], method="draft_model", draft_len=g, **common)
            s.update(baseline_tokens_per_s=b["tokens_per_s"], speedup=s["tokens_per_s"] / b["tokens_per_s"])
            if temperature == 0:
                same = [outs[(name, g, i)] == outs[(name, None, i)] for i in range(len(ps))]
                s["greedy_match_rate"] = sum(same) / len(same)
            summaries.append(s)
        records += [r.to_dict() for key, rs in recs.items() if key[0] == name for r in rs]
    for s in summaries:
        check_summary(s)
    return {"summaries": summaries, "records": records}


# ---------------------------------------------------------------- for the chapter: is sampling lossless?
class PrefixLM:
    """Next-token logits of a model after `prompt + suffix`, for short suffixes, memoised.

    The prompt is prefilled once; each new suffix costs one forward over [prompt[-1]] + suffix
    from the rolled-back cache, and stores the rows of every prefix of the suffix.
    """
    def __init__(self, model: Qwen2, prompt: list[int], max_suffix: int = 8):
        self.model, self.prompt, self.rows = model, list(prompt), {}
        self.cache = model.new_cache(len(prompt) + max_suffix + 1)
        self.forwards = 0
        with torch.inference_mode():
            if len(prompt) > 1:
                pos, slots, mask = chain_inputs(0, len(prompt) - 1, device=model.device)
                model(torch.tensor([prompt[:-1]], device=model.device), pos, self.cache, mask, slots)
        self.cache.length = len(prompt) - 1

    @torch.inference_mode()
    def logits(self, suffix) -> torch.Tensor:
        suffix = tuple(suffix)
        if suffix not in self.rows:
            ids = [self.prompt[-1], *suffix]
            self.cache.rollback(len(self.prompt) - 1)
            pos, slots, mask = chain_inputs(self.cache.length, len(ids), device=self.model.device)
            out, _ = self.model(torch.tensor([ids], device=self.model.device), pos, self.cache, mask, slots)
            self.forwards += 1
            for j in range(len(ids)):
                self.rows.setdefault(suffix[:j], out[0, j].float().cpu())
        return self.rows[suffix]


def sample_first_tokens(target: PrefixLM, draft: PrefixLM | None, n_tokens: int, draft_len: int,
                        temperature: float, trials: int, seed: int = 0, top_p: float = 1.0) -> dict:
    """Counts of the first n_tokens over `trials` seeds: speculative (draft given) or plain sampling.

    The speculative path is the one generate() takes: draft_len tokens drawn from the draft's q,
    the target's rows for root + draft, the shared verifier, the emitted tokens appended. Only
    the forwards are memoised (both models see exactly the contexts they would see).
    """
    from ..sampling import SamplingParams
    from ..verify import verify
    params = SamplingParams(temperature, top_p)
    gen = torch.Generator().manual_seed(seed)
    vocab = min(target.model.config.vocab_size, draft.model.config.vocab_size) if draft else None
    counts, probs = {}, {}

    def dist(lm, ctx):   # the distribution a model samples from after ctx (memoised too)
        key = (id(lm), tuple(ctx))
        if key not in probs:
            p = probs_from_logits(lm.logits(ctx), params)
            probs[key] = p if lm is target else fit_vocab(p, vocab, target.model.config.vocab_size)
        return probs[key]

    for _ in range(trials):
        out = []
        while len(out) < n_tokens:
            if draft is None:
                out.append(int(sample(dist(target, out), gen)))
                continue
            chain, qs = [], []
            for _ in range(draft_len):
                q = dist(draft, out + chain)
                chain.append(int(sample(q, gen)))
                qs.append(q)
            target.logits(out + chain)    # one forward fills the rows of every prefix
            rows = torch.stack([target.logits(out + chain[:j]) for j in range(draft_len + 1)])
            out += verify(Draft.chain(chain, torch.stack(qs)), rows, params, gen).emitted
        key = tuple(out[:n_tokens])
        counts[key] = counts.get(key, 0) + 1
    return counts


def exact_first_tokens(target: PrefixLM, temperature: float, n_tokens: int = 2, min_prob: float = 1e-4,
                       top_p: float = 1.0) -> dict:
    """P(first n_tokens) under the target, for sequences whose every prefix has probability >= min_prob."""
    from ..sampling import SamplingParams
    params = SamplingParams(temperature, top_p)
    probs = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for seq, pr in probs.items():
            p = probs_from_logits(target.logits(seq), params)
            for x in torch.nonzero(p * pr >= min_prob).flatten().tolist():
                nxt[seq + (x,)] = pr * float(p[x])
        probs = nxt
    return probs


def goodness_of_fit(counts: dict, probs: dict, min_expected: float = 5.0) -> dict:
    """Chi-square test of observed counts against exact probabilities, plus total variation distance.

    Sequences with expected count < min_expected are pooled into one 'other' bin (with the mass
    below min_prob that exact_first_tokens left out), so the chi-square approximation holds.
    """
    from scipy.stats import chi2
    n = sum(counts.values())
    bins = [s for s, p in probs.items() if p * n >= min_expected]
    obs = [counts.get(s, 0) for s in bins]
    exp = [probs[s] * n for s in bins]
    obs.append(n - sum(obs))
    exp.append(n - sum(exp))
    if exp[-1] < 1e-9:                      # nothing left over: no 'other' bin
        obs, exp = obs[:-1], exp[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - probs.get(s, 0.0)) for s in set(counts) | set(probs))
    return {"chi2": stat, "dof": len(obs) - 1, "p_value": float(chi2.sf(stat, len(obs) - 1)), "tv": tv,
            "bins": len(obs), "trials": n}
