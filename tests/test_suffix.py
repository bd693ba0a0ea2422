"""Suffix decoding: the trie against a naive counter, tree construction, greedy equality, the cache bound."""
import random
from collections import Counter

import pytest
import torch

from specdec_lib.decoding import Context, generate
from specdec_lib.methods import make_proposer
from specdec_lib.methods.suffix import SuffixTrie, grow_tree, longest_match
from specdec_lib.replay import replay_greedy
from specdec_lib.sampling import SamplingParams


def naive_counts(seqs, max_depth):
    """Every substring of length <= max_depth of every sequence, with its number of occurrences."""
    c = Counter()
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(i + max_depth, len(s)) + 1):
                c[tuple(s[i:j])] += 1
    return c


def trie_counts(trie):
    return Counter(dict(trie.items()))


@pytest.mark.parametrize("seed", range(5))
def test_trie_matches_naive_counter(seed):
    rng = random.Random(seed)
    D = rng.choice([2, 3, 5, 8])
    seqs = [[rng.randrange(4) for _ in range(rng.randrange(1, 40))] for _ in range(4)]
    trie = SuffixTrie(D)
    for s in seqs:
        opened = []
        for k in range(0, len(s), 3):            # incremental: a few tokens at a time
            opened = trie.extend(s[k:k + 3], opened)
    assert trie_counts(trie) == naive_counts(seqs, D)
    assert trie.n_nodes == len(naive_counts(seqs, D))
    trie.remove(seqs[1])                         # eviction undoes exactly one sequence
    trie.remove(seqs[3])
    assert trie_counts(trie) == naive_counts([seqs[0], seqs[2]], D)
    assert trie.n_nodes == len(naive_counts([seqs[0], seqs[2]], D))


def test_trie_docstring_example():
    trie = SuffixTrie(2)
    trie.extend([1, 2, 1, 2])
    assert dict(trie.items()) == {(1,): 2, (2,): 2, (1, 2): 2, (2, 1): 1}


def test_longest_match_needs_a_continuation():
    trie = SuffixTrie(8)
    trie.extend([5, 1, 2, 3, 9, 1, 2, 3])
    m, node = longest_match(trie, [5, 1, 2, 3, 9, 1, 2, 3], max_match=6)
    assert m == 3 and list(node.children) == [9]  # "1 2 3" was followed by 9; "9 1 2 3" never was
    assert longest_match(trie, [7], 6) == (0, None)


def test_grow_tree_hand_made():
    # After the pattern [0]: "a b" x3, "a c" x1, "d" x1 (a=1, b=2, c=3, d=4); see grow_tree's docstring.
    trie = SuffixTrie(4)
    for cont in ([1, 2], [1, 2], [1, 2], [1, 3], [4]):
        trie.extend([0] + cont)
    node = trie.find([0])
    toks, parents, probs = grow_tree(node, budget=3, min_token_prob=0.0)
    assert (toks, parents) == ([1, 2, 4], [-1, 0, -1])
    assert probs == pytest.approx([0.8, 0.6, 0.2])
    toks, parents, _ = grow_tree(node, budget=10, min_token_prob=0.0)
    assert (toks, parents) == ([1, 2, 4, 3], [-1, 0, -1, 0])
    toks, parents, _ = grow_tree(node, budget=10, min_token_prob=0.5)   # low branches dropped
    assert (toks, parents) == ([1, 2], [-1, 0])


def ctx_for(tokens, prompt_len, max_draft=64):
    return Context(list(tokens), prompt_len, max_draft, SamplingParams(0.0, 1.0), None)


def test_budget_is_spec_factor_times_match_length():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    p = make_proposer("suffix", draft_len=16, max_spec_factor=1.0, min_token_prob=0.0)
    p.reset(prompt)
    d = p.propose(ctx_for(prompt, len(prompt)))
    assert p.last["match_len"] == 3 and d.tokens.tolist() == [4, 5, 6]
    p = make_proposer("suffix", draft_len=4, max_spec_factor=2.0, min_token_prob=0.0)
    p.reset(prompt)
    assert p.propose(ctx_for(prompt, len(prompt))).tokens.tolist() == [4, 5, 6, 7]   # the hard cap
    assert len(p.propose(ctx_for(prompt, len(prompt), max_draft=2))) == 2


