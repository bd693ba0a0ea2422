"""The verifier: exact toy cases (greedy) and the exact output distribution (sampling).

Sampling is tested by exact enumeration, not by Monte Carlo: tests/helpers.enumerate_outcomes
runs one draft + verify step once per branch of its random draws, which gives the probability of
every emitted sequence. Completed with the target's own sampling, it must equal the target's
distribution to 1e-6 in total variation, over many random (p, q) pairs. Bugs a chi-square test
with a few thousand trials misses (a median TV of 0.01 - 0.05) fail here at once: the seeded
mutants at the end must fail the same check.
"""
import inspect
import itertools
import math
import random
import zlib

import pytest
import torch

import specdec_lib.verify as verify_module
from specdec_lib.sampling import SamplingParams, probs_from_logits
from specdec_lib.tree import Draft
from specdec_lib.verify import verify, verify_sampling
from tests.helpers import enumerate_outcomes, tv

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


# ---------------------------------------------------------------- sampling: exact distribution tests
SV = 3   # vocabulary of the toy models: small enough to enumerate every branch


def toy_lm(seed, scale):
    """A toy language model: fixed pseudo-random logits [SV] for every context (a tuple of tokens)."""
    memo = {}

    def logits(ctx):
        ctx = tuple(ctx)
        if ctx not in memo:
            g = torch.Generator().manual_seed(zlib.crc32(repr((seed, ctx)).encode()))
            memo[ctx] = torch.randn(SV, generator=g) * scale
        return memo[ctx]
    return logits


def draw_tree(ctx, shape, q_lm, q_params, mode):
    """A draft tree of the given shape (children per node, per depth) drawn from the draft q.

    mode: "iid" (siblings drawn independently, each q row = the parent's q), "wor_rows" (without
    replacement, each sibling's row = q minus the earlier siblings, renormalised; flagged),
    "wor_rows_noflag" (the same rows, not flagged), "wor_parent_q" (without replacement, every
    sibling's row = the parent's q, flagged: the verifier removes the earlier siblings), "none"
    (deterministic: the most likely distinct tokens, q = None).
    """
    tokens, parents, qs = [], [], []
    frontier = [(-1, list(ctx))]
    for width in shape:
        nxt = []
        for parent, pctx in frontier:
            q = probs_from_logits(q_lm(pctx), q_params)
            left = q.clone()                          # what is left to draw from, without replacement
            for _ in range(width):
                if mode == "none":
                    x = int(left.argmax())
                    left[x] = 0
                    qs.append(None)
                elif mode == "iid":
                    x = int(verify_module.sample(q, None))
                    qs.append(q)
                else:
                    if float(left.sum()) == 0:            # q's support is used up: fewer siblings
                        break
                    row = left / left.sum()
                    x = int(verify_module.sample(row, None))
                    qs.append(q if mode == "wor_parent_q" else row)
                    left[x] = 0
                tokens.append(x)
                parents.append(parent)
                nxt.append((len(tokens) - 1, pctx + [x]))
        frontier = nxt
    return Draft(torch.tensor(tokens), torch.tensor(parents), None if mode == "none" else torch.stack(qs),
                 without_replacement=mode in ("wor_rows", "wor_parent_q"))


def one_step(p_lm, q_lm, params, q_params, shape, mode, verify_fn):
    """A draft drawn from q, the target's logits for its verify rows, one verify: the emitted tokens."""
    d = draw_tree((), shape, q_lm, q_params, mode)
    paths, rows = {-1: []}, [p_lm(())]              # row 0 = the root context, row i + 1 = node i
    for i, parent in enumerate(d.parents.tolist()):
        paths[i] = paths[parent] + [int(d.tokens[i])]
        rows.append(p_lm(paths[i]))
    return tuple(verify_fn(d, torch.stack(rows), params, None).emitted)


