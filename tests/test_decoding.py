"""Greedy speculative output == greedy autoregressive output, for every proposer, draft length and tree."""
import pytest
import torch

from specdec_lib.decoding import generate
from specdec_lib.methods import make_proposer
from specdec_lib.tree import Draft

MAX_NEW = 24


@pytest.fixture(scope="module")
def references(tiny_target, tiny_prompts):
    """The baseline's greedy output for each prompt: the ground truth every method must reproduce."""
    base = make_proposer("baseline")
    return {tuple(p): generate(tiny_target, base, p, MAX_NEW).tokens for p in tiny_prompts}


def proposers(references, g):
    yield make_proposer("oracle", continuations=references, draft_len=g)
    yield make_proposer("oracle", continuations=references, draft_len=g, error_rate=0.3, seed=g)
    yield make_proposer("oracle", continuations=references, draft_len=g, error_rate=0.2, branches=3, seed=g)
    yield make_proposer("random", draft_len=g, vocab_size=151936, seed=g)


@pytest.mark.parametrize("g", [1, 3, 5, 8])
def test_greedy_speculation_equals_baseline(tiny_target, tiny_prompts, references, g):
    for proposer in proposers(references, g):
        for p in tiny_prompts:
            out = generate(tiny_target, proposer, p, MAX_NEW)
            assert out.tokens == references[tuple(p)], (proposer.name, g, len(p))
            assert out.record.new_tokens == MAX_NEW


def test_oracle_accepts_everything(tiny_target, tiny_prompts, references):
    oracle = make_proposer("oracle", continuations=references, draft_len=4)
    out = generate(tiny_target, oracle, tiny_prompts[2], MAX_NEW)
    assert out.record.acceptance_rate == 1.0
    assert out.record.steps == -(-MAX_NEW // 5)   # 5 tokens per step: 4 accepted + 1 bonus


def test_eos_inside_a_draft_stops_there(tiny_target, tiny_prompts, references):
    """Declare a token of the reference to be EOS: speculative and baseline both stop right after it."""
    p = tiny_prompts[1]
    ref = references[tuple(p)]
    eos = ref[6]
    first = ref.index(eos)
    base = generate(tiny_target, make_proposer("baseline"), p, MAX_NEW, eos_ids=[eos])
    oracle = make_proposer("oracle", continuations=references, draft_len=8)
    spec = generate(tiny_target, oracle, p, MAX_NEW, eos_ids=[eos])
    assert base.tokens == spec.tokens == ref[:first + 1]
    assert spec.stop_reason == base.stop_reason == "eos"
    assert spec.record.steps < base.record.steps


def test_static_kv_len_loop_equals_dynamic(tiny_target, tiny_prompts, references):
    """The GPU-style static attention width gives the same greedy output."""
    oracle = make_proposer("oracle", continuations=references, draft_len=3, error_rate=0.3)
    p = tiny_prompts[2]
    out = generate(tiny_target, oracle, p, MAX_NEW, max_len=128, kv_len=128)
    assert out.tokens == references[tuple(p)]


def test_records_add_up(tiny_target, tiny_prompts, references):
    oracle = make_proposer("oracle", continuations=references, draft_len=3, error_rate=0.3)
    out = generate(tiny_target, oracle, tiny_prompts[2], MAX_NEW)
    r = out.record
    assert r.new_tokens == len(out.tokens) == sum(s.emitted for s in out.steps)
    assert r.accepted == sum(s.accepted for s in out.steps) <= r.proposed
    assert r.mean_accepted_len == pytest.approx(r.new_tokens / r.steps)
    assert all(s.emitted == s.accepted + 1 for s in out.steps)


def test_sampling_baseline_is_seeded(tiny_target, tiny_prompts):
    base = make_proposer("baseline")
    a = generate(tiny_target, base, tiny_prompts[1], 12, temperature=1.0, seed=3).tokens
    b = generate(tiny_target, base, tiny_prompts[1], 12, temperature=1.0, seed=3).tokens
    c = generate(tiny_target, base, tiny_prompts[1], 12, temperature=1.0, seed=4).tokens
    assert a == b and a != c


def test_device_fed_greedy_chain_equals_baseline(tiny_target, tiny_prompts, references):
    """GreedyChain (the GPU baseline with no host in the loop), run step by step without graphs."""
    from specdec_lib.cuda_graphs import GreedyChain
    chain = GreedyChain(tiny_target, tiny_target.new_cache(128), "cpu")
    for p in tiny_prompts:
        out = chain.generate(tiny_target, p, MAX_NEW, check_every=5)
        assert out.tokens == references[tuple(p)]
        assert out.record.new_tokens == MAX_NEW and chain.cache.length == len(p) - 1 + MAX_NEW
    ref = references[tuple(tiny_prompts[1])]
    out = chain.generate(tiny_target, tiny_prompts[1], MAX_NEW, eos_ids=[ref[6]], check_every=4)
    assert out.tokens == ref[:ref.index(ref[6]) + 1] and out.stop_reason == "eos"


def test_tree_steps_record_their_depth(tiny_target):
    """A tree of 3 nodes and depth 2 tries 2 positions, not 3: the step says so (per-position acceptance)."""
    class TreeProposer:
        name, hidden_layers = "tree", ()

        def reset(self, prompt_ids):
            pass

        def propose(self, ctx):
            return Draft(torch.tensor([5, 6, 7]), torch.tensor([-1, 0, -1]))

    out = generate(tiny_target, TreeProposer(), [1, 2, 3], 4)
    assert [s.draft_depth for s in out.steps][0] == 2 and out.steps[0].proposed == 3
    chain = generate(tiny_target, make_proposer("oracle", continuations={(1, 2, 3): [9] * 4}, draft_len=2), [1, 2, 3], 4)
    assert chain.steps[0].draft_depth is None
