"""Back-off (cost_curve=...): n-gram and suffix send only the part of their draft that pays on the
machine's cost curve. The choice on exact toy numbers, the evidence update, greedy output ==
baseline, sampling == the target's distribution, and the option as the live benchmark parses it."""
import pytest

from specdec_lib import costmodel
from specdec_lib.costmodel import AcceptanceTally, best_prefix, choose_draft_len, cost_list
from specdec_lib.decoding import Context, generate
from specdec_lib.methods import check_options, make_proposer
from specdec_lib.methods.ngram import check_candidate
from specdec_lib.methods.suffix import check_tree, tree_gains
from specdec_lib.sampling import SamplingParams
from tests.test_ngram import PlusOne

LINEAR = [1, 2, 3, 4, 5, 6, 7, 8, 9]          # c(k) = k: an AVX2-only CPU, nothing can pay
FLAT = [1.0] * 17                             # c(k) = 1: every extra token is free


# ---------------------------------------------------------------- the choice itself
def test_choose_draft_len_exact_cases():
    assert choose_draft_len(0.3, 4, LINEAR) == 0          # 1.3 / 2 < 1: an ordinary step
    assert choose_draft_len(0.99, 4, LINEAR) == 0         # even near-certain tokens only break even
    assert choose_draft_len(1.0, 4, LINEAR) == 0          # exact ties go to the shorter draft
    assert choose_draft_len(0.9, 4, FLAT) == 4            # free tokens: the whole draft
    assert choose_draft_len(0.0, 4, FLAT) == 0            # ... unless none is ever accepted
    # a GPU-like curve: c(2..5) ~ 1.45-1.67. a = 0.3 pays nowhere, a = 0.8 pays for all 4
    gpu = [1.0, 1.45, 1.6, 1.62, 1.67]
    assert choose_draft_len(0.3, 4, gpu) == 0
    assert choose_draft_len(0.8, 4, gpu) == 4
    # this CPU's measured curve has c(2) < 1: one token is worth sending even if never accepted
    assert choose_draft_len(0.0, 4, [1.0, 0.86, 0.9, 0.94, 0.98]) == 1
    assert best_prefix([1, 1.5, 1.75], [1, 1.2, 1.3]) == 2   # the docstring's example


def test_cost_list_accepts_a_name_a_curve_or_a_list():
    curve = costmodel.load_cost_curve("h200_small_target")
    assert cost_list("h200_small_target", 3) == cost_list(curve, 3) == curve["relative_time"][:3]
    assert cost_list([1, 1.4, 1.5, 1.6], 3) == [1.0, 1.4, 1.5]
    for bad in ([1, 1.4], [0.2, 0.3, 0.4], "no_such_curve", 3, ["a", "b", "c"]):
        with pytest.raises(ValueError):
            cost_list(bad, 3)


def test_acceptance_tally():
    t = AcceptanceTally()
    assert t.estimate(3) == 0.5 and t.estimate(3, prior=0.8) == pytest.approx(0.8)
    t.add(3, accepted=3, tried=4)
    assert t.estimate(3) == pytest.approx(4 / 6)          # (3 + 0.5 * 2) / (4 + 2)
    assert t.estimate(1) == 0.5                            # other buckets untouched


def test_check_candidate_and_check_tree():
    assert check_candidate([7, 8, 9], [7, 5]) == (1, 2)
    assert check_candidate([7, 8, 9], [7, 8, 9, 4]) == (3, 3)
    assert check_candidate([7, 8, 9], [7]) == (1, 1)      # an empty draft: only the first token tried
    assert check_candidate([7, 8, 9], [4]) == (0, 1)
    # grow_tree's example tree: a (0.8) -> b (0.6); d (0.2). a=1, b=2, d=4
    tree = ([1, 2, 4], [-1, 0, -1], [0.8, 0.6, 0.2])
    assert check_tree(*tree, [1, 3]) == (1, pytest.approx(1.75))
    assert check_tree(*tree, [1, 2, 5]) == (2, pytest.approx(1.75))
    assert check_tree(*tree, [4, 2]) == (1, pytest.approx(1.0))      # d has no children: stop
    assert check_tree([5, 6, 7], [-1, 0, 1], [1.0, 1.0, 1.0], [5, 6, 0]) == check_candidate([5, 6, 7], [5, 6, 0])
    assert tree_gains(*tree[1:], a=0.5) == pytest.approx([1, 1.4, 1.55, 1.65])


# ---------------------------------------------------------------- n-gram: choice and evidence, by hand
def ctx(tokens, prompt_len):
    return Context(tokens, prompt_len, 64, SamplingParams(0.0), None)


