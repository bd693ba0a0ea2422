"""Experiments: every method against our autoregressive baseline, sweeps, replays and statistics.

Method files (specdec_lib/methods/) hold only their proposer; everything that *measures* a
proposer lives here, so every chapter measures the same way:

- `compare`: THE harness. For each prompt the baseline runs, then every method, in the same
  process and with the same seed (interleaved, so drift in machine speed hits all arms alike),
  after one warm-up generation. `run_benchmark` (one method, the CLI of bench.py), `sweep` (one
  method over several draft lengths) and `run_workload` (a server-like request sequence where a
  proposer learns from earlier outputs) are thin wrappers around it. Each takes `run=`, the fast
  path of `fast_path` (CUDA graphs on a GPU; nothing on a CPU), built once and passed to every call.
- `replay_summary`: exact greedy replay of a request sequence (no model; replay.py), with the
  speedup a measured cost curve predicts.
- `to_transformers` / `time_transformers`: the same weights in transformers, for the reference
  timings a reader would otherwise use.
- Is sampling lossless? `PrefixLM`, `sample_first_tokens`, `exact_first_tokens` and the one
  chi-square helper, `goodness_of_fit`.

Every summary has the fields of metrics.SUMMARY_FIELDS plus provenance (machine, model, dtype,
profile); speedup = method tokens/s / baseline tokens/s measured in the same run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .decoding import generate, prefill
from .methods import make_proposer
from .methods.draft_model import fit_vocab
from .metrics import check_summary, summarize
from .models import EOS_IDS
from .sampling import SamplingParams, probs_from_logits, sample
from .tree import Draft
from .verify import verify


# ---------------------------------------------------------------- transformers, for reference timings
def to_transformers(model, copy: bool = False, attn_implementation: str | None = None):
    """transformers' Qwen2ForCausalLM with our weights: shared (no copy) for side-by-side timing, or
    copied (copy=True; the tests use attn_implementation="eager" as the exact reference)."""
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM
    c = model.config
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    cfg = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                   num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                   num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                   tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings,
                   **extra)
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()} if copy else model.state_dict()
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if unexpected or not set(missing) <= {"lm_head.weight"}:
        raise ValueError(f"weights do not map onto transformers' Qwen2: missing {missing}, unexpected {unexpected}")
    # buffers are not in the state_dict: rebuild the rotary embedding's inv_freq off the meta device
    with torch.device(model.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    if c.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(model.dtype).eval()


@torch.inference_mode()
def time_transformers(hf_model, prompt_ids, max_new_tokens, assistant=None, temperature: float = 0.0,
                      seed: int = 0, **kw) -> tuple[list[int], float]:
    """transformers' `generate` (optionally assisted, or with prompt lookup via kw); returns tokens, seconds.

    temperature 0: greedy. temperature > 0: plain sampling at that temperature (seeded), so a
    sampled run of ours is timed against sampling in transformers too.
    """
    device = next(hf_model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    sampling = dict(do_sample=True, temperature=float(temperature), top_p=1.0, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    if temperature > 0:
        torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            eos_token_id=list(EOS_IDS), pad_token_id=EOS_IDS[0],
                            assistant_model=assistant, **sampling, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out[0, len(prompt_ids):].tolist(), time.perf_counter() - t0


# ---------------------------------------------------------------- the comparison harness
@dataclass
class Arm:
    """One method in a comparison.

    make(prompt, baseline_tokens) -> the proposer for this prompt: most arms return one proposer
    built up front (so it can learn across requests), the oracle builds one per prompt from the
    baseline's own output. `fields` go into the arm's summary (draft_len and other knobs).
    """
    label: str                                   # the summary's "method"
    make: Callable
    fields: dict = field(default_factory=dict)


def fixed(proposer) -> Callable:
    """An Arm.make that returns the same proposer for every prompt."""
    return lambda prompt, baseline_tokens: proposer


def fast_path(models, max_len: int, hidden_layers=(), model=None) -> dict:
    """generate()'s keyword arguments for the target's fast path, to build ONCE per chapter and pass to
    compare / run_benchmark / sweep / run_workload as `run=`: on a GPU, a captured GraphRunner
    (CUDA graphs, fused kernels; ~1-2 minutes to capture) with its own cache of max_len slots,
    returning the hidden layers a learned proposer reads; on a CPU, {} (the plain forward, nothing to
    capture). max_len must hold the longest prompt + new tokens + the largest bucket (64).
    model: another model's fast path (e.g. models.draft, to time its cost curve as it runs on a GPU)."""
    model = models.target if model is None else model
    if model.device.type != "cuda":
        return {}
    from .cuda_graphs import fast_forward
    forward, cache, kv_len = fast_forward(model, max_len, hidden_layers)
    return dict(forward=forward, cache=cache, kv_len=kv_len)


