"""The GPU check that can fail: every graph / fused path against the eager forward, in float32.

    python tools/gpu_check.py          on a GPU (~1-2 min); exit status 1 if anything disagrees
    python tools/gpu_check.py --cpu    the same checks on a CPU: the runner in its CPU mode (eager
                                       forwards in the padded buckets), the fused kernels in Triton's
                                       interpreter, no torch.compile; smaller model (a few minutes)

Checks, each printed as `ok` / `FAIL`:
1. the fused kernels (every launch configuration the tuner may pick) against torch, T = 1, 2, 3, 8, 16;
2. one copy: fusing adds no parameter bytes;
3. for each way a GraphRunner can run a step (plain graphs, compiled graphs, fused graphs): the logits,
   hidden states and cache rows of every bucket size, including steps that are padded (T = 3, 5, 7, 9,
   17, 33, ...), a step in a catch-up bucket (T = 100 in 128) and a tree step, equal the eager forward
   on the same cache (relative error <= 2e-4);
4. end to end: our baseline, a noisy tree oracle and a chain oracle through each runner, and the
   device-fed GreedyChain, give the eager baseline's tokens; the draft model proposing through its own
   graphs (GraphDraft, the prompt fed in a catch-up bucket) proposes exactly what the eager one does;
5. EAGLE-3's greedy proposal replayed from its CUDA graph (ProposeGraph: the context read padded to
   depth + 1 rows, then the tree) proposes, step by step, the same trees as the eager path (a random
   drafter on the tiny target, in float64; on the CPU the recorded function runs eagerly);
6. Medusa's greedy proposal replayed from its CUDA graph (HeadsGraph) proposes the eager path's trees
   (random heads, float64).
"""
import os
import sys

CPU = "--cpu" in sys.argv
if CPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

import pathlib as _pathlib  # noqa: E402
import sys as _sys  # noqa: E402
_sys.path.insert(0, str(_pathlib.Path(__file__).resolve().parents[1]))  # the repository root: runs without an install
from specdec_lib.cuda_graphs import GraphDraft, GraphRunner, GreedyChain  # noqa: E402
from specdec_lib.decoding import generate  # noqa: E402
from specdec_lib.kernels import FusedQwen2, _candidates, linear  # noqa: E402
from specdec_lib.methods import make_proposer  # noqa: E402
from specdec_lib.models import TINY_TARGET  # noqa: E402
from specdec_lib.qwen2 import Qwen2Config, random_model  # noqa: E402
from specdec_lib.tree import Draft, chain_inputs, step_inputs  # noqa: E402

DEV = "cpu" if CPU else "cuda"
if not CPU and not torch.cuda.is_available():
    sys.exit("no CUDA GPU: run with --cpu to check the same paths on the CPU")
torch.backends.cuda.matmul.allow_tf32 = False      # float32 means float32 (the eager reference too)
torch.backends.cudnn.allow_tf32 = False
TOL = 2e-4
failures = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f"  ({detail})" if detail else ""), flush=True)
    if not ok:
        failures.append(name)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# A model with a real model's matrix shapes (the 1.5B's hidden size, heads, MLP) and 2 layers: the
# kernels tile exactly as they would on the real model. On the CPU: tiny shapes.
SHAPES = Qwen2Config(vocab_size=2048, hidden_size=1536, intermediate_size=8960, num_hidden_layers=2,
                     num_attention_heads=12, num_key_value_heads=2) if not CPU else \
    Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)

# 1. the linear kernel, every configuration
g = torch.Generator().manual_seed(0)
for T in (1, 2, 3, 8, 16):
    x, w = torch.randn(T, 96, generator=g).to(DEV), torch.randn(48, 96, generator=g).to(DEV)
    nw, b = (torch.rand(96, generator=g) + 0.5).to(DEV), torch.randn(48, generator=g).to(DEV)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw
    cands, worst, skipped = _candidates(T, w.element_size()), 0.0, 0    # the tuner's float32 candidates
    for c in cands:
        try:
            worst = max(worst, rel(linear(x, w, bias=b, norm=nw, config=c), xn @ w.T + b),
                        rel(linear(x, torch.cat([w, w]), norm=nw, swiglu=True, config=c),
                            torch.nn.functional.silu(xn @ w.T) * (xn @ w.T)))
        except triton.runtime.errors.OutOfResources:    # the tuner skips these too
            skipped += 1
    check(f"linear kernel, T={T}, {len(cands) - skipped} of {len(cands)} configurations (incl. swap-AB)",
          worst <= TOL and skipped < len(cands), f"worst rel. error {worst:.1e}; {skipped} do not fit this GPU")

