"""Measured back-off (specdec_lib/backoff.py): any method drafts only while drafting is measured to be
faster than plain decoding. The choice on a scripted clock (exact), greedy output == baseline for every
method under a forced schedule of skipped steps, and a proposer that skipped steps drafts what it would
have drafted had it been called every step (its catch-up, hidden states included)."""
import pytest
import torch

from specdec_lib.backoff import MeasuredBackOff
from specdec_lib.decoding import Context, generate
from specdec_lib.methods import METHODS, check_options, make_proposer
from specdec_lib.models import load_profile
from specdec_lib.sampling import SamplingParams
from specdec_lib.tree import Draft


class Fixed:
    """An inner proposer that always drafts the same two tokens."""
    name, hidden_layers = "fixed", ()

    def reset(self, prompt_ids):
        pass

    def propose(self, ctx):
        return Draft.chain([7, 7])


def simulate(spec_cost, spec_tokens, steps, requests=1, **kw):
    """A scripted loop: a spec step takes spec_cost s and appends spec_tokens, a plain one 1 s and
    1 token. Returns the modes chosen, step by step, over `requests` requests of `steps` steps.
    spec_tokens may be a list, one per request (texts that differ)."""
    clock = [0.0]
    w = MeasuredBackOff(Fixed(), clock=lambda: clock[0], **kw)
    log = []
    if isinstance(spec_tokens, list) and requests != 1:
        raise ValueError("give either a list of spec_tokens (one per request) or requests")
    per_request = spec_tokens if isinstance(spec_tokens, list) else [spec_tokens] * requests
    for spec_tokens in per_request:
        tokens = [1, 2, 3]
        w.reset(tokens)
        for _ in range(steps):
            ctx = Context(list(tokens), 3, max_draft=8, params=SamplingParams(0.0), generator=None)
            spec = len(w.propose(ctx)) > 0
            clock[0] += spec_cost if spec else 1.0
            tokens += [5] * (spec_tokens if spec else 1)
        log += w.log
    return log, w


def probe_gaps(log, after, mode="spec"):
    at = [i for i, m in enumerate(log) if m == mode and i >= after]
    return [b - a for a, b in zip(at, at[1:])]


def test_plain_wins_when_a_step_costs_more_than_its_tokens():
    # spec: 3 s for 2 tokens (1.5 s a token) against plain 1 s a token
    log, w = simulate(3.0, 2, 100, warmup=2, probe_every=4, max_wait=64, overhead=0.5)
    # first call (untimed), two timed spec steps, two plain ones: then plain, with probes
    assert log[:5] == ["spec", "spec", "spec", "plain", "plain"]
    assert probe_gaps(log, 5)[:3] == [8, 16, 32]      # the wait doubles (4 -> 8 -> 16 -> 32)
    assert w.rate("plain") == pytest.approx(1.0) and w.rate("spec") == pytest.approx(1.5)


def test_the_wait_bounds_what_probes_cost():
    # a probe loses 3 - 2 = 1 s against 1 s plain steps: at 5% overhead, one probe per 20 steps
    log, w = simulate(3.0, 2, 200, warmup=1, probe_every=4, max_wait=64)
    assert probe_gaps(log, 3)[:3] == [20, 40, 64]
    # a dearer probe (a 16-node tree on a CPU: 10 s for 2 tokens) loses 8 s: 8 / 0.05 = 160 steps
    log, w = simulate(10.0, 2, 400, warmup=1, probe_every=4, max_wait=256)
    assert probe_gaps(log, 3)[:1] == [160]


def test_a_probe_on_the_first_call_of_a_request_takes_one_more_step():
    # requests of 12 steps; plain wins; the wait (20 steps) carries over from request to request
    log, w = simulate(3.0, 2, 12, requests=6, warmup=1, probe_every=4, max_wait=20)
    marks = "".join("s" if m == "spec" else "." for m in log)
    requests = [marks[i:i + 12] for i in range(12, len(marks), 12)]      # after the warm-up's
    # a probe is the request's first call to the proposer (untimed: it also catches up on the
    # prompt), so it goes on one more step, which is timed; on a request's last step it cannot
    assert requests == ["." * 12, "..ss" + "." * 8, "." * 11 + "s", "." * 12, "." * 7 + "ss..."]
    assert w.wait == 20 and w.timed["spec"] == 1 + 3   # the warm-up step, three timed probes