def fast_model(model, max_len: int, graphs: bool | None = None):
    """The model to hand a proposer that runs one of its own (draft_model's `draft=`, pard's `drafter=`):
    on a GPU its forward replayed from CUDA graphs (a GraphDraft over a captured GraphRunner, with the
    catch-up buckets for the prompt), as the live benchmark runs it; on a CPU the model itself. Why: an
    eager 0.5B on a GPU is launch-bound (~15 ms a step on an H100, whatever k), so it would time the
    launches, not the drafter. max_len: the longest prompt + new tokens + 72. graphs=True builds the
    runner on a CPU too (its eager CPU mode: what the tests check)."""
    if not (model.device.type == "cuda" if graphs is None else graphs):
        return model
    from .cuda_graphs import GraphDraft, draft_runner
    return GraphDraft(draft_runner(model, max_len))


def compare(models, arms: list[Arm], prompts, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
            desc: str = "", progress: bool = True, on_prompt: Callable | None = None, repeats: int = 1,
            run: dict | None = None) -> dict:
    """For each prompt: the baseline, then every arm, all with seed + prompt index.

    A proposer with `observe` learns each request's output after it (suffix decoding's global
    cache warms over the sequence). on_prompt(i, prompt, outputs) is called after each prompt with
    outputs = {label: GenerationResult} (baseline included), e.g. to time transformers in between.
    repeats > 1: every run is made that many times (same seed, so the same tokens) and the fastest
    kept, as `timeit` does: a busy machine only ever slows a run down, so the minimum is the
    least disturbed measurement. run: generate()'s fast-path arguments from `fast_path` (every
    arm and the baseline alike), None for the plain forward.
    Returns {label: [GenerationResult per prompt]}, the baseline under "baseline".
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    run = run or {}
    base = make_proposer("baseline")
    generate(models.target, base, prompts[0].prompt_ids, 4, eos_ids=EOS_IDS, **run)   # warm-up: allocation, kernels
    runs = {"baseline": [], **{a.label: [] for a in arms}}

    def fastest(make_prop, p, i):
        tries = []
        for _ in range(repeats):
            prop = make_prop()
            tries.append((generate(models.target, prop, p.prompt_ids, max_new_tokens, temperature,
                                   seed=seed + i, eos_ids=EOS_IDS, prompt_id=p.prompt_id, **run), prop))
        return min(tries, key=lambda t: t[0].record.wall_s)

    for i, p in enumerate(tqdm(prompts, desc=desc or "vs baseline", disable=not progress)):
        b, _ = fastest(lambda: base, p, i)
        outs = {"baseline": b}
        for arm in arms:
            # subtle: a proposer that learns across requests (observe) sees each request once, after
            # the repeats, so every repeat starts from the same cross-request state
            out, prop = fastest(lambda arm=arm: arm.make(p, b.tokens), p, i)
            if hasattr(prop, "observe"):
                prop.observe(out.tokens)
            outs[arm.label] = out
        for label, out in outs.items():
            runs[label].append(out)
        if on_prompt is not None:
            on_prompt(i, p, outs)
    return runs


def summaries_vs_baseline(models, runs: dict, arms: list[Arm], prompt_set: str, temperature: float,
                          max_new_tokens: int, category: str | None = None) -> list[dict]:
    """One summary per arm (baseline first): speedup against the baseline of the same run, and
    under greedy decoding `greedy_match_rate`, the fraction of prompts whose output equals the
    baseline's token for token (1.0 in float32; in bf16 a k-token forward rounds differently from
    k one-token forwards, so rare divergence is possible: it is measured, never hidden)."""
    common = dict(models.provenance(), prompt_set=prompt_set,
                  category=category or prompt_set.partition(":")[2] or "all",
                  temperature=float(temperature), max_new_tokens=max_new_tokens)
    base = summarize([o.record for o in runs["baseline"]], method="baseline", draft_len=None, **common)
    base_tps = base["tokens_per_s"]
    base.update(baseline_tokens_per_s=base_tps, speedup=1.0)
    out = [base]
    for arm in arms:
        fields = dict(arm.fields)
        s = summarize([o.record for o in runs[arm.label]], method=arm.label,
                      draft_len=fields.pop("draft_len", None), **common, **fields)
        s.update(baseline_tokens_per_s=base_tps, speedup=s["tokens_per_s"] / base_tps if base_tps else None)
        if temperature == 0:
            same = [o.tokens == b.tokens for o, b in zip(runs[arm.label], runs["baseline"])]
            s["greedy_match_rate"] = sum(same) / len(same)
        out.append(s)
    for s in out:
        check_summary(s)
    return out


def records(runs: dict) -> list[dict]:
    """Per-request records of every arm, baseline first."""
    return [o.record.to_dict() for outs in runs.values() for o in outs]


def method_arm(models, method: str, options: dict | None = None) -> Arm:
    """make_proposer(method, models, **options) as an arm; the oracle gets the baseline's output per prompt."""
    options = dict(options or {})
    fields = {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))}
    if method == "oracle":
        def make(prompt, baseline_tokens):
            return make_proposer("oracle", models, continuations={tuple(prompt.prompt_ids): baseline_tokens},
                                 **options)
        return Arm(method, make, fields)
    return Arm(method, fixed(make_proposer(method, models, **options)), fields)


