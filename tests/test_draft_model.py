"""The draft-model proposer: exact toy cases, greedy equality, the output distribution, vocab sizes."""

import pytest
import torch

from specdec_lib.decoding import generate
from specdec_lib.methods import make_proposer
from specdec_lib.methods.draft_model import DraftModel, common_prefix_len, fit_vocab
from specdec_lib.qwen2 import Qwen2Config, random_model
from specdec_lib.sampling import SamplingParams
from specdec_lib.experiments import goodness_of_fit
from tests.helpers import enumerate_outcomes, exact_distribution as exact_first, toy_config, tv

MAX_NEW = 16


@pytest.fixture(scope="module")
def baseline_out(tiny_target, tiny_prompts):
    base = make_proposer("baseline")
    return {tuple(p): generate(tiny_target, base, p, MAX_NEW).tokens for p in tiny_prompts}


class Recorder:
    """Wraps a proposer and keeps (context, draft) of every call."""
    def __init__(self, inner):
        self.inner, self.name, self.hidden_layers, self.calls = inner, inner.name, (), []

    def reset(self, prompt_ids):
        self.inner.reset(prompt_ids)

    def propose(self, ctx):
        d = self.inner.propose(ctx)
        self.calls.append((list(ctx.tokens), d.tokens.tolist()))
        return d


def test_helpers():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    out = fit_vocab(torch.tensor([.5, .3, .2]), 2, 4)
    assert torch.allclose(out, torch.tensor([.625, .375, 0, 0]))


