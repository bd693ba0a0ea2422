"""EAGLE-3: shapes and budget, the draft-vocabulary map, the dynamic tree on hand-made probabilities,
the drafter's KV cache across tree levels, training (TTT) == inference, greedy equality, lossless sampling."""
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from specdec_lib.decoding import generate
from specdec_lib.methods import eagle3, make_proposer
from specdec_lib.methods.eagle3 import (Eagle3Drafter, Eagle3Proposer, default_layers, drafter_sizes, dynamic_tree,
                                        frequent_tokens, target_to_draft, ttt_mask, ttt_unroll)
from specdec_lib.models import QWEN25_1_5B, load_profile
from specdec_lib.sampling import SamplingParams
from specdec_lib.tree import Draft
from specdec_lib.verify import verify


def small_drafter(hidden=32, vocab=50, seed=0, draft_vocab=None):
    torch.manual_seed(seed)
    d = Eagle3Drafter(hidden, (0, 1, 2), width=32, heads=4, kv_heads=2, intermediate=24,
                      draft_vocab=draft_vocab or vocab)
    with torch.no_grad():                       # make the layer matter (default init is small)
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return d.eval()


def test_default_layers():
    assert default_layers(28) == (2, 14, 25)
    assert default_layers(3) == (0, 1, 2)


def test_fusion_and_head_shapes():
    d = small_drafter()
    hs = [torch.randn(2, 5, 32) for _ in range(3)]
    g = d.fuse_features(hs)
    assert g.shape == (2, 5, 32)
    cache = d.new_cache(16, "cpu", torch.float32)
    pos = torch.arange(5)[None]
    from specdec_lib.tree import chain_inputs
    _, slots, mask = chain_inputs(0, 5)
    a = d(g[:1], torch.randn(1, 5, 32), pos, cache.k[0], cache.v[0], slots, mask)
    assert a.shape == (1, 5, 32)
    assert d.head_input(a).shape == (1, 5, 32)          # back in the target's hidden size


def test_weight_budget_for_the_1_5b():
    c = QWEN25_1_5B
    sizes = drafter_sizes(c.hidden_size, c.head_dim)
    assert sizes == dict(width=1024, heads=8, kv_heads=2, intermediate=512)
    with torch.device("meta"):
        d = Eagle3Drafter(c.hidden_size, default_layers(c.num_hidden_layers), draft_vocab=32768, **sizes)
    params = sum(p.numel() for p in d.parameters())
    # int4: half a byte per matrix entry + a float16 scale per 64; the rest bf16; the int32 id map
    int4_bytes = params / 2 + 2 * params / 64 + 4 * 32768
    assert int4_bytes <= 8e6, int4_bytes / 1e6


def test_draft_vocab_map_round_trip():
    seqs = [SimpleNamespace(response_ids=[5, 5, 7, 9, 9, 9])]
    d2t = frequent_tokens(seqs, vocab_size=12, n=4, always=(11,))
    assert d2t.tolist() == [5, 7, 9, 11]                 # 9 x3, 5 x2, 7 x1 and the always-kept 11
    t2d = target_to_draft(d2t, 12)
    assert torch.equal(d2t[t2d[d2t]], d2t)               # target -> draft -> target
    assert torch.equal(t2d[d2t], torch.arange(4))
    assert (t2d[[0, 1, 6, 10]] == -1).all()              # outside: never proposed
    # the docstring's example: unseen ids fill up by id
    assert frequent_tokens([SimpleNamespace(response_ids=[5, 5, 7])], 10, 3, always=()).tolist() == [0, 5, 7]


# ---------------------------------------------------------------- the dynamic tree
A, B, C, D, E, F = range(6)


def hand_made():
    """log-probs over a 6-token draft vocabulary, per path from the root (see dynamic_tree's docstring)."""
    def row(**p):
        v = torch.full((6,), 1e-9)
        for k, x in p.items():
            v["ABCDEF".index(k)] = x
        return (v / v.sum()).log()
    table = {(): row(A=.6, B=.35, C=.05), (A,): row(C=.5, D=.4, E=.1), (B,): row(E=.9, F=.05, A=.05)}
    calls = []

    def expand(tokens, parent_rank, level):
        calls.append((tokens.tolist(), parent_rank.tolist(), level))
        return torch.stack([table.get((t,), row(A=1.0)) for t in tokens.tolist()])
    return table[()], expand, calls