def step_tv(p_lm, q_lm, params, q_params, shape, mode, verify_fn=verify_sampling) -> float:
    """TV between (one speculative step + the target's own sampling) and the target alone, over the
    first len(shape) + 1 tokens."""
    emitted = enumerate_outcomes(lambda: one_step(p_lm, q_lm, params, q_params, shape, mode, verify_fn))
    n = len(shape) + 1
    p = {}

    def p_of(ctx):                                    # the target's next-token probabilities, floats
        if ctx not in p:
            p[ctx] = probs_from_logits(p_lm(ctx), params).double().tolist()
        return p[ctx]

    def target_prob(seq, start):                      # P(seq[start:] | seq[:start]) under the target
        return math.prod(p_of(seq[:i])[seq[i]] for i in range(start, len(seq)))

    target = {seq: target_prob(seq, 0) for seq in itertools.product(range(SV), repeat=n)}
    spec = {}
    for e, pr in emitted.items():                     # complete each emitted prefix with the target
        for rest in itertools.product(range(SV), repeat=n - len(e)):
            spec[e + rest] = spec.get(e + rest, 0.0) + pr * target_prob(e + rest, len(e))
    assert abs(sum(emitted.values()) - 1) < 1e-9
    return tv(spec, target)


def random_cases(n, seed=0):
    """n random (target, draft, sampling params) triples: peaked and flat p and q, T and top-p varied."""
    rng = random.Random(seed)
    settings = [SamplingParams(1.0), SamplingParams(0.7), SamplingParams(1.0, 0.8), SamplingParams(1.3, 0.9)]
    return [(toy_lm(("p", seed, i), rng.choice([0.3, 1.0, 2.5])), toy_lm(("q", seed, i), rng.choice([0.3, 1.0, 2.5])),
             rng.choice(settings), rng.choice(settings)) for i in range(n)]


CASES = [   # (name, tree shape: children per node at each depth, mode)
    ("chain g=2", (1, 1), "iid"),
    ("tree 2x1 iid siblings", (2, 1), "iid"),
    ("tree 3 without replacement, rows", (3,), "wor_rows"),
    ("tree 2x1 without replacement, rows", (2, 1), "wor_rows_noflag"),
    ("tree 3 without replacement, parent q", (3,), "wor_parent_q"),
    ("tree 2x2 q=None", (2, 2), "none"),
    ("chain g=2 q=None", (1, 1), "none"),
]
N_CASES = 24


@pytest.mark.parametrize("name,shape,mode", CASES, ids=[c[0] for c in CASES])
def test_one_step_is_exactly_the_target_distribution(name, shape, mode):
    worst = max(step_tv(p, q, params, qp, shape, mode) for p, q, params, qp in random_cases(N_CASES))
    assert worst < 1e-6, f"{name}: TV {worst:.2e} from the target's distribution"


def test_the_draft_really_differs_from_the_target():
    """The check has power: sampling from the draft alone is far from the target."""
    p, q, params, qp = random_cases(1)[0]
    alone = {(x,): float(w) for x, w in enumerate(probs_from_logits(q(()), qp))}
    target = {(x,): float(w) for x, w in enumerate(probs_from_logits(p(()), params))}
    assert tv(alone, target) > 0.05


# ---------------------------------------------------------------- mutation check: seeded bugs must fail
def mutant(old: str, new: str):
    """verify_sampling with one line changed, compiled in the verifier's own module (same globals)."""
    src = inspect.getsource(verify_sampling)
    if old not in src:
        raise AssertionError(f"the mutation no longer applies (update the test): {old!r}")
    code = src.replace(old, new).replace("def verify_sampling(", "def _mutant(")
    exec(compile(code, "<mutant>", "exec"), verify_module.__dict__)
    return verify_module.__dict__.pop("_mutant")


MUTANTS = [
    ("later siblings reuse the first sibling's q", "q = draft.q[c].to(p)", "q = draft.q[kids[node][0]].to(p)",
     (2, 1), "wor_rows_noflag"),
    ("residual not renormalised (iid tree)", "p = residual / total if", "p = residual if", (2, 1), "iid"),
    ("residual not renormalised (tree without replacement)", "p = residual / total if", "p = residual if",
     (3,), "wor_rows"),
    ("accept with p / q the wrong way round", "if accept_draft_token(float(p[x]), float(q[x])",
     "if accept_draft_token(float(q[x]), float(p[x])", (1, 1), "iid"),
]


@pytest.mark.parametrize("name,old,new,shape,mode", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_seeded_bugs_fail_the_exact_test(name, old, new, shape, mode):
    bad = mutant(old, new)
    worst = max(step_tv(p, q, params, qp, shape, mode, bad) for p, q, params, qp in random_cases(8))
    assert worst > 1e-3, f"mutant '{name}' was not caught (TV {worst:.2e})"