def run_benchmark(models, method: str, prompt_set: str, prompts, max_new_tokens: int = 64,
                  temperature: float = 0.0, options: dict | None = None, transformers_generate: bool = False,
                  seed: int = 0, progress: bool = True, run: dict | None = None) -> dict:
    """Baseline and `method` on the same prompts; returns {'summaries': [...], 'records': [...]}.

    With transformers_generate, transformers' `generate` on the same weights and prompts is timed
    too (greedy at temperature 0, sampling at the same temperature otherwise), and the baseline's
    summary gets transformers_tokens_per_s / transformers_speedup (and, greedy with method
    "baseline", transformers_match_rate).
    """
    if not prompts:
        raise ValueError("no prompts: give at least one (check --limit and the prompt set)")
    arms = [] if method == "baseline" else [method_arm(models, method, options)]
    hf = to_transformers(models.target) if transformers_generate else None
    hf_runs = []

    def time_hf(i, prompt, outs):
        toks, secs = time_transformers(hf, prompt.prompt_ids, max_new_tokens, temperature=temperature, seed=seed + i)
        hf_runs.append((toks, secs, toks == outs["baseline"].tokens))

    runs = compare(models, arms, prompts, max_new_tokens, temperature, seed, desc=f"{method} vs baseline",
                   progress=progress, on_prompt=time_hf if hf is not None else None, run=run)
    summaries = summaries_vs_baseline(models, runs, arms, prompt_set, temperature, max_new_tokens)
    if hf is not None:
        base = summaries[0]
        tps = sum(len(t) for t, _, _ in hf_runs) / sum(s for _, s, _ in hf_runs)
        base.update(transformers_tokens_per_s=tps, transformers_speedup=tps / base["tokens_per_s"],
                    transformers_sampling=temperature > 0)
        if method == "baseline" and temperature == 0:
            base["transformers_match_rate"] = sum(m for _, _, m in hf_runs) / len(hf_runs)
    return {"summaries": summaries, "records": records(runs)}


def sweep(models, prompt_sets: dict, draft_lens, max_new_tokens: int = 48, temperature: float = 0.0,
          seed: int = 0, progress: bool = True, method: str = "draft_model", options: dict | None = None,
          run: dict | None = None) -> dict:
    """The baseline once per prompt, then `method` at every draft length, interleaved (same run, same prompts).

    prompt_sets: {"spec_bench:mt_bench": [Prompt, ...], ...}. Returns {'summaries', 'records'}
    with the fields of run_benchmark (speedup against the baseline of the same prompt set).
    Running the baseline once instead of once per g halves the cost of a sweep on a slow machine.
    """
    options = dict(options or {})
    first = next(iter(prompt_sets.values()))[0]
    generate(models.target, make_proposer(method, models, draft_len=2, **options), first.prompt_ids, 4,
             eos_ids=EOS_IDS, **(run or {}))                                   # warm-up of the method
    summaries, recs = [], []
    for name, prompts in prompt_sets.items():
        arms = [Arm(f"{method}@{g}", lambda p, b, g=g: make_proposer(method, models, draft_len=g, **options),
                    dict(draft_len=g)) for g in draft_lens]
        runs = compare(models, arms, prompts, max_new_tokens, temperature, seed,
                       desc=f"{method} sweep T={temperature} {name}", progress=progress, run=run)
        rows = summaries_vs_baseline(models, runs, arms, name, temperature, max_new_tokens)
        for s in rows[1:]:
            s["method"] = method
        summaries += rows
        recs += records(runs)
    return {"summaries": summaries, "records": recs}