def test_ngram_backs_off_on_a_steep_curve_and_still_learns():
    # prompt 0..5 then 0, 1, 2: the lookup's candidate is [3, 4, 5, 0] (match length 3)
    tokens = [0, 1, 2, 3, 4, 5, 0, 1, 2]
    p = make_proposer("ngram", draft_len=4, max_n=3, cost_curve=LINEAR)
    p.reset(tokens)
    assert p.propose(ctx(tokens, 9)).tokens.tolist() == []          # nothing pays on c(k) = k
    assert p.last == dict(match_len=3, a=pytest.approx(0.8), candidate=4, draft_len=0)
    tokens.append(3)                            # the target wrote 3: the unsent candidate was right
    p.propose(ctx(tokens, 9))
    assert p.tally.counts == {3: [1, 1]}


def test_ngram_sends_everything_on_a_flat_curve_and_learns_from_the_step():
    tokens = [0, 1, 2, 3, 4, 5, 0, 1, 2]
    p = make_proposer("ngram", draft_len=4, max_n=3, cost_curve=FLAT[:5])
    p.reset(tokens)
    assert p.propose(ctx(tokens, 9)).tokens.tolist() == [3, 4, 5, 0]
    tokens += [3, 4, 5, 6]                      # 3 accepted, bonus 6 (PlusOne's continuation)
    assert p.propose(ctx(tokens, 9)).tokens.tolist() == []           # 6 never seen: no match
    assert p.tally.counts == {3: [3, 4]}
    assert p.tally.estimate(3, 0.8) == pytest.approx((3 + 1.6) / 6)


def test_ngram_through_the_decode_loop_exact_steps():
    prompt = [0, 1, 2, 3, 4, 5, 0, 1, 2]
    out = generate(PlusOne(), make_proposer("ngram", draft_len=4, max_n=3, cost_curve=LINEAR), prompt, 6)
    assert out.tokens == [3, 4, 5, 6, 7, 8] and all(s.proposed == 0 for s in out.steps)
    out = generate(PlusOne(), make_proposer("ngram", draft_len=4, max_n=3, cost_curve=FLAT[:5]), prompt, 6)
    assert out.tokens == [3, 4, 5, 6, 7, 8]
    assert [(s.proposed, s.accepted, s.emitted) for s in out.steps][0] == (4, 3, 4)


def test_ngram_evidence_lowers_the_draft_length():
    # "1 2 3" recurs, but each time the target writes a new token after it (20, 21, ...): every
    # miss lowers the 3-gram tally, a = (0 + 0.8 * 2) / (misses + 2), 0.8 -> 0.53 -> 0.4 -> 0.32,
    # and on a GPU-like curve the proposer sends 4, then 3, then nothing (unsent drafts still learn)
    gpu = [1.0, 1.5, 1.6, 1.7, 1.8]
    p = make_proposer("ngram", draft_len=4, max_n=3, cost_curve=gpu)
    tokens = [1, 2, 3, 9, 1, 2, 3]
    p.reset(tokens)
    sent = []
    for miss in range(20, 24):
        sent.append(len(p.propose(ctx(tokens, 7))))
        tokens.append(miss)                     # the bonus token: the first drafted one was wrong
        assert len(p.propose(ctx(tokens, 7))) == 0                  # a new token: no match
        tokens += [1, 2, 3]                     # ordinary steps back to the recurring 3-gram
    assert sent == [4, 3, 0, 0] and p.tally.counts == {3: [0, 4]}


# ---------------------------------------------------------------- suffix: choice and evidence
def test_suffix_backs_off_on_a_steep_curve_and_sends_the_tree_on_a_flat_one():
    prompt = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3]   # "1 2 3" was followed by 4 and by 5: a tree
    opts = dict(draft_len=8, max_spec_factor=3.0, min_token_prob=0.0)
    p = make_proposer("suffix", cost_curve=LINEAR, **opts)
    p.reset(prompt)
    assert len(p.propose(ctx(prompt, len(prompt)))) == 0 and p.last == {}
    whole = make_proposer("suffix", **opts)
    whole.reset(prompt)
    flat = make_proposer("suffix", cost_curve=FLAT, **opts)
    flat.reset(prompt)
    d, ref = flat.propose(ctx(prompt, len(prompt))), whole.propose(ctx(prompt, len(prompt)))
    assert d.tokens.tolist() == ref.tokens.tolist() and d.parents.tolist() == ref.parents.tolist()
    assert not d.is_chain() and flat.last["key"] == ("request", 2)   # match length 3: bucket 2-3