def test_dynamic_tree_hand_made():
    root, expand, calls = hand_made()
    t = dynamic_tree(root, expand, top_k=2, depth=2, total_tokens=3)
    assert (t.tokens.tolist(), t.parents.tolist()) == ([A, B, E], [-1, -1, 1])
    assert calls == [([A, B], [0, 0], 1)]                # both level-1 nodes fed, once (parent: the root)
    assert torch.allclose(t.scores.exp(), torch.tensor([.6, .35, .315], dtype=torch.float64), atol=1e-6)
    t = dynamic_tree(root, expand, top_k=2, depth=2, total_tokens=4)
    assert (t.tokens.tolist(), t.parents.tolist()) == ([A, B, C, E], [-1, -1, 0, 1])


def test_dynamic_tree_expands_only_the_most_confident():
    root, expand, calls = hand_made()
    # top_k 2, depth 3: level 2 candidates ac .30, ad .24, be .315, bf .0175 -> feed be and ac
    t = dynamic_tree(root, expand, top_k=2, depth=3, total_tokens=100)
    assert calls[1] == ([C, E], [0, 1], 2)                # C's parent A was row 0 of level 1, E's B row 1
    assert len(t.tokens) == 2 + 4 + 4
    Draft(t.tokens, t.parents)                            # a valid tree
    from specdec_lib.tree import validate_parents
    validate_parents(t.parents)


def test_chain_is_top_k_one():
    root, expand, _ = hand_made()
    t = dynamic_tree(root, expand, top_k=1, depth=3, total_tokens=3)
    assert t.parents.tolist() == [-1, 0, 1] and t.tokens.tolist() == [A, C, A]


def test_tree_rejects_bad_sizes():
    root, expand, _ = hand_made()
    with pytest.raises(ValueError):
        dynamic_tree(root, expand, top_k=0, depth=2, total_tokens=3)


# ---------------------------------------------------------------- the drafter's KV cache across tree levels
def make_proposer_from(d, hidden=32, vocab=50, **kw):
    g = torch.Generator().manual_seed(1)
    embed = torch.randn(vocab, hidden, generator=g)
    head = torch.randn(vocab, hidden, generator=g)
    return Eagle3Proposer(d, embed, head, **kw)


def fresh(p, tokens, hidden):
    p.reset(tokens)
    a = p.read_context(tokens, hidden)
    return p.new_rows(a)


def feed(p, toks, parent_rows, rows, level, L, state):
    t = torch.tensor
    return p.feed(t(toks), t(parent_rows), t(rows), level, L, state)


def test_tree_forward_equals_per_branch_forward():
    """Nodes fed level by level into one cache (tree mask) == each root-to-node path fed alone as a chain."""
    d = small_drafter()
    p = make_proposer_from(d, top_k=3, depth=4, total_tokens=20)
    torch.manual_seed(3)
    tokens = torch.randint(0, 50, (7,)).tolist()          # context; tokens[-1] is the root
    L = len(tokens) - 1
    hidden = {l: torch.randn(L, 32) for l in (0, 1, 2)}
    state = fresh(p, tokens, hidden)
    # rows 1-3: children of the root (level 1); rows 4, 5: children of rows 1 and 3; row 7: child of row 4
    toks = {1: 4, 2: 9, 3: 11, 4: 2, 5: 30, 7: 7}
    par = {1: 0, 2: 0, 3: 0, 4: 1, 5: 3, 7: 4}
    feed(p, [4, 9, 11], [0, 0, 0], [1, 2, 3], 1, L, state)
    feed(p, [2, 30], [1, 3], [4, 5], 2, L, state)
    feed(p, [7], [4], [7], 3, L, state)
    for row in toks:
        path, x = [], row
        while x > 0:
            path.append(x)
            x = par[x]
        path.reverse()
        q = make_proposer_from(d, top_k=1, depth=4, total_tokens=4)
        st = fresh(q, tokens, hidden)
        for level, x in enumerate(path, start=1):    # one node per forward: a chain, rows 1, 2, 3
            feed(q, [toks[x]], [level - 1], [level], level, L, st)
        assert torch.allclose(st["out"][len(path)], state["out"][row], atol=1e-5), row


