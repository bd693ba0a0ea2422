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
