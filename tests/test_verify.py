"""The verifier: exact toy cases (greedy) and the output distribution (sampling)."""
import itertools
import zlib

import pytest
import torch

from specdec_lib.sampling import SamplingParams, probs_from_logits, sample
from specdec_lib.tree import Draft
from specdec_lib.verify import verify
from specdec_lib.experiments import goodness_of_fit

V = 16
GREEDY = SamplingParams(0.0)


def next_token_logits(rows):
    """Toy target 'x -> x + 1 mod V': each row's argmax is its token + 1."""
    return torch.nn.functional.one_hot((torch.tensor(rows) + 1) % V, V).float() * 5


def test_greedy_chain_partial_accept():
    # root 5; draft [6, 9, 10]: 6 accepted, 9 rejected (target wants 7): emits [6, 7]
    d = Draft.chain([6, 9, 10])
    acc = verify(d, next_token_logits([5, 6, 9, 10]), GREEDY)
    assert acc.path == [0] and acc.emitted == [6, 7]


def test_greedy_chain_all_accepted_gets_bonus():
    d = Draft.chain([6, 7, 8])
    acc = verify(d, next_token_logits([5, 6, 7, 8]), GREEDY)
    assert acc.path == [0, 1, 2] and acc.emitted == [6, 7, 8, 9]


def test_greedy_first_rejected_and_empty_draft():
    assert verify(Draft.chain([1]), next_token_logits([5, 1]), GREEDY).emitted == [6]
    assert verify(Draft.empty(), next_token_logits([5]), GREEDY).emitted == [6]


def test_greedy_tree_picks_matching_sibling():
    # root 5 -> {3, 6}; 6 -> {0, 7}; 3 -> {4}. Target path: 6, 7, then bonus 8.
    tokens = [3, 6, 4, 0, 7]
    parents = [-1, -1, 0, 1, 1]
    d = Draft(torch.tensor(tokens), torch.tensor(parents))
    acc = verify(d, next_token_logits([5] + tokens), GREEDY)
    assert acc.path == [1, 4] and acc.emitted == [6, 7, 8]


def test_logit_row_count_checked():
    with pytest.raises(ValueError, match="logit rows"):
        verify(Draft.chain([1, 2]), torch.zeros(2, V), GREEDY)


# ---------------------------------------------------------------- sampling: distribution tests
SV, K = 4, 2   # vocab of 4, compare distributions over sequences of 2 tokens (16 outcomes)


def toy_dist(ctx, salt, params):
    """A fixed distribution for each context (a tuple of tokens): deterministic pseudo-random logits."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((salt, tuple(ctx))).encode()))
    logits = torch.randn(SV, generator=g) * 1.5
    return logits, probs_from_logits(logits, params)


def draw_tree(ctx, shape, params, gen, mode):
    """Sample a draft tree of the given shape (branching per depth) from the toy draft q."""
    tokens, parents, qs = [], [], []
    frontier = [(-1, list(ctx))]
    for width in shape:
        nxt = []
        for parent, pctx in frontier:
            _, q = toy_dist(pctx, "draft", SamplingParams(1.0))
            q = q.clone()
            for _ in range(width):
                if mode == "deterministic":            # distinct top tokens, q = None (one-hot)
                    x = int(q.argmax()); qrow = None; q[x] = 0
                else:
                    x = int(sample(q, gen)); qrow = q.clone()
                    if mode == "without_replacement":  # next sibling drawn from q minus x, renormalised
                        q[x] = 0; q = q / q.sum()
                tokens.append(x); parents.append(parent); qs.append(qrow)
                nxt.append((len(tokens) - 1, pctx + [x]))
        frontier = nxt
    q = None if mode == "deterministic" else torch.stack(qs)
    return Draft(torch.tensor(tokens), torch.tensor(parents), q)


def spec_sample(params, shape, mode, trials, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = {}
    for _ in range(trials):
        out = []
        while len(out) < K:
            ctx = list(out)
            d = draw_tree(ctx, shape, params, gen, mode)
            # target logits for each verify row: row 0 = ctx, row i + 1 = ctx + path to node i
            rows, paths = [toy_dist(ctx, "target", params)[0]], {-1: []}
            for i, p in enumerate(d.parents.tolist()):
                paths[i] = paths[p] + [int(d.tokens[i])]
                rows.append(toy_dist(ctx + paths[i], "target", params)[0])
            acc = verify(d, torch.stack(rows), params, gen)
            out += acc.emitted
        key = tuple(out[:K])
        counts[key] = counts.get(key, 0) + 1
    return counts


def exact(params):
    probs = {}
    for seq in itertools.product(range(SV), repeat=K):
        pr = 1.0
        for i in range(K):
            pr *= float(toy_dist(list(seq[:i]), "target", params)[1][seq[i]])
        probs[seq] = pr
    return probs


CASES = [
    ("chain g=3", SamplingParams(1.0), (1, 1, 1), "independent"),
    ("chain g=2, T=0.7, top_p=0.8", SamplingParams(0.7, 0.8), (1, 1), "independent"),
    ("tree 2x2 iid siblings", SamplingParams(1.0), (2, 2), "independent"),
    ("tree 3x1 without replacement", SamplingParams(1.0), (3, 1), "without_replacement"),
    ("tree 2x2 deterministic (q=None)", SamplingParams(0.9), (2, 2), "deterministic"),
]


@pytest.mark.parametrize("name,params,shape,mode", CASES, ids=[c[0] for c in CASES])
def test_sampling_preserves_target_distribution(name, params, shape, mode):
    trials = 4000
    counts = spec_sample(params, shape, mode, trials)
    p = goodness_of_fit(counts, exact(params))["p_value"]
    assert p > 1e-3, f"{name}: chi-square p = {p:.2e}"


def test_distribution_test_has_power():
    """Negative control: sampling from the draft alone (no verification) must fail the same test."""
    gen = torch.Generator().manual_seed(1)
    trials, counts = 4000, {}
    for _ in range(trials):
        out = []
        for _ in range(K):
            out.append(int(sample(toy_dist(out, "draft", SamplingParams(1.0))[1], gen)))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    assert goodness_of_fit(counts, exact(SamplingParams(1.0)))["p_value"] < 1e-6