class CatchUp(Fixed):
    """Drafts like Fixed; its first call of a request costs `catch` s more (a draft model's prefill)."""

    def __init__(self, clock, catch):
        self.clock, self.catch, self.fresh = clock, catch, True

    def reset(self, prompt_ids):
        self.fresh = True

    def propose(self, ctx):
        if self.fresh:
            self.clock[0] += self.catch
            self.fresh = False
        return super().propose(ctx)


def test_a_probe_that_pays_a_catch_up_waits_longer():
    # plain wins (spec: 3 s for 2 tokens); probes are the proposer's first call of a request, so
    # each also pays the catch-up: what it costs goes into the wait (at 5% overhead, 1 s lost asks
    # for 20 steps of 1 s)
    waits = {}
    for catch in (0.0, 20.0):
        clock = [0.0]
        w = MeasuredBackOff(CatchUp(clock, catch), clock=lambda: clock[0], warmup=1, probe_every=4,
                            max_wait=1000)
        for _ in range(4):
            tokens = [1, 2, 3]
            w.reset(tokens)
            for _ in range(30):
                ctx = Context(list(tokens), 3, max_draft=8, params=SamplingParams(0.0), generator=None)
                spec = len(w.propose(ctx)) > 0
                clock[0] += 3.0 if spec else 1.0
                tokens += [5] * (2 if spec else 1)
        waits[catch] = w.need
    # one probe over two steps: 1 s lost in each, plus the catch-up in the first
    assert waits[0.0] == 40 and waits[20.0] == 440


def test_a_new_request_probes_again_soon():
    # texts alternate: spec (1.2 s a step) appends 1 token in one request (plain wins), 3 in the
    # next (spec wins). A probe loses 0.2 s here: what it costs asks for a wait of 4 steps, so each
    # request starts from max(probe_every, 4) = 8, not from the doubled wait of the last request
    log, w = simulate(1.2, [1, 3, 1, 3], 100, warmup=1, probe_every=8, max_wait=256)
    requests = [log[i:i + 100] for i in range(0, 400, 100)]
    for r, winner in zip(requests[1:], ["spec", "plain", "spec"]):
        assert r[20:].count(winner) >= 75, r          # the text's winner found in <= 20 steps
    # with the doubled wait carried over (64 or more by now), a request would keep the last one's mode:
    # a new request starts from what the last probe's cost asks for, at least probe_every
    w.reset([1, 2, 3])
    assert w.wait == max(8, w.need) < 64


def test_spec_wins_when_tokens_come_cheaper():
    # spec: 2 s for 4 tokens (0.5 s a token)
    log, w = simulate(2.0, 4, 60, warmup=2, probe_every=4, max_wait=16)
    assert log[:5] == ["spec", "spec", "spec", "plain", "plain"]
    assert log[5:9] == ["spec"] * 3 + ["plain"]       # the fourth step after the warm-up probes
    assert log.count("plain") <= 2 + 60 // 8


def test_a_probe_that_changes_the_winner_resets_the_wait():
    clock = [0.0]
    w = MeasuredBackOff(Fixed(), warmup=1, probe_every=2, max_wait=8, decay=0.5, clock=lambda: clock[0])
    tokens = [1, 2]
    w.reset(tokens)
    cost = {"spec": (3.0, 2), "plain": (1.0, 1)}       # plain wins at first ...
    for step in range(40):
        if step == 20:
            cost["spec"] = (1.0, 4)                     # ... until the text turns easy
        ctx = Context(list(tokens), 2, max_draft=8, params=SamplingParams(0.0), generator=None)
        mode = "spec" if len(w.propose(ctx)) else "plain"
        clock[0] += cost[mode][0]
        tokens += [5] * cost[mode][1]
    assert w.log[:20].count("spec") <= 3 + 3          # the first call, the warm-up, probes
    assert w.log[-10:].count("spec") >= 7 and w.best() == "spec"