def test_draft_equal_to_target_accepts_everything(tiny_target, tiny_prompts, baseline_out):
    g, p = 4, tiny_prompts[2]
    prop = DraftModel(tiny_target, draft_len=g)
    out = generate(tiny_target, prop, p, MAX_NEW)
    assert out.tokens == baseline_out[tuple(p)]
    assert out.record.acceptance_rate == 1.0
    assert out.record.steps == -(-MAX_NEW // (g + 1))
    # fed per step: the whole prompt + g - 1 drafts first; then last draft + bonus + g - 1 drafts
    assert prop.fed_per_step[0] == len(p) + g - 1
    assert all(n == g + 1 for n in prop.fed_per_step[1:-1])


@pytest.mark.parametrize("g", [1, 3, 6])
def test_greedy_equals_baseline(tiny_target, tiny_draft, tiny_prompts, baseline_out, g):
    for p in tiny_prompts:
        out = generate(tiny_target, DraftModel(tiny_draft, draft_len=g), p, MAX_NEW)
        assert out.tokens == baseline_out[tuple(p)], (g, len(p))


@pytest.mark.parametrize("g", [1, 3])
def test_rolled_back_cache_drafts_what_a_fresh_draft_would(g):
    """Every proposal equals the draft's own greedy continuation of the context, computed from scratch."""
    target, draft = random_model(toy_config(12), seed=3, std=0.4), random_model(toy_config(12), seed=4, std=0.4)
    rec = Recorder(DraftModel(draft, draft_len=g))
    out = generate(target, rec, [1, 2, 3, 4], 30)
    assert 0 < out.record.acceptance_rate < 1        # a real mix of accepted and rejected drafts
    base = make_proposer("baseline")
    for ctx, proposed in rec.calls:
        assert proposed == generate(draft, base, ctx, len(proposed)).tokens


def test_options_and_errors(tiny_target, tiny_draft):
    with pytest.raises(ValueError, match="draft_len"):
        DraftModel(tiny_draft, draft_len=0)
    with pytest.raises(ValueError, match="needs models"):
        make_proposer("draft_model", draft_len=2)
    with pytest.raises(ValueError, match="unknown"):
        make_proposer("draft_model", draft=tiny_draft, temperature=3)
    assert make_proposer("draft_model", draft=tiny_draft, draft_len=5).name == "draft_model(g=5)"


# ---------------------------------------------------------------- differing vocabularies
@pytest.mark.parametrize("v_target,v_draft", [(10, 7), (7, 10)])
def test_differing_vocab_sizes(v_target, v_draft):
    target = random_model(toy_config(v_target), seed=5, std=0.4)
    draft = random_model(toy_config(v_draft), seed=6, std=0.4)
    prop = DraftModel(draft, draft_len=3, target_vocab=v_target)
    ref = generate(target, make_proposer("baseline"), [1, 2, 3], 25).tokens
    assert generate(target, prop, [1, 2, 3], 25).tokens == ref
    rec = Recorder(prop)
    generate(target, rec, [1, 2, 3], 25, temperature=1.0, seed=1)
    assert all(t < min(v_target, v_draft) for _, d in rec.calls for t in d)
    # q rows have the target's width, zero outside the shared ids
    from specdec_lib.decoding import Context
    prop.reset([1, 2])
    d = prop.propose(Context([1, 2], 2, 3, SamplingParams(1.0), torch.Generator().manual_seed(0)))
    assert d.q.shape == (3, v_target)
    assert torch.allclose(d.q.sum(-1), torch.ones(3))
    assert float(d.q[:, min(v_target, v_draft):].sum()) == 0


# ---------------------------------------------------------------- sampling: the output distribution
SV, K, PROMPT, TRIALS = 4, 2, [1, 3], 800


def exact_distribution(target, params):
    """P(first K tokens) under the target alone, from its forwards (no sampling)."""
    return exact_first(target, params, PROMPT, K)


@pytest.fixture(scope="module")
def toy_pair():
    return random_model(toy_config(SV), seed=11, std=0.5), random_model(toy_config(SV), seed=12, std=0.5)


def test_sampling_output_matches_target_distribution(toy_pair):
    """generate() with the draft proposer: the first K tokens follow the target's distribution.
    (T < 1 and top-p change only probs_from_logits, shared with the verifier: test_verify covers them.)"""
    target, draft = toy_pair
    params, g = SamplingParams(0.8, 0.95), 2
    prop, trials, counts, accepted = DraftModel(draft, draft_len=g), TRIALS, {}, 0
    for seed in range(trials):
        out = generate(target, prop, PROMPT, K + 1, params.temperature, params.top_p, seed=seed)
        counts[tuple(out.tokens[:K])] = counts.get(tuple(out.tokens[:K]), 0) + 1
        accepted += out.record.accepted
    assert 0 < accepted < trials * K       # the draft really differs from the target
    p = goodness_of_fit(counts, exact_distribution(target, params))["p_value"]
    assert p > 1e-3, f"chi-square p = {p:.2e}"


def one_step_tv(target, draft, params, g=2, propose=None, prompt=(1, 2)):
    """TV between generate() with the draft model and the target alone over the first g + 1 tokens,
    by exact enumeration of every random draw (the draft's samples, the verifier's tests)."""
    def run():
        prop = DraftModel(draft, draft_len=g)
        if propose is not None:
            prop.propose = propose.__get__(prop)
        return tuple(generate(target, prop, list(prompt), g + 1, params.temperature, params.top_p).tokens)
    return tv(enumerate_outcomes(run), exact_first(target, params, list(prompt), g + 1))


@pytest.fixture(scope="module")
def small_pair():
    """Vocabulary 3: every branch of a 2-token draft step can be enumerated in about a second."""
    return random_model(toy_config(3), seed=21, std=0.5), random_model(toy_config(3), seed=22, std=0.5)


@pytest.mark.parametrize("params", [SamplingParams(0.8), SamplingParams(1.0, 0.9)], ids=["T=0.8", "T=1, top_p=0.9"])
def test_one_step_is_exactly_the_target_distribution(small_pair, params):
    """Exact: the draft's q is the distribution it sampled from, and the verifier corrects for it."""
    target, draft = small_pair
    assert one_step_tv(target, draft, params) < 1e-6


def test_seeded_bug_q_at_another_temperature_fails(small_pair):
    """Mutation check: a draft that samples at T = 0.8 but reports q at T = 1 must fail the exact test."""
    import inspect
    import textwrap
    import specdec_lib.methods.draft_model as module
    src = textwrap.dedent(inspect.getsource(DraftModel.propose))
    old = "q_rows.append(q)"
    assert old in src, "the mutation no longer applies: update the test"
    src = src.replace(old, "q_rows.append(fit_vocab(probs_from_logits(logits, type(ctx.params)(1.0)), "
                           "self.vocab, self.target_vocab))").replace("def propose(", "def _mutant(")
    exec(compile(src, "<mutant>", "exec"), module.__dict__)
    bad = module.__dict__.pop("_mutant")
    target, draft = small_pair
    assert one_step_tv(target, draft, SamplingParams(0.8), propose=bad) > 1e-3


def test_distribution_test_has_power(toy_pair):
    """Negative control: samples from the draft's own distribution must fail the same test."""
    target, draft = toy_pair
    draft_probs = exact_distribution(draft, SamplingParams(1.0))
    seqs = list(draft_probs)
    draws = torch.multinomial(torch.tensor([draft_probs[s] for s in seqs]), TRIALS, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    counts = {}
    for i in draws.tolist():
        counts[seqs[i]] = counts.get(seqs[i], 0) + 1
    assert goodness_of_fit(counts, exact_distribution(target, SamplingParams(1.0)))["p_value"] < 1e-6


# ---------------------------------------------------------------- the training path's measurements
def test_replay_acceptance_matches_generate():
    """Teacher-forced replay from one draft forward == the real greedy speculative loop, for every g."""
    from specdec_lib.methods.draft_model_train import Head, draft_guesses, greedy_batch, replay_acceptance, \
        trunk_features
    target, draft = random_model(toy_config(12), seed=3, std=0.4), random_model(toy_config(12), seed=4, std=0.4)
    prompt, n = [1, 2, 3, 4], 30
    ref = generate(target, make_proposer("baseline"), prompt, n).tokens
    assert greedy_batch(target, [prompt, prompt], n) == [ref, ref]
    head = Head(draft, n_frozen=1)
    guesses = draft_guesses(head, trunk_features(draft, [prompt + ref], 1), [len(prompt)])[0]
    for g in (1, 2, 3, 5):
        r = generate(target, DraftModel(draft, draft_len=g), prompt, n).record
        assert replay_acceptance(guesses, ref, g) == (r.proposed, r.accepted, r.steps), g
    assert replay_acceptance([5, 9, 7, 0], [5, 6, 7], 2) == (2, 1, 2)
    assert replay_acceptance([5, 6, 7, 0], [5, 6, 7, 8], 2) == (2, 2, 2)   # [5, 6] + bonus 7; then 8 alone