# 2. one copy of the fused weights
model = random_model(SHAPES, seed=3, std=0.05, device=DEV)


def storage_bytes(m) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in m.parameters()}.values())


before = storage_bytes(model)
FusedQwen2(model)
FusedQwen2(model)
check("fusing twice adds no parameter bytes", storage_bytes(model) == before, f"{before} -> {storage_bytes(model)}")

# 3. each runner variant, bucket by bucket, against the eager forward on the same cache
L, MAX_LEN = 37, 200
prompt = torch.randint(0, SHAPES.vocab_size, (1, L), generator=g).to(DEV)
variants = [("plain graphs", dict()), ("fused graphs", dict(fused=True, only="fused"))]
if not CPU:
    variants.insert(1, ("compiled graphs", dict(compile=True, only="plain")))
steps = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 64, 100]     # 100: the catch-up bucket 128
with torch.inference_mode():
    for label, kw in variants:
        runner = GraphRunner(model, MAX_LEN, hidden_layers=(1, -1), catchup=(128,), **kw).capture()
        ref = model.new_cache(MAX_LEN)
        pos, slots, mask = chain_inputs(0, L, MAX_LEN, DEV)
        for c in (runner.cache, ref):
            model(prompt, pos, c, mask, slots, logits=False)
            c.length = L
        worst, bad = 0.0, []
        for T in steps + ["tree", "tree on the device"]:
            if str(T).startswith("tree"):
                parents = torch.tensor([-1, 0, 0, 1, 3])   # root's children 0 and 1, a chain under 0
                ids = torch.randint(0, SHAPES.vocab_size, (1, 6), generator=g)
            else:
                parents = torch.arange(T - 1) - 1
                ids = torch.randint(0, SHAPES.vocab_size, (1, T), generator=g)
            if T == "tree on the device":     # a draft built on the GPU: inputs built and written there
                ids = ids.to(DEV)
                pos, slots, mask = step_inputs(L, parents.to(DEV), MAX_LEN, DEV)
            else:
                pos, slots, mask = step_inputs(L, parents, MAX_LEN, "cpu")    # the runner takes host inputs
            got, gh = runner(ids, pos, runner.cache, mask, slots, (1, -1))
            want, wh = model(ids.to(DEV), pos.to(DEV), ref, mask.to(DEV), slots.to(DEV), (1, -1))
            n = ids.shape[1]
            errs = [rel(got, want), rel(gh[1], wh[1]), rel(gh[-1], wh[-1]),
                    rel(runner.cache.k[:, :, :, L:L + n], ref.k[:, :, :, L:L + n]),
                    rel(runner.cache.v[:, :, :, L:L + n], ref.v[:, :, :, L:L + n]),
                    rel(runner.cache.k[:, :, :, :L], ref.k[:, :, :, :L])]        # padding wrote nothing below
            worst = max(worst, *errs)
            if max(errs) > TOL:
                bad.append(str(T))
        used = sorted(set(runner.variant.values()))
        check(f"{label}: logits, hidden states, cache rows for T = {', '.join(map(str, steps))}, tree, "
              f"tree on the device "
              f"(buckets {runner.all_buckets}; ran {'/'.join(used)})", not bad,
              f"worst rel. error {worst:.1e}" + (f"; bad T: {', '.join(bad)}" if bad else ""))
        del runner

class OnDevice:
    """Passes a proposer through with its drafts moved to the GPU, as PARD's tree is built there: the
    verify inputs are then built on the device and the verdict is read back with the draft."""

    def __init__(self, inner):
        self.inner, self.name, self.hidden_layers = inner, inner.name, inner.hidden_layers

    def reset(self, prompt_ids):
        self.inner.reset(prompt_ids)

    def propose(self, ctx):
        d = self.inner.propose(ctx)
        return Draft(d.tokens.to(DEV), d.parents.to(DEV), known_chain=d.known_chain) if len(d) else d