def test_training_unroll_equals_inference_path():
    """TTT step j at position t == the inference drafter at depth j + 1 after context x_0..x_{t+1}."""
    d = small_drafter()
    p = make_proposer_from(d, top_k=1, depth=3, total_tokens=3)
    torch.manual_seed(4)
    T = 9
    ids = torch.randint(0, 50, (1, T))
    hidden = {l: torch.randn(1, T, 32) for l in (0, 1, 2)}
    with torch.no_grad():
        outs = ttt_unroll(d, ids, d.fuse_features([hidden[l] for l in (0, 1, 2)]), p.embed, steps=3)
    t = 4                                                    # context entries 0..t, root x_{t+1}
    tokens = ids[0, :t + 2].tolist()
    st = fresh(p, tokens, {l: hidden[l][0, :t + 1] for l in (0, 1, 2)})
    assert torch.allclose(st["out"][0], outs[0][0, t], atol=1e-5)
    L = t + 1
    for j in (1, 2):                                         # feed the true next tokens x_{t+2}, x_{t+3}
        feed(p, [int(ids[0, t + j + 1])], [j - 1], [j], j, L, st)
        assert torch.allclose(st["out"][j], outs[j][0, t], atol=1e-5), j


def test_tree_growth_with_L_on_the_device():
    """The graph-captured path (L a device tensor, static shapes) grows the same tree as plain ints."""
    d = small_drafter()
    p = make_proposer_from(d, top_k=3, depth=4, total_tokens=10)
    tokens = list(range(3, 12))
    hidden = {l: torch.randn(len(tokens) - 1, 32) for l in (0, 1, 2)}
    p.reset(tokens)
    a = p.read_context(tokens, hidden)
    L = len(tokens) - 1
    t1 = p.grow(a, L, 10)
    t2 = p.grow(a, torch.tensor(L), 10)
    assert torch.equal(t1.tokens, t2.tokens) and torch.equal(t1.parents, t2.parents)
    assert len(t1.tokens) == 10


def test_ttt_mask_example():
    assert ttt_mask(3, 1).int().tolist() == [[1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1]]


# ---------------------------------------------------------------- end to end under tiny
@pytest.fixture(scope="module")
def tiny():
    return load_profile("tiny", "cpu", torch.float32)


def test_greedy_output_equals_baseline(tiny):
    base = make_proposer("baseline")
    for kw in (dict(top_k=3, depth=3, total_tokens=8), dict(chain=True, depth=4)):
        prop = make_proposer("eagle3", tiny, **kw)
        for prompt in ([11, 12, 13, 14] * 6, [5], list(range(300, 340))):
            ref = generate(tiny.target, base, prompt, 24).tokens
            out = generate(tiny.target, prop, prompt, 24)
            assert out.tokens == ref, kw
            assert max(s.proposed for s in out.steps) <= kw.get("total_tokens", 4)
        sampled = generate(tiny.target, prop, [11, 12, 13, 14] * 6, 12, temperature=1.0, seed=3)
        assert len(sampled.tokens) == 12


def test_drafter_attention_width_is_static(tiny):
    """Every drafter forward of a generation (context reads and tree levels) attends over the whole
    cache: one mask width for all steps, so a GPU never meets a new attention shape as L grows."""
    prop = make_proposer("eagle3", tiny, top_k=2, depth=3, total_tokens=6)
    widths, forward = [], prop.drafter.forward

    def spy(feature, token_emb, pos, k_cache, v_cache, slots, mask, block_fn=None):
        widths.append(mask.shape[-1])
        return forward(feature, token_emb, pos, k_cache, v_cache, slots, mask, block_fn)
    prop.drafter.forward = spy
    generate(tiny.target, prop, list(range(300, 340)), 24)
    assert len(widths) > 10 and set(widths) == {prop.cache.max_len}


