"""Medusa-1: head shapes, the sparse tree from given accuracies, greedy equality, lossless sampling, training."""

import pytest
import torch

from helpers import exact_distribution

from specdec_lib.decoding import Context, generate
from specdec_lib.experiments import goodness_of_fit
from specdec_lib.methods import make_proposer
from specdec_lib.methods.medusa import (HeadsGraph, Medusa, MedusaHeads, MedusaLearner, TreeTemplate, build, fill_greedy,
                                        fill_sampled, head_parameters, score, sparse_tree)
from specdec_lib.models import load_profile
from specdec_lib.qwen2 import Qwen2Config, random_model
from specdec_lib.sampling import SamplingParams, probs_from_logits
from specdec_lib.train import Batch, TeacherOut
from specdec_lib.tree import chain_inputs
from specdec_lib.verify import verify

MAX_NEW = 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are hundreds of small ops: one thread avoids thread-pool overhead (large on a busy
    2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- the heads
@pytest.mark.parametrize("rank", [None, 8])
def test_head_shapes_and_identity_at_start(rank):
    heads = MedusaHeads(hidden_size=16, n_heads=3, rank=rank)
    g = torch.Generator().manual_seed(0)
    h, lm = torch.randn(5, 16, generator=g), torch.randn(100, 16, generator=g)
    logits = heads(h, lm)
    assert logits.shape == (3, 5, 100)
    # an untrained head is the identity block: it predicts what the target's LM head predicts
    assert torch.allclose(logits, (h @ lm.t()).expand(3, -1, -1), atol=1e-5)
    n = sum(p.numel() for p in heads.parameters())
    assert n == 3 * head_parameters(16, 100, rank) == 3 * (16 * 16 + 16 if rank is None else 2 * 16 * 8)


def test_parameter_counts_for_the_1_5b():
    assert head_parameters(1536, 151936, 256) == 786_432
    assert head_parameters(1536, 151936, None) == 2_360_832
    assert head_parameters(1536, 151936, None, own_lm_head=True) == 2_360_832 + 233_373_696


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="rank"):
        MedusaHeads(16, 2, rank=32)
    with pytest.raises(ValueError, match="n_heads"):
        MedusaHeads(16, 0)


# ---------------------------------------------------------------- the sparse tree
def test_sparse_tree_hand_made_case():
    t = sparse_tree([[0.6, 0.2], [0.5, 0.1]], budget=4)
    assert t.parents == [-1, 0, -1, 2]
    assert t.heads == [0, 1, 0, 1]
    assert t.ranks == [0, 0, 1, 0]
    assert t.probs == pytest.approx([0.6, 0.3, 0.2, 0.1])
    assert t.expected_accepted == pytest.approx(1.2)
    # a larger budget adds the next most likely nodes: (0, 1) = 0.06, then (1, 1) = 0.02
    t6 = sparse_tree([[0.6, 0.2], [0.5, 0.1]], budget=10)
    assert len(t6) == 6 and t6.probs[4:] == pytest.approx([0.06, 0.02])
    assert t6.parents[:4] == t.parents


def test_sparse_tree_edge_cases():
    one = sparse_tree([[0.6, 0.2], [0.5, 0.1]], budget=1)
    assert (one.parents, one.heads, one.ranks) == ([-1], [0], [0])
    assert len(sparse_tree([[0.6, 0.2]], budget=0)) == 0
    # one head: every node is a child of the root, and the tree stops when the ranks run out
    flat = sparse_tree([[0.5, 0.1, 0.3]], budget=5)
    assert flat.parents == [-1, -1, -1] and flat.ranks == [0, 2, 1]
    # a good second head makes the tree deep before it gets wide
    deep = sparse_tree([[0.9, 0.05], [0.9, 0.05], [0.9, 0.05]], budget=3)
    assert deep.parents == [-1, 0, 1] and deep.heads == [0, 1, 2]
    with pytest.raises(ValueError, match="probabilities"):
        sparse_tree([[1.5]], 2)
    with pytest.raises(ValueError, match="at least one"):
        sparse_tree([], 2)


def test_fill_greedy_takes_each_heads_ranked_candidates():
    t = sparse_tree([[0.6, 0.2], [0.5, 0.1]], budget=4)          # nodes (0), (0,0), (1), (1,0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0],                 # head 1 ranks: 1, 3, 2, 0
                           [5.0, 0.0, 4.0, 0.5]])                # head 2 ranks: 0, 2, 3, 1
    d = fill_greedy(t, logits)
    assert d.tokens.tolist() == [1, 0, 3, 0] and d.parents.tolist() == [-1, 0, -1, 2] and d.q is None