# 4. end to end, token for token (float32; a tiny random model with the real vocabulary on the GPU, a
#    300-token vocabulary on the CPU, where the interpreted LM-head kernel would be slow)
target = random_model(TINY_TARGET if not CPU else SHAPES, seed=0, device=DEV)
V = target.config.vocab_size
p = [10 + (7 * i) % 250 for i in range(100)]
N = 40
base = make_proposer("baseline")
ref = generate(target, base, p, N).tokens
for label, kw in variants:
    runner = GraphRunner(target, 256, **kw).capture()
    run = dict(forward=runner, kv_len=256, cache=runner.cache)
    tree = make_proposer("oracle", continuations={tuple(p): ref}, draft_len=6, error_rate=0.3, branches=3, seed=1,
                         vocab_size=V)
    chain2 = make_proposer("oracle", continuations={tuple(p): ref}, draft_len=2, error_rate=0.2, seed=2, vocab_size=V)
    outs = {"baseline": generate(target, base, p, N, **run).tokens,
            "noisy tree oracle": generate(target, tree, p, N, **run).tokens,
            "noisy tree oracle, its drafts left on the GPU": generate(target, OnDevice(tree), p, N, **run).tokens,
            "noisy chain oracle (g=2, padded to 4)": generate(target, chain2, p, N, **run).tokens,
            "noisy chain oracle, its drafts left on the GPU": generate(target, OnDevice(chain2), p, N, **run).tokens}
    chain = GreedyChain(runner.step_forward(1), runner.cache, DEV)
    if not CPU:
        chain.capture()
    outs["device-fed GreedyChain"] = chain.generate(target, p, N).tokens
    for name, toks in outs.items():
        check(f"{label}: {name} == eager baseline", toks == ref,
              "" if toks == ref else f"first difference at token {next(i for i, (a, b) in enumerate(zip(toks, ref)) if a != b) if any(a != b for a, b in zip(toks, ref)) else min(len(toks), len(ref))}")
    del runner, chain

# the target drafting for itself: every draft token should be accepted, so a draft the graphs got
# wrong shows up in the acceptance counts
draft = random_model(target.config, seed=0, device=DEV)
eager_dm = make_proposer("draft_model", draft=draft, draft_len=4, target_vocab=V)
e = generate(target, eager_dm, p, N)
check("eager self-draft accepts every draft token", all(s.accepted == s.proposed for s in e.steps))
for label, kw in variants:
    draft_runner = GraphRunner(draft, 320, buckets=(1, 2, 4), catchup=(128,), **kw).capture()
    dm = make_proposer("draft_model", draft=GraphDraft(draft_runner), draft_len=4, target_vocab=target.config.vocab_size)
    r = generate(target, dm, p, N)
    same = r.tokens == ref and [s.accepted for s in r.steps] == [s.accepted for s in e.steps]
    check(f"{label}: draft model through its own graphs proposes what the eager draft model does", same,
          f"accepted per step {[s.accepted for s in r.steps][:8]} vs {[s.accepted for s in e.steps][:8]}")
    del draft_runner

# PARD's tree with the target as its own drafter (its depth-1 row is the target's next token, so every step
# accepts at least one; the last ids of the vocabulary serve as masks), built on the host and recorded as one
# graph with its verify inputs (TreeGraph, prediction 26): the same trees, so the same acceptance step by step,
# and both the target's greedy output
from specdec_lib.methods.pard import ParallelDraft  # noqa: E402
pard_masks = [V - 7 + i for i in range(7)]
for label, kw in variants:
    runner = GraphRunner(target, 256, **kw).capture()
    run = dict(forward=runner, kv_len=256, cache=runner.cache)
    res = {}
    # the tree built on the host; recorded as one graph; and (GPU only) compiled before it is recorded
    for how in ("host", "graph") + (() if CPU else ("compiled",)):
        prop = ParallelDraft(target, pard_masks, draft_len=4, tree_nodes=7, device_tree=how != "host",
                             compile_tree=how == "compiled")
        r = generate(target, prop, p, N, **run)
        recorded = how == "host" or CPU or any(g.graph is not None for g in prop.graphs.values())
        res[how] = (r.tokens, [s.accepted for s in r.steps], recorded)
    for how in res:
        if how == "host":
            continue
        same = res[how][:2] == res["host"][:2] and res["host"][0] == ref and res[how][2]
        check(f"{label}: PARD's tree of 7 {'by TreeGraph, eagerly' if CPU else 'recorded as one graph'}"
              f"{', compiled' if how == 'compiled' else ''} accepts what the host's tree does, step by step, "
              "and == eager baseline", same, f"accepted {res[how][1][:8]} vs {res['host'][1][:8]}")
    del runner

# 5. EAGLE-3: the whole proposal replayed from one CUDA graph against the eager path, draft by draft
from specdec_lib.methods.eagle3 import (Eagle3Drafter, Eagle3Proposer, ProposeGraph, default_layers,  # noqa: E402
                                         drafter_sizes)


