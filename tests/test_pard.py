"""PARD: the training mask on a hand-made case, training rows == inference rows, one forward == k
separate masked predictions, greedy equality, the sampling distribution, and the learner."""

import math

import pytest
import torch

from helpers import exact_distribution, load_tool

from specdec_lib.decoding import generate
from specdec_lib.experiments import goodness_of_fit
from specdec_lib.methods import make_proposer
from specdec_lib.methods import pard
from specdec_lib.qwen2 import Qwen2Config, random_model
from specdec_lib.sampling import SamplingParams, probs_from_logits
from specdec_lib.tree import chain_inputs

MAX_NEW = 16


def toy_config(vocab):
    return Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)


def masks(adapter):
    return adapter.mask_ids(adapter.max_depth - 1)


def random_adapter(config, max_depth=4, mask_id0=None, seed=0, std=0.3):
    """An adapter with non-zero B and random mask rows, so that every part of it matters."""
    torch.manual_seed(seed)
    mask_id0 = config.vocab_size - max_depth + 1 if mask_id0 is None else mask_id0
    ad = pard.PardAdapter(config, rank=4, alpha=4.0, max_depth=max_depth, mask_id0=mask_id0)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, std)
    return ad


# ---------------------------------------------------------------- the mask for training
def test_parallel_layout_hand_made():
    lay = pard.parallel_layout(4, [[0, 1], [0]])
    #                  x0 x1 x2 x3 (2,0) (2,1) (3,0)
    expected = [[1, 0, 0, 0, 0, 0, 0],    # x0
                [1, 1, 0, 0, 0, 0, 0],    # x1
                [1, 1, 1, 0, 0, 0, 0],    # x2
                [1, 1, 1, 1, 0, 0, 0],    # x3
                [1, 0, 0, 0, 1, 0, 0],    # depth 2 after x0: sees x0 and itself
                [1, 1, 0, 0, 0, 1, 0],    # depth 2 after x1
                [1, 0, 0, 0, 1, 0, 1]]    # depth 3 after x0: x0, its depth-2 mask, itself
    assert lay.mask.int().tolist() == expected
    assert lay.anchor.tolist() == [0, 1, 2, 3, 0, 1, 0]
    assert lay.depth.tolist() == [1, 1, 1, 1, 2, 2, 3]
    assert lay.pos.tolist() == [0, 1, 2, 3, 1, 2, 2]
    assert lay.target_index.tolist() == [1, 2, 3, 4, 2, 3, 3]     # x3's target (4) lies outside: no loss


def test_parallel_layout_rejects_bad_anchors():
    with pytest.raises(ValueError, match="target exists"):
        pard.parallel_layout(4, [[2]])                 # depth 2 after x2 would predict x4
    with pytest.raises(ValueError, match="conditional drop"):
        pard.parallel_layout(6, [[0], [1]])            # (3, 1) without (2, 1)


def test_drop_token_anchors_are_nested_and_thin_out():
    T, K = 400, 6
    useful = torch.ones(T, dtype=torch.bool)
    full = pard.drop_token_anchors(T, K, useful, keep=1.0)
    assert [len(a) for a in full] == [T - d for d in range(2, K + 1)]
    cod = pard.drop_token_anchors(T, K, useful, keep=0.5, keep_min=0.2, generator=torch.Generator().manual_seed(0))
    for shallow, deep in zip(cod, cod[1:]):
        assert set(deep) <= set(shallow)                # conditional: (d, j) only with (d - 1, j)
    rates = [len(a) / T for a in cod]
    assert abs(rates[0] - 0.5) < 0.08 and abs(rates[1] - 0.25) < 0.08 and abs(rates[-1] - 0.2) < 0.08
    pard.parallel_layout(T, cod)                         # a valid layout
    useless = torch.zeros(T, dtype=torch.bool)
    assert all(a == [] for a in pard.drop_token_anchors(T, K, useless, keep=1.0))
    assert pard.keep_rate(2, 0.5, 0.2) == 0.5 and pard.keep_rate(5, 0.5, 0.2) == 0.2