@pytest.mark.parametrize("top_k,depth,total", [(3, 3, 8), (1, 4, 4), (2, 1, 2)])
def test_padded_one_graph_proposal_equals_eager(top_k, depth, total):
    """ProposeGraph's function (what a GPU records once: the context read padded to P = depth + 1 rows,
    n and L in device buffers, then the tree), run here eagerly, proposes what the eager path proposes,
    step after step: the padding rows change nothing that a node can see. The first step reads a
    prompt longer than P (partly eagerly first); later steps bring 1..P new entries.
    subtle: float64. A matrix product over P rows rounds differently from one over n rows (~1e-6 in
    float32), which can flip near-ties between children; in float64 it cannot here."""
    d = small_drafter().double()
    ps = [make_proposer_from(d, top_k=top_k, depth=depth, total_tokens=total) for _ in range(2)]
    for p in ps:
        p.embed, p.head = p.embed.double(), p.head.double()
        p.reset([])
    graph = eagle3.ProposeGraph()
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 50, (12,), generator=g).tolist()
    n = len(tokens) - 1                                       # the prompt's entries
    for step in range(8):
        hidden = {l: torch.randn(n, 32, generator=g, dtype=torch.float64) for l in (0, 1, 2)}
        L = len(tokens) - 1
        a = ps[0].read_context(tokens, hidden)
        tree = ps[0].grow(a, L, total)
        toks, parents = graph(ps[1], tokens, hidden)
        assert toks.tolist() == ps[0].d2t[tree.tokens].tolist() and parents.tolist() == tree.parents.tolist()
        assert ps[1].length == ps[0].length == L
        n = int(torch.randint(1, depth + 2, (1,), generator=g))    # accepted + 1 new entries next step
        tokens += torch.randint(0, 50, (n,), generator=g).tolist()
    assert graph.buf["ids"].shape == (depth + 1,)


def test_train_metrics_per_step(tiny):
    learner = eagle3.learner(tiny, ttt_steps=2)
    from specdec_lib.train import batches, teacher_forward
    from specdec_lib.selfdistill import load_data
    b = next(batches(load_data(tiny).split("train"), 2, 32))
    loss, m = learner.loss(b, teacher_forward(tiny.target, b.ids, learner.hidden_layers))
    assert loss.requires_grad and math.isfinite(float(loss))
    assert len(m["acc"]) == len(m["top5"]) == len(m["n"]) == 2
    assert m["n"][0] >= m["n"][1] > 0


def test_sampled_tree_is_lossless():
    """A sampled dynamic tree + the shared verifier: the first emitted token follows the target's p."""
    V = 4
    gen = torch.Generator().manual_seed(0)
    p_root = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q_logp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = SamplingParams(1.0)
    counts = Counter()
    trials = 3000
    for _ in range(trials):
        t = dynamic_tree(q_logp, lambda tok, par, level: q_logp.expand(len(tok), V), top_k=2, depth=2,
                         total_tokens=4, generator=gen, temperature_q=lambda lp: lp.exp())
        draft = Draft(t.tokens, t.parents, t.q, without_replacement=True)
        logits = torch.stack([p_root.log()] + [torch.tensor([0.25] * 4).log()] * len(t.tokens))
        counts[verify(draft, logits, params, gen).emitted[0]] += 1
    from scipy.stats import chisquare
    obs = [counts[i] for i in range(V)]
    exp = [trials * x for x in (0.1, 0.2, 0.3, 0.4)]
    exp = [e * sum(obs) / sum(exp) for e in exp]
    assert chisquare(obs, exp).pvalue > 1e-3, obs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # importing torch._dynamo
def test_block_fn_runs_every_drafter_layer_call(tiny):
    """compile_block passes torch.compile(Block.forward) to every drafter call (context read and tree
    levels); a spy in its place sees them all and changes nothing. (Compiling itself is measured on the
    GPU: tools/gpu_check.py, tools/profile_proposer.py.)"""
    from specdec_lib.qwen2 import Block
    prompt = list(range(300, 340))
    ref = make_proposer("eagle3", tiny, top_k=2, depth=3, total_tokens=6)
    ref_drafts = [d for d in _drafts(tiny, ref, prompt)]
    prop = make_proposer("eagle3", tiny, top_k=2, depth=3, total_tokens=6, compile_block=True)
    assert prop.block_fn is not None and ref.block_fn is None
    calls = []

    def spy(*args):
        calls.append(args[1].shape)
        return Block.forward(*args)
    prop.block_fn = spy
    assert _drafts(tiny, prop, prompt) == ref_drafts
    assert len(calls) > len(ref_drafts)              # one context read and depth - 1 levels per step


def _drafts(models, prop, prompt):
    out = []
    inner = prop.propose

    def record(ctx):
        d = inner(ctx)
        out.append((d.tokens.tolist(), d.parents.tolist()))
        return d
    prop.propose = record
    generate(models.target, prop, prompt, 16)
    return out