class Recorder:
    """Passes a proposer through and keeps every draft it made (tokens and parents)."""

    def __init__(self, inner):
        self.inner, self.drafts = inner, []
        self.hidden_layers, self.name = inner.hidden_layers, inner.name

    def reset(self, prompt_ids):
        self.inner.reset(prompt_ids)

    def propose(self, ctx):
        d = self.inner.propose(ctx)
        self.drafts.append((d.tokens.tolist(), d.parents.tolist()))
        return d


# subtle: float64 here. The recorded proposal reads the context padded to depth + 1 rows, and a matrix
# product over more rows rounds differently (~1e-6 in float32): with a random drafter's near-ties that
# can pick other (equally good) children. In float64 it cannot, so any difference is a real one.
import copy  # noqa: E402
t64 = copy.deepcopy(target).double()
c = t64.config
torch.manual_seed(5)
drafter = Eagle3Drafter(c.hidden_size, default_layers(c.num_hidden_layers), draft_vocab=min(V, 4096),
                        **drafter_sizes(c.hidden_size, c.head_dim)).to(DEV, torch.float64).eval()
with torch.no_grad():                   # make the drafter's layer matter (its default init is small)
    for w in drafter.parameters():
        w.add_(torch.randn_like(w) * 0.2)
ref64 = generate(t64, base, p, N).tokens
eagle_runs = {}
# (graph, compiled): eager; the recorded proposal; on a GPU also with the layer through torch.compile
# ("layer") and with the whole recorded proposal through it ("proposal")
for graph, compiled in [(False, False), (True, False)] + ([] if CPU else [(True, "layer"), (True, "proposal")]):
    prop = Recorder(Eagle3Proposer(drafter, t64.model.embed_tokens.weight, t64.lm_head.weight, top_k=4,
                                   depth=4, total_tokens=12, graph=graph, compile_block=compiled == "layer",
                                   compile_proposal=compiled == "proposal"))
    if CPU and graph:                   # no CUDA graph here: the recorded function runs eagerly
        prop.inner.graph = ProposeGraph()
    r = generate(t64, prop, p, N)
    eagle_runs[graph, compiled] = (r.tokens, prop.drafts,
                                   prop.inner.graph is not None and not prop.inner.graph.failed)
eager_toks, eager_drafts, _ = eagle_runs[False, False]
check("eagle3: eager proposal == eager baseline (float64)", eager_toks == ref64)
for (graph, compiled), (toks, drafts, replayed) in eagle_runs.items():
    if not graph:
        continue
    how = "replayed from its CUDA graph" if not CPU else "run eagerly"
    check(f"eagle3: the proposal (padded context read + tree{f', compiled {compiled}' if compiled else ''}) {how}"
          " proposes the eager path's trees, step by step", toks == ref64 and drafts == eager_drafts and replayed,
          f"{sum(a == b for a, b in zip(drafts, eager_drafts))} of {len(eager_drafts)} drafts equal")

from specdec_lib.methods.medusa import Medusa, MedusaHeads, sparse_tree  # noqa: E402

torch.manual_seed(6)
heads = MedusaHeads(c.hidden_size, n_heads=3, rank=8).to(DEV, torch.float64)
with torch.no_grad():                   # random heads (U starts at zero: each head would be the target)
    for w in heads.parameters():
        w.copy_(torch.randn_like(w) * 0.3)
template = sparse_tree([[0.5, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.1]], 15)
medusa_runs = {}
for graph in (False, True):
    prop = Recorder(Medusa(heads, t64.lm_head.weight, c.num_hidden_layers, template))
    if not graph:
        prop.inner.graph = None         # every step through the eager fill_greedy
    r = generate(t64, prop, p, N)
    medusa_runs[graph] = (r.tokens, prop.drafts)
replayed = CPU or (prop.inner.graph.graph is not None and not prop.inner.graph.failed)   # the graph run's
check("medusa: the proposal " + ("replayed from its CUDA graph" if not CPU else "from its buffer, run eagerly")
      + " proposes the eager path's trees, step by step (float64)",
      medusa_runs[True] == medusa_runs[False] and medusa_runs[False][0] == ref64 and replayed,
      f"{sum(a == b for a, b in zip(medusa_runs[True][1], medusa_runs[False][1]))} of "
      f"{len(medusa_runs[False][1])} drafts equal")

print("ALL OK" if not failures else f"FAILED: {len(failures)} check(s): " + "; ".join(failures))
sys.exit(1 if failures else 0)