# ---------------------------------------------------------------- the adapter
def test_zero_adapter_leaves_the_draft_unchanged(tiny_draft):
    ad = pard.PardAdapter(tiny_draft.config, rank=4)      # B = 0 at the start
    model = pard.adapted_model(tiny_draft, ad)
    ids = torch.tensor([[5, 17, 300, 4000, 9]])
    pos, slots, mask = chain_inputs(0, 5)
    a, _ = model(ids, pos, model.new_cache(5), mask, slots)
    b, _ = tiny_draft(ids, pos, tiny_draft.new_cache(5), mask, slots)
    assert torch.equal(a, b)
    # shared weights, separate modules: the draft itself is not wrapped
    assert model.lm_head.weight is tiny_draft.lm_head.weight
    assert isinstance(tiny_draft.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, pard.LoRALinear)
    n_trained = sum(p.numel() for p in ad.parameters())
    assert n_trained == sum(p.numel() for n, p in model.named_parameters() if ".lora." in n or "rows" in n)


def test_adapter_errors(tiny_draft):
    with pytest.raises(ValueError, match="unknown projections"):
        pard.PardAdapter(tiny_draft.config, targets=("qkv",))
    with pytest.raises(ValueError, match="do not fit"):
        pard.PardAdapter(toy_config(12), max_depth=4)   # ids 151665.. outside a 12-token vocabulary
    ad = pard.PardAdapter(toy_config(12), max_depth=3, mask_id0=10)
    with pytest.raises(ValueError, match="draft_len"):
        pard.ParallelDraft(pard.adapted_model(random_model(toy_config(12)), ad), masks(ad), draft_len=4)


@torch.no_grad()
def masked_prediction(model, adapter, context, depth):
    """Hidden state after context + (depth - 1) masks, from scratch in a fresh cache: [H]."""
    ids = list(context) + adapter.mask_ids(depth - 1)
    pos, slots, mask = chain_inputs(0, len(ids))
    h = pard.final_hidden(model, torch.tensor([ids]), pos, model.new_cache(len(ids)), mask, slots)
    return h[0, -1]


@torch.no_grad()
def test_training_rows_equal_inference_rows():
    """Every row of the training layout computes what inference computes for that anchor and depth."""
    cfg = toy_config(20)
    draft = random_model(cfg, seed=4, std=0.4)
    ad = random_adapter(cfg, max_depth=4)
    model = pard.adapted_model(draft, ad)
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    anchors = pard.drop_token_anchors(len(seq), 4, torch.ones(len(seq), dtype=torch.bool), keep=0.7, keep_min=0.3,
                                      generator=torch.Generator().manual_seed(1))
    lay = pard.parallel_layout(len(seq), anchors)
    R = lay.mask.shape[0]
    ids = torch.tensor(seq + [ad.mask_id0 + d - 2 for d in lay.depth[len(seq):].tolist()])[None]
    h = pard.final_hidden(model, ids, lay.pos[None], model.new_cache(R), lay.mask, torch.arange(R))
    assert R > len(seq) + 4
    for r in range(R):
        j, d = int(lay.anchor[r]), int(lay.depth[r])
        torch.testing.assert_close(h[0, r], masked_prediction(model, ad, seq[:j + 1], d), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the proposer
@torch.no_grad()
def test_merged_weights_equal_the_adapter():
    cfg = toy_config(20)
    draft = random_model(cfg, seed=4, std=0.4)
    ad = random_adapter(cfg, max_depth=4)
    ids = torch.tensor([[3, 1, 4, 17, 18, 19]])        # 17, 18, 19: the mask tokens
    pos, slots, mask = chain_inputs(0, 6)
    a, _ = pard.adapted_model(draft, ad)(ids, pos, draft.new_cache(6), mask, slots)
    merged = pard.merged_model(draft, ad)
    b, _ = merged(ids, pos, draft.new_cache(6), mask, slots)
    torch.testing.assert_close(a[..., :17], b[..., :17], atol=1e-5, rtol=1e-5)   # mask ids' LM rows differ (tied)
    assert merged.model.layers[0].input_layernorm.weight is draft.model.layers[0].input_layernorm.weight
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, draft.model.layers[0].self_attn.q_proj.weight)


