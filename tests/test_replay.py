"""The model-free greedy replay takes exactly the steps the real loop takes."""
import pytest

from specdec_lib.decoding import generate
from specdec_lib.methods import make_proposer
from specdec_lib.models import load_profile
from specdec_lib.replay import replay_greedy
from specdec_lib.tree import Draft


class Fixed:
    """Always proposes the same chain."""
    name, hidden_layers = "fixed", ()

    def __init__(self, tokens):
        self.tokens = tokens

    def reset(self, prompt_ids):
        pass

    def propose(self, ctx):
        return Draft.chain(self.tokens)


def test_hand_made_step():
    # reference [7, 9, ...]; draft [7, 8]: 7 accepted, bonus 9 -> (2, 1, 2)
    assert replay_greedy(Fixed([7, 8]), [1, 2], [7, 9, 7, 8, 5])[0] == (2, 1, 2)


def test_eos_inside_a_draft():
    # the draft [7, 8, 5] is fully right, but 8 is EOS: emit 7, 8 and stop
    assert replay_greedy(Fixed([7, 8, 5]), [1], [7, 8, 5, 6], eos_ids=[8]) == [(3, 2, 2)]


@pytest.mark.parametrize("name,options", [("ngram", {"draft_len": 3}), ("suffix", {}),
                                          ("random", {"draft_len": 2})])
def test_replay_equals_generate(name, options):
    models = load_profile("tiny")
    prompt = [11, 12, 13, 14] * 6
    out = generate(models.target, make_proposer("baseline"), prompt, 24)
    loop = generate(models.target, make_proposer(name, models, **options), prompt, 24)
    steps = replay_greedy(make_proposer(name, models, **options), prompt, out.tokens)
    assert steps == [(s.proposed, s.accepted, s.emitted) for s in loop.steps]