def test_bad_settings_and_the_option():
    with pytest.raises(ValueError, match="probe_every"):
        MeasuredBackOff(Fixed(), probe_every=0)
    with pytest.raises(ValueError, match="decay"):
        MeasuredBackOff(Fixed(), decay=0.0)
    with pytest.raises(ValueError, match="overhead"):
        MeasuredBackOff(Fixed(), overhead=1.0)
    with pytest.raises(ValueError, match="unknown backoff"):
        make_proposer("ngram", backoff="sometimes")
    check_options("draft_model", {"draft_len": 3, "backoff": "measured"})      # the live bench's labels
    assert make_proposer("ngram", backoff="measured").name.endswith("+backoff")


# ---------------------------------------------------------------- every method, steps skipped
MAX_NEW = 24
OPTIONS = {"random": {"draft_len": 3}, "draft_model": {"draft_len": 3}, "ngram": {"draft_len": 3},
           "pard": {"draft_len": 3}, "medusa": {}, "eagle3": {}, "suffix": {}}
SCHEDULE = ["spec", "plain", "plain", "spec", "spec", "plain", "spec", "plain", "plain", "plain", "spec"]


def forced(proposer, schedule=SCHEDULE):
    """A MeasuredBackOff whose choice follows `schedule` (cycled), for exact tests."""
    w = MeasuredBackOff(proposer)
    modes = iter(schedule * 100)
    w.choose = lambda: (next(modes), None)
    return w


class Recorder:
    """Wraps a proposer and records (context length, drafted tokens) of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.name, self.hidden_layers = inner.name, inner.hidden_layers

    def reset(self, prompt_ids):
        self.inner.reset(prompt_ids)

    def propose(self, ctx):
        d = self.inner.propose(ctx)
        self.calls.append((len(ctx.tokens), d.tokens.tolist(), d.parents.tolist()))
        return d


@pytest.fixture(scope="module")
def setup():
    models = load_profile("tiny")
    prompts = [[11, 12, 13, 14] * 6, list(range(300, 340)) * 2]
    base = make_proposer("baseline")
    refs = {tuple(p): generate(models.target, base, p, MAX_NEW).tokens for p in prompts}
    return models, prompts, refs


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_greedy_output_equals_baseline_with_skipped_steps(setup, name):
    models, prompts, refs = setup
    assert name in METHODS
    w = forced(make_proposer(name, models, **OPTIONS[name]))
    for p in prompts:
        assert generate(models.target, w, p, MAX_NEW).tokens == refs[tuple(p)], name
        assert "plain" in w.log and "spec" in w.log


@pytest.mark.parametrize("name", ["draft_model", "pard", "medusa", "eagle3"])
def test_after_skipped_steps_the_draft_is_the_one_it_would_have_made(setup, name):
    """The proposer called every step and the one that skipped steps (caught up with the tokens and
    the target's hidden states it missed) draft the same at every context length both saw."""
    models, prompts, _ = setup
    torch.manual_seed(0)
    every = Recorder(make_proposer(name, models, **OPTIONS[name]))
    skipping = Recorder(make_proposer(name, models, **OPTIONS[name]))
    w = forced(skipping)
    for p in prompts:
        every.calls.clear(), skipping.calls.clear()
        generate(models.target, every, p, MAX_NEW)
        generate(models.target, w, p, MAX_NEW)
        seen = {n: (t, par) for n, t, par in every.calls}
        both = [(n, t, par) for n, t, par in skipping.calls if n in seen]
        assert len(both) >= 2, (name, [c[0] for c in every.calls], [c[0] for c in skipping.calls])
        for n, t, par in both:
            assert (t, par) == seen[n], (name, n)