def test_merged_inside_inference_mode_survives_fusing():
    """bench_live builds the drafter inside inference mode, then the fused GPU path rebinds q/k/v's .data
    (kernels.one_copy). Inference-tensor copies made that fail at the first plain forward on the H200."""
    from specdec_lib.kernels import one_copy
    cfg = toy_config(20)
    draft = random_model(cfg, seed=4, std=0.4)
    ad = random_adapter(cfg, max_depth=4)
    with torch.inference_mode():
        merged = pard.merged_model(draft, ad)
        a = merged.model.layers[0].self_attn
        assert not a.q_proj.weight.is_inference()
        before = a.q_proj(torch.ones(1, cfg.hidden_size))
        one_copy([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        torch.testing.assert_close(a.q_proj(torch.ones(1, cfg.hidden_size)), before)


@torch.no_grad()
def test_one_forward_equals_k_separate_masked_predictions():
    cfg = toy_config(20)
    draft = random_model(cfg, seed=4, std=0.4)
    ad = random_adapter(cfg, max_depth=5)
    model = pard.merged_model(draft, ad)        # what inference runs (tests above: == the adapter)
    prop = pard.ParallelDraft(model, masks(ad), draft_len=5)
    prop.reset([1, 2, 3])
    # step 1: the whole prompt + 4 masks; step 2: two accepted tokens + the bonus + 4 masks (cache reused)
    for context in ([1, 2, 3], [1, 2, 3, 7, 8, 9]):
        logits = prop.proposal_logits(context, 5)
        assert prop.cache.length == len(context) and prop.seen == context   # mask rows rolled back
        for d in range(1, 6):
            expected = model.lm_head(masked_prediction(model, ad, context, d))
            torch.testing.assert_close(logits[d - 1], expected, atol=1e-5, rtol=1e-5)
    assert prop.fed_per_step == [3 + 4, 3 + 4]
    # a rejected draft: the context is a prefix of what was fed plus a new bonus
    logits = prop.proposal_logits([1, 2, 3, 7, 8, 9, 4], 2)
    assert prop.fed_per_step[-1] == 1 + 1
    torch.testing.assert_close(logits[1], model.lm_head(masked_prediction(model, ad, [1, 2, 3, 7, 8, 9, 4], 2)),
                               atol=1e-5, rtol=1e-5)
    # a long catch-up (a new request's prompt) is split: the prompt first, then its last token + masks
    long = [int(x) for x in torch.randint(0, 18, (40,), generator=torch.Generator().manual_seed(0))]
    prop.reset(long)
    logits = prop.proposal_logits(long, 4)
    for d in range(1, 5):
        torch.testing.assert_close(logits[d - 1], model.lm_head(masked_prediction(model, ad, long, d)),
                                   atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_pard(tiny_draft):
    ad = random_adapter(tiny_draft.config, max_depth=8, mask_id0=pard.MASK_ID0, std=0.05)
    return pard.adapted_model(tiny_draft, ad), ad


@pytest.mark.parametrize("k", [2, 8])
def test_greedy_equals_baseline(tiny_target, tiny_pard, tiny_prompts, k):
    model, ad = tiny_pard
    base = make_proposer("baseline")
    for p in tiny_prompts:
        ref = generate(tiny_target, base, p, MAX_NEW).tokens
        out = generate(tiny_target, pard.ParallelDraft(model, masks(ad), draft_len=k), p, MAX_NEW)
        assert out.tokens == ref, (k, len(p))


@pytest.mark.parametrize("tree_nodes", [None, 6])
def test_greedy_equals_baseline_when_the_drafter_is_good(tree_nodes):
    """A drafter that IS the target (zero adapter) gets its depth-1 guesses accepted: acceptance > 0
    (as a chain, and as a tree whose first branch is the chain's guess)."""
    cfg = toy_config(12)
    target = random_model(cfg, seed=3, std=0.4)
    ad = pard.PardAdapter(cfg, rank=2, max_depth=3, mask_id0=10)
    with torch.no_grad():   # ids 10, 11 may appear in the output: let them read the target's rows
        ad.mask_rows.copy_(target.model.embed_tokens.weight[10:12])
    prop = pard.ParallelDraft(pard.adapted_model(target, ad), masks(ad), draft_len=3, tree_nodes=tree_nodes)
    ref = generate(target, make_proposer("baseline"), [1, 2, 3], 30).tokens
    out = generate(target, prop, [1, 2, 3], 30)
    assert out.tokens == ref
    assert out.record.accepted >= out.record.steps - 1      # depth 1 is the target's own argmax


# ---------------------------------------------------------------- the tree from one forward
def test_tree_from_hand_made_probabilities():
    """Depth 1: ids 3 (.6), 5 (.3); depth 2: 4 (.5), 2 (.4). Paths by product: 3 (.6), 3-4 (.3),
    5 (.3, pushed later), 3-2 (.24): with 3 nodes tokens [3, 4, 5], parents [-1, 0, -1]."""
    logits = torch.full((2, 8), -30.0)
    logits[0, 3], logits[0, 5] = math.log(.6), math.log(.3)
    logits[1, 4], logits[1, 2] = math.log(.5), math.log(.4)
    from types import SimpleNamespace
    stub = SimpleNamespace(config=SimpleNamespace(vocab_size=8))        # tree() reads only the logits
    prop = pard.ParallelDraft(stub, [7], draft_len=2, target_vocab=8, tree_nodes=3, tree_width=2)
    d = prop.tree(logits, 3, SamplingParams(0.0))
    assert d.tokens.tolist() == [3, 4, 5] and d.parents.tolist() == [-1, 0, -1] and d.q is None
    assert prop.tree(logits, 4, SamplingParams(0.0)).tokens.tolist() == [3, 4, 5, 2]


def tree_paths(d):
    """A tree as the set of its root-to-node token paths (the same tree in any node order)."""
    from specdec_lib.tree import ancestors
    anc, toks = ancestors(d.parents), d.tokens.tolist()
    return {tuple(t for t, seen in zip(toks, anc[i + 1, 1:].tolist()) if seen) for i in range(len(toks))}


def test_tree_on_device_is_the_host_tree():
    """tree_on_device (tensor ops, no host) keeps the same nodes as sparse_tree's best-first search, on
    random probabilities of many shapes and on a tie (probability 1: a child as likely as its parent),
    with parents before children."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(200):
        k, r, n = (int(torch.randint(1, hi, (), generator=g)) for hi in (7, 7, 13))
        top = (torch.randn(k, 40, generator=g) * 3).softmax(-1).topk(r, dim=-1)
        cases.append((top.values, top.indices, n))
    cases.append((torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[3, 4], [5, 6]]), 3))
    for values, ids, n in cases:
        a, b = pard.tree_on_device(values, ids, n), pard.tree_from_top(values, ids, n)
        assert len(a) == len(b) and tree_paths(a) == tree_paths(b), (values.shape, n)
        assert all(-1 <= p < i for i, p in enumerate(a.parents.tolist()))
    tie = pard.tree_on_device(*cases[-1])
    assert tie.tokens.tolist() == [3, 4, 5] and tie.parents.tolist() == [-1, -1, 0]


def test_tree_candidates_bound():
    """Only nodes with depth + sum of ranks <= n can be among the n best: 2^n - 1 of them at most."""
    path, own, parent, cost = pard.tree_candidates(8, 8, 7)
    assert own.numel() == 2 ** 7 - 1 and int(cost.max()) == 7
    assert pard.tree_candidates(8, 8, 40) is None            # too many: the tree is built on the host


def test_tree_of_width_one_is_the_chain(tiny_pard, tiny_prompts):
    from specdec_lib.decoding import Context
    model, ad = tiny_pard
    chain = pard.ParallelDraft(model, masks(ad), draft_len=4)
    tree = pard.ParallelDraft(model, masks(ad), draft_len=4, tree_nodes=4, tree_width=1)
    assert tree.name == "pard(k=4, tree=4)"
    p = tiny_prompts[0]
    for prop in (chain, tree):
        prop.reset(p)
    ctx = Context(p, 4, 16, SamplingParams(0.0), None)
    a, b = chain.propose(ctx), tree.propose(ctx)
    assert a.tokens.tolist() == b.tokens.tolist() and b.is_chain()


@pytest.mark.parametrize("k,nodes", [(2, 5), (4, 7), (6, 15)])
def test_tree_greedy_equals_baseline(tiny_target, tiny_pard, tiny_prompts, k, nodes):
    model, ad = tiny_pard
    base = make_proposer("baseline")
    for on_dev in (False, True):            # the tree built on the host, or by tree_on_device's ops
        prop = pard.ParallelDraft(model, masks(ad), draft_len=k, tree_nodes=nodes, device_tree=on_dev)
        for p in tiny_prompts:
            ref = generate(tiny_target, base, p, MAX_NEW).tokens
            out = generate(tiny_target, prop, p, MAX_NEW)
            assert out.tokens == ref, (k, nodes, len(p), on_dev)


def test_tree_rejects_bad_sizes(tiny_pard):
    model, ad = tiny_pard
    with pytest.raises(ValueError, match="tree_nodes"):
        pard.ParallelDraft(model, masks(ad), draft_len=2, tree_nodes=0)


# ---------------------------------------------------------------- sampling: q rows and the distribution
SV, K, PROMPT, TRIALS = 6, 2, [1, 3], 400


def test_q_rows_are_the_drawn_distributions():
    from specdec_lib.decoding import Context
    cfg = toy_config(SV + 2)
    ad = random_adapter(cfg, max_depth=3, mask_id0=SV)
    prop = pard.ParallelDraft(pard.adapted_model(random_model(cfg, seed=2, std=0.5), ad), masks(ad), draft_len=3,
                              target_vocab=SV + 2)
    prop.reset(PROMPT)
    d = prop.propose(Context(PROMPT, 2, 3, SamplingParams(1.0), torch.Generator().manual_seed(0)))
    assert d.q.shape == (3, SV + 2)
    torch.testing.assert_close(d.q.sum(-1), torch.ones(3))
    assert float(d.q[:, SV:].sum()) == 0                  # never a mask token
    logits = prop.proposal_logits(PROMPT, 3)[:, :SV]
    torch.testing.assert_close(d.q[:, :SV], probs_from_logits(logits, SamplingParams(1.0)))


@pytest.mark.parametrize("tree_nodes", [None, 4])
def test_sampling_output_matches_target_distribution(tree_nodes):
    """generate() with the parallel drafter (a drawn chain, or a picked tree with q = None): the first
    K tokens follow the target's distribution."""
    cfg = toy_config(SV)
    target = random_model(cfg, seed=11, std=0.5)
    # the drafter's vocabulary has 2 more rows: its mask tokens (the target never sees them)
    dcfg = toy_config(SV + 2)
    ad = random_adapter(dcfg, max_depth=3, mask_id0=SV, std=0.5)
    prop = pard.ParallelDraft(pard.merged_model(random_model(dcfg, seed=12, std=0.5), ad), masks(ad), draft_len=2,
                              target_vocab=SV, tree_nodes=tree_nodes, tree_width=2)
    params, counts, accepted = SamplingParams(0.9), {}, 0
    for seed in range(TRIALS):
        out = generate(target, prop, PROMPT, K + 1, params.temperature, seed=seed)
        counts[tuple(out.tokens[:K])] = counts.get(tuple(out.tokens[:K]), 0) + 1
        accepted += out.record.accepted
    assert 0 < accepted < TRIALS * K
    p = goodness_of_fit(counts, exact_distribution(target, params, PROMPT, K, vocab=SV))["p_value"]
    assert p > 1e-3, f"chi-square p = {p:.2e}"


# ---------------------------------------------------------------- the learner
def toy_data(n=24, length=14, vocab=12, seed=0):
    """Counting sequences x, x+1, x+2, ... (mod vocab): the next d tokens follow from the last one."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        start = int(torch.randint(0, vocab, (1,), generator=g))
        toks = [(start + t) % vocab for t in range(length)]
        seqs.append(SimpleNamespace(prompt_ids=toks[:4], response_ids=toks[4:]))
    split = {"train": seqs[:n - 4], "heldout": seqs[n - 4:]}
    return SimpleNamespace(split=lambda name: split[name], manifest={"sha256": "toy"})


def test_training_lowers_the_loss_on_toy_data():
    from types import SimpleNamespace
    from specdec_lib.train import TrainConfig, train
    cfg = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    draft = random_model(cfg, seed=7, std=0.3)
    models = SimpleNamespace(draft=draft)
    torch.manual_seed(0)                                              # the adapter's initial A
    learn = pard.learner(models, rank=4, alpha=8.0, max_depth=4, mask_id0=12, keep=0.5, keep_min=0.3)
    log = train(learn, draft, toy_data(), TrainConfig(steps=80, batch_size=8, max_len=16, lr=3e-2, warmup=5,
                                                      eval_every=40, eval_batches=1, log_every=10), progress=False)
    first, last = log["evals"][0], log["final"]
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])
    assert min(last["acc"]) >= 0.8, last["acc"]                      # every depth learned to count
    assert 1 < sum(learn.rows_per_token) / len(learn.rows_per_token) < 4   # dropped: fewer than 4 rows per token
    # the trained drafter proposes the count in one forward
    prop = pard.ParallelDraft(pard.merged_model(draft, learn.module), masks(learn.module), draft_len=4)
    prop.reset([3, 4, 5])
    assert prop.proposal_logits([3, 4, 5], 4)[:, :12].argmax(-1).tolist() == [6, 7, 8, 9]


def test_through_a_graph_runner_as_bench_live_runs_it(tiny_target, tiny_draft, tiny_pard, tiny_prompts):
    """The merged drafter behind cuda_graphs.GraphDraft (on a CPU: eager forwards in padded buckets),
    shared by proposers of several k, as the live benchmark runs it: the output is still the target's."""
    from specdec_lib.cuda_graphs import GraphDraft, GraphRunner
    _, ad = tiny_pard
    merged = pard.merged_model(tiny_draft, ad)
    runner = GraphRunner(merged, 128, buckets=(1, 2, 4, 8, 16), compile=False, fused=False).capture()
    drafter = (GraphDraft(runner), masks(ad))
    base = make_proposer("baseline")
    for k, tree, on_dev in ((2, None, False), (5, None, False), (4, 7, False), (4, 7, True)):
        prop = make_proposer("pard", None, drafter=drafter, draft_len=k, tree_nodes=tree, device_tree=on_dev)
        for p in tiny_prompts:
            ref = generate(tiny_target, base, p, MAX_NEW).tokens
            assert generate(tiny_target, prop, p, MAX_NEW).tokens == ref, (k, len(p))


def test_tree_step_inputs_are_step_inputs():
    """TreeGraph's step (L and the root as device scalars, static mask width) builds the same tree and the
    same verify inputs as tree_on_device + step_inputs with L known on the host."""
    from specdec_lib.tree import step_inputs
    g = torch.Generator().manual_seed(3)
    for k, r, n, L in ((2, 3, 4, 0), (4, 4, 7, 5), (6, 3, 15, 30), (4, 8, 7, 57)):
        values = torch.rand(k, r, generator=g).sort(-1, descending=True).values
        ids = torch.randint(0, 1000, (k, r), generator=g)
        d = pard.tree_step_inputs(values, ids, n, torch.tensor(L), torch.tensor(11), kv_len=96)
        ref = pard.tree_on_device(values, ids, n)
        assert torch.equal(d.tokens, ref.tokens) and torch.equal(d.parents, ref.parents)
        pos, slots, mask, tokens = d.inputs
        for got, want in zip((pos, slots, mask), step_inputs(L, ref.parents, 96)):
            assert torch.equal(got, want), (k, r, n, L)
        assert tokens.tolist() == [[11] + ref.tokens.tolist()]


def test_tree_graph_through_the_target_runner(tiny_target, tiny_draft, tiny_pard, tiny_prompts):
    """device_tree=True with the target behind a GraphRunner (a static mask width): the tree and its verify
    inputs come from TreeGraph (on a CPU: its function, eagerly), and the output is still the target's."""
    from specdec_lib.cuda_graphs import GraphRunner
    model, ad = tiny_pard
    runner = GraphRunner(tiny_target, 128, buckets=(1, 2, 4, 8, 16), compile=False, fused=False).capture()
    fast = dict(forward=runner, kv_len=runner.max_len, cache=runner.cache)
    base = make_proposer("baseline")
    prop = pard.ParallelDraft(model, masks(ad), draft_len=4, tree_nodes=7, device_tree=True)
    for p in tiny_prompts:
        ref = generate(tiny_target, base, p, MAX_NEW).tokens
        assert generate(tiny_target, prop, p, MAX_NEW, **fast).tokens == ref, len(p)
    assert (4, 7, runner.max_len) in prop.graphs          # the recorded step served the full-size trees


def test_tree_graph_step_compiles_to_one_graph():
    """TreeGraph(compiled=True) puts its step through torch.compile before recording it: the step must
    trace as one graph (no break: the index tables are held, not looked up) and give the eager step's
    tree and inputs. Traced with the eager backend here (what dynamo sees); inductor runs on the GPU."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 300, generator=g)
    step = pard.TreeGraph(4, 300, 4, 7, kv_len=64, like=logits, compiled=True)
    step.logits.copy_(logits)
    step.state[0], step.state[1] = 20, 9
    want = step._step()
    got = torch.compile(step._step, fullgraph=True, backend="eager", dynamic=False)()
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.parents, want.parents)
    assert all(torch.equal(a, b) for a, b in zip(got.inputs, want.inputs))


def test_checkpoint_belongs_to_the_draft():
    """The tiny checkpoint (trained in seconds, cached) loads for the draft it was trained on, stores only
    the adapter, and is refused for another base model (e.g. the target)."""
    from types import SimpleNamespace
    from safetensors import safe_open
    from specdec_lib.checkpoint import CheckpointMismatch, ensure_checkpoint
    from specdec_lib.models import load_profile
    models = load_profile("tiny")
    path = ensure_checkpoint("pard", models)
    adapter, header = pard.load_adapter(models, path)
    assert header["method"] == "pard" and header["config"]["max_depth"] == adapter.max_depth
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith(("layers.", "mask_rows")) for k in f.keys())      # the change only
    wrong = SimpleNamespace(draft=models.target, target=models.target, profile="tiny")
    with pytest.raises(CheckpointMismatch, match="another base model"):
        pard.load_adapter(wrong, path)



def test_tree_replay_rows_are_the_proposals():
    """tools/pard_tree_replay.py reads every step's proposal from one full-layout forward over an answer:
    its replayed proposer proposes exactly what ParallelDraft proposes step by step (tiny, float32), and
    the greedy replays agree."""
    from specdec_lib.decoding import Context
    from specdec_lib.models import EOS_IDS, load_profile
    from specdec_lib.replay import replay_greedy
    tool = load_tool("pard_tree_replay")
    models = load_profile("tiny", "cpu", torch.float32)
    adapter, _ = pard.load_adapter(models)
    merged, mask_ids, _ = pard.load_drafter(models)
    prompt, answer = list(range(500, 530)), list(range(900, 916))
    probs, ids = tool.drafter_rows(merged, adapter, prompt, answer, adapter.max_depth)
    for k, nodes in ((4, None), (4, 7), (6, 11)):
        replayed = tool.Replayed(probs, ids, len(prompt), k, nodes, 4)
        real = pard.ParallelDraft(merged, mask_ids, draft_len=k, tree_nodes=nodes, tree_width=4)
        real.reset(prompt)
        for i in range(len(answer) - 1):
            # (as in a replay: at most the tokens left - 1 nodes, so every depth's target exists)
            ctx = Context(prompt + answer[:i], len(prompt), len(answer) - i - 1, SamplingParams(0.0), None)
            a, b = replayed.propose(ctx), real.propose(ctx)
            assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()
        assert replay_greedy(replayed, prompt, answer, EOS_IDS) == replay_greedy(
            pard.ParallelDraft(merged, mask_ids, draft_len=k, tree_nodes=nodes, tree_width=4), prompt, answer,
            EOS_IDS)


def test_tree_replay_spec_bench_answers_are_the_targets_greedy_answers():
    """pard_tree_replay.py --spec-bench: the answers it replays are our baseline loop's greedy output for
    the first N prompts of each Spec-Bench category (tiny, float32)."""
    from specdec_lib.data import SPEC_BENCH_TASKS, load_prompt_set
    from specdec_lib.decoding import generate
    from specdec_lib.methods import make_proposer
    from specdec_lib.models import EOS_IDS, load_profile
    tool = load_tool("pard_tree_replay")
    models = load_profile("tiny", "cpu", torch.float32)
    got = tool.spec_bench_answers(models, 1, 5)
    prompts = [load_prompt_set(f"spec_bench:{c}", models.tokenizer, 1)[0] for c in SPEC_BENCH_TASKS]
    want = [(p.prompt_ids, generate(models.target, make_proposer("baseline"), p.prompt_ids, 5,
                                    eos_ids=EOS_IDS).tokens) for p in prompts]
    assert got == [w for w in want if len(w[1]) >= 2]
    assert len(got) >= 1
