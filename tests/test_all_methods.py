"""Every registered method, one test: greedy speculative output == greedy autoregressive output.

Methods are taken from the registry, so a new method is covered the day it is registered. The
prompts repeat themselves, so retrieval proposers (n-gram, suffix) actually propose and get
partly accepted, and EOS may fall inside a draft.
"""
import pytest

from specdec_lib.decoding import generate
from specdec_lib.methods import METHODS, make_proposer
from specdec_lib.models import load_profile

MAX_NEW = 20
OPTIONS = {"baseline": {}, "random": {"draft_len": 3}, "draft_model": {"draft_len": 3}, "ngram": {"draft_len": 3},
           "suffix": {}}


@pytest.fixture(scope="module")
def setup():
    models = load_profile("tiny")
    base = make_proposer("baseline")
    prompts = [[11, 12, 13, 14] * 6, list(range(300, 340)) * 2, [5]]
    refs = {tuple(p): generate(models.target, base, p, MAX_NEW).tokens for p in prompts}
    return models, prompts, refs


@pytest.mark.parametrize("name", sorted(METHODS))
def test_greedy_output_equals_baseline(setup, name):
    models, prompts, refs = setup
    options = {"continuations": refs, "draft_len": 4} if name == "oracle" else OPTIONS.get(name, {})
    try:
        proposer = make_proposer(name, models, **options)
    except ValueError as e:
        if "not written yet" in str(e):
            pytest.skip(str(e))
        raise
    for p in prompts:
        # the loop's EOS handling: declare the reference's 5th token an EOS in one run
        ref = refs[tuple(p)]
        assert generate(models.target, proposer, p, MAX_NEW).tokens == ref, name
        eos = ref[4]
        cut = ref[:ref.index(eos) + 1]
        assert generate(models.target, proposer, p, MAX_NEW, eos_ids=[eos]).tokens == cut, name


# ---------------------------------------------------------------- sampling: exactly the target's distribution
EXACT = {"ngram": {"draft_len": 2, "max_n": 2}, "suffix": {"min_token_prob": 0.0}, "random": {"draft_len": 2},
         "oracle": {"draft_len": 2}}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_sampling_is_exactly_the_target_distribution(name):
    """generate() at T = 0.9, top-p 0.95 with a proposer of fixed tokens (q = None): the first 3 tokens
    follow the target's distribution exactly (every random draw enumerated, tests/helpers.py)."""
    from specdec_lib.qwen2 import random_model
    from specdec_lib.sampling import SamplingParams
    from tests.helpers import enumerate_outcomes, exact_distribution, toy_config, tv
    target = random_model(toy_config(4), seed=31, std=0.5)
    prompt, params = [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(0.9, 0.95)
    extra = {"random": {"vocab_size": 4}, "oracle": {"continuations": {tuple(prompt): [3, 1, 2]}}}.get(name, {})
    proposed = []

    def run():
        prop = make_proposer(name, **EXACT[name], **extra)
        out = generate(target, prop, prompt, 3, params.temperature, params.top_p)
        proposed.append(out.record.proposed)
        return tuple(out.tokens)
    assert tv(enumerate_outcomes(run), exact_distribution(target, params, prompt, 3)) < 1e-6
    assert max(proposed) > 0, f"{name} never proposed: the test would not test the verifier"