def test_fill_sampled_draws_siblings_without_replacement():
    t = TreeTemplate(parents=[-1, -1, -1, 0], heads=[0, 0, 0, 1], ranks=[0, 1, 2, 0], probs=[0.5, 0.2, 0.1, 0.1])
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    for seed in range(5):
        d = fill_sampled(t, probs, torch.Generator().manual_seed(seed))
        assert d.without_replacement and d.parents.tolist() == [-1, -1, -1, 0]
        first3 = d.tokens[:3].tolist()
        assert len(set(first3)) == 3 and 3 not in first3                  # distinct, never a zero-mass token
        assert torch.allclose(d.q.sum(-1), torch.ones(4))
        # sibling j's q: head 1's distribution without the earlier siblings, renormalised
        assert torch.equal(d.q[0], probs[0])
        expect = probs[0].clone()
        expect[first3[0]] = 0
        assert torch.allclose(d.q[1], expect / expect.sum())
        assert torch.equal(d.q[3], probs[1])
    # top-p can leave fewer tokens than siblings: the extra ones (and their subtrees) are dropped
    d = fill_sampled(t, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]), torch.Generator().manual_seed(0))
    assert d.tokens.tolist() == [0, 0] and d.parents.tolist() == [-1, 0]


# ---------------------------------------------------------------- greedy: output == the target's, float32
@pytest.fixture(scope="module")
def tiny():
    models = load_profile("tiny")
    base = make_proposer("baseline")
    prompts = [[11, 12, 13, 14] * 6, list(range(300, 340)), [5]]
    refs = {tuple(p): generate(models.target, base, p, MAX_NEW).tokens for p in prompts}
    return models, prompts, refs