def test_global_cache_learns_outputs_and_honours_its_bound():
    p = make_proposer("suffix", cache_size=10, min_token_prob=0.0, max_spec_factor=4.0)
    p.reset([100, 101])
    p.observe([7, 8, 9, 10, 11, 12])
    # a new request: the prompt ends with "7 8", seen only in the cached output
    p.reset([50, 7, 8])
    d = p.propose(ctx_for([50, 7, 8], 3))
    assert p.last["source"] == "global" and d.tokens.tolist() == [9, 10, 11, 12]
    p.observe([20, 21, 22, 23])          # 6 + 4 = 10 tokens: both fit
    assert p.cached_tokens == 10
    p.observe([30, 31, 32])              # the oldest output is evicted
    assert [list(s) for s in p.cached] == [[20, 21, 22, 23], [30, 31, 32]]
    assert p.global_trie.count([7, 8]) == 0
    assert trie_counts(p.global_trie) == naive_counts(p.cached, p.max_depth)
    p.observe(list(range(40, 60)))       # longer than the cache: only its last 10 tokens stay
    assert p.cached_tokens == 10 and p.global_trie.count([49]) == 0 and p.global_trie.count([50]) == 1


def test_reset_learns_the_previous_output_when_not_observed():
    p = make_proposer("suffix")
    p.reset([1, 2])
    p.propose(ctx_for([1, 2, 3, 4, 5], 2))
    p.reset([9])
    assert [list(s) for s in p.cached] == [[3, 4, 5]]


@pytest.mark.parametrize("bad", [dict(draft_len=0), dict(max_spec_factor=0), dict(min_token_prob=2),
                                 dict(cache_size=-1), dict(max_depth=1), dict(max_depth=8, max_match=8)])
def test_bad_options(bad):
    with pytest.raises(ValueError):
        make_proposer("suffix", **bad)


def test_greedy_equality_through_tree_verification(tiny_target, tiny_prompts):
    """Repetitive prompts give real trees; output == the baseline's; replay predicts the same steps."""
    g = torch.Generator().manual_seed(0)
    base = make_proposer("baseline")
    p = make_proposer("suffix", draft_len=8, max_spec_factor=3.0, min_token_prob=0.0)
    saw_accept = False
    for prompt in tiny_prompts + [torch.randint(0, 6, (40,), generator=g).tolist()]:
        ref = generate(tiny_target, base, prompt, 24).tokens
        out = generate(tiny_target, p, prompt, 24)
        assert out.tokens == ref
        saw_accept |= out.record.accepted > 0
        p.observe(out.tokens)                                # later prompts may draft from the cache
    # a prompt built so the tree branches: "1 2 3" is followed by 4 and by 5
    prompt = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3]
    p = make_proposer("suffix", draft_len=8, max_spec_factor=3.0, min_token_prob=0.0)
    p.reset(prompt)
    d = p.propose(ctx_for(prompt, len(prompt)))
    saw_tree = not d.is_chain()
    assert saw_tree and saw_accept
    assert generate(tiny_target, p, prompt, 24).tokens == generate(tiny_target, base, prompt, 24).tokens


def test_replay_equals_the_real_loop(tiny_target):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 6, (40,), generator=g).tolist()
    ref = generate(tiny_target, make_proposer("baseline"), prompt, 24).tokens
    real = generate(tiny_target, make_proposer("suffix", max_spec_factor=3.0, min_token_prob=0.0), prompt, 24)
    rep = replay_greedy(make_proposer("suffix", max_spec_factor=3.0, min_token_prob=0.0), prompt, ref)
    assert rep == [(s.proposed, s.accepted, s.emitted) for s in real.steps]
    assert sum(a for _, a, _ in rep) == real.record.accepted and sum(e for _, _, e in rep) == 24


def test_memory_is_bounded_over_many_requests():
    """Hundreds of requests: the global trie holds at most cache_size tokens (so at most
    cache_size * max_depth nodes, exactly those of the cached outputs: evicted nodes are freed),
    and the request trie only the current request."""
    rng = random.Random(0)
    size, depth = 200, 6
    p = make_proposer("suffix", cache_size=size, max_depth=depth)
    for r in range(300):
        prompt = [rng.randrange(20) for _ in range(rng.randrange(1, 30))]
        out = [rng.randrange(20) for _ in range(rng.randrange(1, 80))]
        p.reset(prompt)
        p.propose(ctx_for(prompt + out, len(prompt)))
        p.observe(out)
        assert p.cached_tokens <= size
        assert p.global_trie.n_nodes <= size * depth
        assert p.request_trie.n_nodes <= len(prompt + out) * depth
    assert p.global_trie.n_nodes == len(naive_counts(p.cached, depth))