def test_suffix_learns_from_the_tokens_written():
    prompt = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3]
    p = make_proposer("suffix", cost_curve=LINEAR, draft_len=8, max_spec_factor=3.0, min_token_prob=0.0)
    p.reset(prompt)
    p.propose(ctx(prompt, len(prompt)))         # sent nothing; the tree had 4 and 5 below the root
    p.propose(ctx(prompt + [5], len(prompt)))   # the target wrote 5: one level tried, accepted
    (key, (accepted, tried)), = p.tally.counts.items()
    assert key == ("request", 2) and accepted == 1 and tried == pytest.approx(1.0)


# ---------------------------------------------------------------- lossless, whatever is sent
CURVES = ["cpu_small_target", "h200_small_target", [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]]


@pytest.mark.parametrize("curve", CURVES + [LINEAR])
def test_greedy_equals_baseline_on_tiny_target(tiny_target, tiny_prompts, curve):
    base = make_proposer("baseline")
    prompts = [p + p[:5] for p in tiny_prompts[1:]]
    prompts += [tiny_prompts[2] + generate(tiny_target, base, tiny_prompts[2], 10).tokens + tiny_prompts[2][-4:]]
    ngram = make_proposer("ngram", draft_len=4, max_n=3, cost_curve=curve)
    suffix = make_proposer("suffix", draft_len=8, max_spec_factor=3.0, min_token_prob=0.0, cost_curve=curve)
    proposed = 0
    for prompt in prompts:
        ref = generate(tiny_target, base, prompt, 16).tokens
        for prop in (ngram, suffix):
            out = generate(tiny_target, prop, prompt, 16)
            assert out.tokens == ref, prop.name
            proposed += out.record.proposed
        suffix.observe(ref)
    assert (proposed == 0) == (curve is LINEAR)


@pytest.mark.parametrize("name", ["ngram", "suffix"])
def test_sampling_is_exactly_the_target_distribution(name):
    """T = 0.9, top-p 0.95: the first 3 tokens follow the target's distribution exactly (every random
    draw enumerated), with drafts whose length depends on earlier outcomes."""
    from specdec_lib.qwen2 import random_model
    from tests.helpers import enumerate_outcomes, exact_distribution, toy_config, tv
    target = random_model(toy_config(4), seed=31, std=0.5)
    prompt, params = [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(0.9, 0.95)
    options = {"ngram": dict(draft_len=2, max_n=2), "suffix": dict(draft_len=2, min_token_prob=0.0)}[name]
    proposed = []

    def run():
        prop = make_proposer(name, cost_curve=[1.0, 1.0, 1.0], **options)
        out = generate(target, prop, prompt, 3, params.temperature, params.top_p)
        proposed.append(out.record.proposed)
        return tuple(out.tokens)
    assert tv(enumerate_outcomes(run), exact_distribution(target, params, prompt, 3)) < 1e-6
    assert max(proposed) > 0


# ---------------------------------------------------------------- the option, as the live benchmark parses it
def test_live_benchmark_option_syntax():
    from specdec_lib.bench_live import parse_methods
    methods = parse_methods("ngram:draft_len=4:max_n=3:cost_curve=h200_small_target,"
                            "suffix:cost_curve=cpu_small_target")
    for label, name, options in methods:
        check_options(name, options)
        prop = make_proposer(name, **options)
        assert prop.costs == cost_list(options["cost_curve"], prop.draft_len + 1)
        assert "backoff=" in prop.name


@pytest.mark.parametrize("name,bad", [("ngram", dict(cost_curve=[1, 1.2], draft_len=4)),
                                      ("ngram", dict(cost_curve="no_such_curve")),
                                      ("ngram", dict(cost_curve=FLAT, adaptive=True)),
                                      ("ngram", dict(cost_curve=FLAT, lookup="scan")),
                                      ("suffix", dict(cost_curve=[1, 1.2], draft_len=16))])
def test_bad_cost_curves(name, bad):
    with pytest.raises(ValueError):
        make_proposer(name, **bad)


def test_default_is_unchanged():
    """No cost_curve: the same drafts as before back-off existed (the whole candidate)."""
    tokens = [0, 1, 2, 3, 4, 5, 0, 1, 2]
    p = make_proposer("ngram", draft_len=4, max_n=3)
    p.reset(tokens)
    assert p.costs is None and p.propose(ctx(tokens, 9)).tokens.tolist() == [3, 4, 5, 0]
    assert make_proposer("suffix").costs is None and make_proposer("suffix").name == "suffix"