def random_heads(models, n_heads=3, seed=0):
    heads = MedusaHeads(models.target.config.hidden_size, n_heads, rank=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return heads


@pytest.mark.parametrize("draft_len,use_heads", [(1, None), (8, 1), (32, None)])
def test_greedy_output_equals_baseline(tiny, draft_len, use_heads):
    models, prompts, refs = tiny
    acc = [[0.5, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.1]]
    prop = build(models, draft_len=draft_len, use_heads=use_heads, heads=random_heads(models), rank_acc=acc)
    for p in prompts:
        out = generate(models.target, prop, p, MAX_NEW)
        assert out.tokens == refs[tuple(p)]
        assert all(s.proposed <= draft_len for s in out.steps)


def test_recorded_proposal_equals_eager_tree(tiny):
    """HeadsGraph's function (what a GPU records; run eagerly here from its buffer) picks the same
    tokens as the eager fill_greedy, for a template with several ranks per head, on many rows."""
    models, _, _ = tiny
    acc = [[0.5, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.1]]
    prop = build(models, draft_len=15, heads=random_heads(models), rank_acc=acc)
    graph = HeadsGraph(prop.template)
    assert max(prop.template.ranks) > 0 and len(set(prop.template.heads)) == 3
    H = models.target.config.hidden_size
    for seed in range(5):
        h = torch.randn(H, generator=torch.Generator().manual_seed(seed))
        eager = fill_greedy(prop.template, prop.head_logits(h, prop.n_heads))
        assert graph(prop, h).tolist() == eager.tokens.tolist()


class CheatingMedusa(Medusa):
    """Head k's logits put the true token (from the baseline's output) at rank `ranks[k]`: deep paths
    of the tree get accepted, which exercises tree verification and cache compaction."""

    def __init__(self, *args, full, ranks, **kw):
        super().__init__(*args, **kw)
        self.full, self.ranks = full, ranks

    def propose(self, ctx):
        self.n_tokens = len(ctx.tokens)
        return super().propose(ctx)

    def head_logits(self, h, n_heads):
        V = self.lm_head.shape[0]
        logits = torch.zeros(n_heads, V)
        for k in range(n_heads):
            pos = self.n_tokens + k                      # head k + 1 guesses the token after the root + k
            true = self.full[pos] if pos < len(self.full) else 0
            for j in range(self.ranks[k]):               # distractors above the true token
                logits[k, (true + 1 + j) % V] = 10.0 - j
            logits[k, true] = 10.0 - self.ranks[k]
        return logits


def test_deep_tree_paths_are_accepted_and_output_is_exact(tiny):
    models, prompts, refs = tiny
    p = prompts[1]
    full = p + refs[tuple(p)]
    acc = [[0.6, 0.3], [0.3, 0.5]]                       # budget 4 keeps (0), (1), (0,1), (0,0)
    t = sparse_tree(acc, budget=4)
    prop = CheatingMedusa(random_heads(models, 2), models.target.lm_head.weight,
                          models.target.config.num_hidden_layers, t, full=full, ranks=[0, 1])
    out = generate(models.target, prop, p, MAX_NEW)
    assert out.tokens == refs[tuple(p)]
    # every step accepts head 1's top token and head 2's second: 3 tokens per step (the last step fewer)
    assert [s.emitted for s in out.steps[:-1]] == [3] * (len(out.steps) - 1)
    assert len(out.steps) == -(-MAX_NEW // 3)


def test_registered_and_trains_under_tiny(tiny):
    """make_proposer("medusa") trains a checkpoint under tiny (ensure_checkpoint) and uses its accuracies."""
    models, prompts, refs = tiny
    prop = make_proposer("medusa", models, draft_len=4)
    assert prop.hidden_layers == (models.target.config.num_hidden_layers,)
    p = prompts[0]
    assert generate(models.target, prop, p, MAX_NEW).tokens == refs[tuple(p)]


# ---------------------------------------------------------------- sampling: the output distribution
SV, K, PROMPT, TRIALS = 4, 2, [1, 3], 800


def toy_target():
    c = Qwen2Config(vocab_size=SV, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1)
    return random_model(c, seed=11, std=0.5)


class ToyTarget:
    """The toy target's logits after a context and the hidden row Medusa reads there, memoised."""

    def __init__(self, model):
        self.model, self.memo = model, {}

    @torch.no_grad()
    def __call__(self, ctx: tuple):
        if ctx not in self.memo:
            pos, slots, mask = chain_inputs(0, len(ctx))
            n = self.model.config.num_hidden_layers
            logits, h = self.model(torch.tensor([ctx]), pos, self.model.new_cache(len(ctx)), mask, slots, (n,))
            self.memo[ctx] = logits[0, -1], h[n][0]
        return self.memo[ctx]


def test_sampling_output_matches_target_distribution():
    """Medusa's propose + the shared verifier at T = 0.9, step after step as generate() runs them (one
    full forward per context, memoised, instead of the cache): the first K tokens follow the target's
    own distribution. The tree has two siblings under the root (without replacement) and a second level."""
    model = toy_target()
    heads = MedusaHeads(16, 2, rank=None)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    n = model.config.num_hidden_layers
    prop = Medusa(heads, model.lm_head.weight, n, sparse_tree([[0.5, 0.3], [0.5, 0.2]], budget=3))
    target, params, gen = ToyTarget(model), SamplingParams(0.9), torch.Generator().manual_seed(0)
    counts, accepted = {}, 0
    for _ in range(TRIALS):
        out = []
        while len(out) < K:
            ctx = tuple(PROMPT + out)
            # the newest hidden row is the token before the root (what generate's ctx.hidden ends with)
            d = prop.propose(Context(list(ctx), len(PROMPT), 8, params, gen, {n: target(ctx[:-1])[1]}))
            rows, paths = [target(ctx)[0]], {-1: ()}
            for i, parent in enumerate(d.parents.tolist()):
                paths[i] = paths[parent] + (int(d.tokens[i]),)
                rows.append(target(ctx + paths[i])[0])
            acc = verify(d, torch.stack(rows), params, gen)
            accepted += len(acc.path)
            out += acc.emitted
        counts[tuple(out[:K])] = counts.get(tuple(out[:K]), 0) + 1
    assert accepted > 0                      # the tree's nodes really get accepted sometimes
    p = goodness_of_fit(counts, exact_distribution(model, params, PROMPT, K))["p_value"]
    assert p > 1e-3, f"chi-square p = {p:.2e}"


def test_proposer_q_rows_are_head_softmaxes():
    target = toy_target()
    heads = MedusaHeads(16, 2, rank=4)
    prop = Medusa(heads, target.lm_head.weight, 2, sparse_tree([[0.5], [0.5]], 2))
    h = torch.randn(3, 16)
    d = prop.propose(Context([1, 2, 3], 3, 8, SamplingParams(1.0), torch.Generator().manual_seed(0), {2: h}))
    expect = probs_from_logits(heads(h[-1], target.lm_head.weight), SamplingParams(1.0))
    assert d.parents.tolist() == [-1, 0] and torch.allclose(d.q, expect)
    # no hidden row (a one-token prompt) or no room: nothing proposed
    assert len(prop.propose(Context([1], 1, 8, SamplingParams(), None, {}))) == 0
    assert len(prop.propose(Context([1, 2], 2, 0, SamplingParams(), None, {2: h}))) == 0


# ---------------------------------------------------------------- training: the loss learns a toy rule
def test_loss_falls_on_toy_data():
    """Toy world: hidden state of token x = E[x]; the token two places later is (x + 2) mod V. Head 1 must
    learn x -> x + 2 through the frozen shared LM head; its loss falls and its accuracy rises."""
    V, H, B, T = 32, 16, 8, 12
    g = torch.Generator().manual_seed(0)
    E, W = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)

    class Models:                                  # what MedusaLearner reads from `models`
        class target:
            config = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)
            device = "cpu"

    learner = MedusaLearner(Models, heads=2, rank=None, top_k=3)
    opt = torch.optim.AdamW(learner.module.parameters(), lr=3e-2)
    start = torch.randint(0, V, (B, 1), generator=g)
    ids = (start + torch.arange(T)) % V                     # x, x+1, x+2, ...
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 3:] = True
    batch, teacher = Batch(ids, mask), TeacherOut({2: E[ids]}, W, E)
    learner.module.eval()
    first, m0 = learner.loss(batch, teacher)
    learner.module.train()
    for _ in range(150):
        loss, _ = learner.loss(batch, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    learner.module.eval()
    last, m = learner.loss(batch, teacher)
    assert float(last.detach()) < 0.3 * float(first.detach())
    assert m["acc"][0] > 0.9 and m["acc"][0] > m0["acc"][0]
    assert len(m["rank_acc"]) == 2 * 3 and m["rank_acc"][0] == pytest.approx(m["acc"][0])
    assert m["n"] == [B * (T - 3), B * (T - 3)]           # head 2 predicts 3 ahead: t from 0 to T - 4


def test_score_counts_ranks():
    hidden, weight = torch.eye(3), torch.tensor([[3.0, 0, 0], [2.0, 0, 1], [1.0, 2, 0]])
    # row 0's logits [3, 2, 1]: target 1 is rank 1; row 1's [0, 0, 2]: target 2 is rank 0
    loss, counts = score(hidden[:2], weight, torch.tensor([1, 2]), top_k=3)
    assert counts.tolist() == [1, 1, 0] and float(loss) > 0


# ---------------------------------------------------------------- exact replay == the decode loop
def test_replay_matches_generate(tiny):
    """The replay from one forward's hidden rows gives the decode loop's steps exactly (float32)."""
    from specdec_lib.methods.medusa import candidates, replay_greedy_tree
    models, prompts, refs = tiny
    heads = random_heads(models)
    acc = [[0.5, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.1]]
    for p in prompts[:2]:
        seq = p + refs[tuple(p)]
        top = candidates(models, heads, seq, start=len(p) - 2, top_k=3)
        for budget in (1, 20):
            prop = build(models, draft_len=budget, heads=heads, rank_acc=acc)
            out = generate(models.target, prop, p, MAX_NEW)
            replayed = replay_greedy_tree(top, seq, len(p), prop.template, MAX_NEW)
            assert replayed == [(s.proposed, s.accepted, s.emitted) for s in out.steps]
    # with cheating candidates (the true next tokens at rank 0), every node on the main path is accepted
    p = prompts[1]
    seq = p + refs[tuple(p)]
    L = len(seq) - (len(p) - 2)
    top = torch.zeros(L, 2, 1, dtype=torch.long)
    for r in range(L):
        i = len(p) - 2 + r
        for k in range(2):
            top[r, k, 0] = seq[i + 2 + k] if i + 2 + k < len(seq) else 0
    steps = replay_greedy_tree(top, seq, len(p), sparse_tree([[1.0], [1.0]], 2), MAX_NEW)
    assert [e for _, _, e in steps[:-1]] == [3] * (len(steps) - 1) and sum(e for *_, e in steps) == MAX_NEW