def run_workload(models, proposers: dict, prompts, max_new_tokens: int, prompt_set: str, category: str,
                 progress: bool = True, run: dict | None = None) -> dict:
    """Requests in order, as a server would see them; for each: the baseline, then every proposer.

    proposers: {label: proposer}. A proposer with `observe` learns its own output after each
    request (so a suffix proposer's global cache warms across the sequence). Greedy, bf16 or not.
    Returns {'summaries': one per label (baseline first, metrics.SUMMARY_FIELDS + provenance),
    'per_request': one row per (request, label), 'outputs': the baseline's tokens per prompt}.
    """
    knobs = ("draft_len", "max_spec_factor", "min_token_prob", "cache_size", "max_n")
    arms = [Arm(label, fixed(prop), {k: getattr(prop, k) for k in knobs if hasattr(prop, k)})
            for label, prop in proposers.items()]
    for a in arms:
        a.fields.setdefault("draft_len", None)
    runs = compare(models, arms, prompts, max_new_tokens, 0.0, desc=category, progress=progress, run=run)
    rows = []
    for i, b in enumerate(runs["baseline"]):
        for label in proposers:
            out = runs[label][i]
            r = out.record
            rows.append(dict(request=i, method=label, category=category, acceptance_rate=r.acceptance_rate,
                             mean_accepted_len=r.mean_accepted_len,
                             speedup=b.record.wall_s / r.wall_s if r.wall_s else None,
                             greedy_match=out.tokens == b.tokens))
    summaries = summaries_vs_baseline(models, runs, arms, prompt_set, 0.0, max_new_tokens, category=category)
    return dict(summaries=summaries, per_request=rows, outputs=[b.tokens for b in runs["baseline"]])


# ---------------------------------------------------------------- exact greedy replay of a request sequence
def replay_summary(proposer, prompts, references, curve: dict, learn: bool = True, eos_ids=(), **fields) -> dict:
    """Exact greedy replay (replay.py, no model) of a request sequence: acceptance, tau, and the
    speedup that `costmodel.replay_speedup` predicts from the steps with a measured cost curve.
    learn: a proposer with `observe` learns each reference after its request, as in run_workload."""
    from .costmodel import replay_speedup
    from .replay import replay_greedy

    steps = []                                   # (proposed, accepted, emitted) per step, all requests
    for p, ref in zip(prompts, references):
        steps += replay_greedy(proposer, p.prompt_ids, ref, eos_ids)
        if learn and hasattr(proposer, "observe"):
            proposer.observe(ref)
    proposed, accepted, emitted = (sum(s[i] for s in steps) for i in range(3))
    out = dict(n_prompts=len(prompts), steps=len(steps), new_tokens=emitted,
               acceptance_rate=accepted / proposed if proposed else 0.0,
               mean_accepted_len=emitted / len(steps) if steps else 0.0,
               speedup=replay_speedup([(p + 1, e) for p, _, e in steps], curve), tokens_per_s=0.0,
               baseline_tokens_per_s=None, temperature=0.0, draft_len=getattr(proposer, "draft_len", None))
    out.update(fields)
    return out


# ---------------------------------------------------------------- is sampling lossless? (chapter 2)
class PrefixLM:
    """Next-token logits of a model after `prompt + suffix`, for short suffixes, memoised.

    The prompt is prefilled once; each new suffix costs one forward over [prompt[-1]] + suffix
    from the rolled-back cache, and stores the rows of every prefix of the suffix.
    """
    def __init__(self, model, prompt: list[int], max_suffix: int = 8):
        self.model, self.prompt, self.rows = model, list(prompt), {}
        self.cache = model.new_cache(len(prompt) + max_suffix + 1)
        self.forwards = 0
        with torch.inference_mode():
            prefill(model, torch.tensor([prompt[:-1]], device=model.device), self.cache, logits=False)

    @torch.inference_mode()
    def logits(self, suffix) -> torch.Tensor:
        suffix = tuple(suffix)
        if suffix not in self.rows:
            ids = [self.prompt[-1], *suffix]
            self.cache.rollback(len(self.prompt) - 1)
            out, _ = prefill(self.model, torch.tensor([ids], device=self.model.device), self.cache)
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

    counts: {outcome: times seen}; probs: {outcome: exact probability} (may leave out rare
    outcomes). Outcomes with expected count < min_expected are pooled into one 'other' bin (with
    the mass `probs` leaves out), so the chi-square approximation holds. An outcome seen although
    its probability is zero (nothing left for 'other') gives p_value 0.
    """
    from scipy.stats import chi2
    n = sum(counts.values())
    if n == 0:
        raise ValueError("no samples: counts is empty")
    bins = [s for s, p in probs.items() if p * n >= min_expected]
    obs = [counts.get(s, 0) for s in bins]
    exp = [probs[s] * n for s in bins]
    obs.append(n - sum(obs))
    exp.append(n - sum(exp))
    impossible = exp[-1] < 1e-9 and obs[-1] > 0
    if exp[-1] < 1e-9:                      # nothing left over: no 'other' bin
        obs, exp = obs[:-1], exp[:-1]
    stat = float("inf") if impossible else sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = max(len(obs) - 1, 1)
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - probs.get(s, 0.0)) for s in set(counts) | set(probs))
    return {"chi2": stat, "dof": len(obs) - 1, "p_value": float(chi2.sf(stat, dof)), "tv": tv,
            "bins": len(obs), "trials": n}
