"""The fused GPU kernels compute the same forward as Qwen2.forward (float32, exact cases).

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy, set in
conftest.py before triton is first imported); the module skips where triton is not installed (it is
in requirements.txt for Linux). The interpreter mishandles bfloat16 loads, so the CPU check is
float32; bench_gpu checks bf16 on the GPU (`fused_logit_check`)."""
import os

import pytest
import torch

pytest.importorskip("triton")
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

from specdec_lib.kernels import FusedQwen2, _candidates, linear  # noqa: E402
from specdec_lib.qwen2 import Qwen2Config, random_model  # noqa: E402
from specdec_lib.tree import Draft, chain_inputs, step_inputs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("T", [1, 2, 3, 8, 16])
def test_linear_variants(T):
    """Every launch configuration the tuner may pick computes the same thing."""
    for config in _candidates(T, itemsize=4):      # float32 here
        _check_linear(T, config)


@pytest.mark.parametrize("T", [5, 16])
def test_linear_split_k(T):
    """Split-K (partial sums over slices of K, then one sum kernel) with 2, 4 and 8 slices: K = 296 in
    tiles of 32 inputs (the tile size the float32 candidates use); norm, bias, SwiGLU, residual, and
    attention's output read in place."""
    for split, bk in ((2, 32), (4, 32), (8, 32), (4, 64)):
        _check_linear(T, ("splitk", split, 16, 16, bk, 4, 1), K=296)


def _check_linear(T, config, K=40):
    g = torch.Generator().manual_seed(T)
    x, w = torch.randn(T, K, generator=g), torch.randn(24, K, generator=g)
    b, r, nw = torch.randn(24, generator=g), torch.randn(T, 24, generator=g), torch.rand(K, generator=g) + 0.5
    to = lambda *ts: [t.to(DEV) for t in ts]  # noqa: E731
    x, w, b, r, nw = to(x, w, b, r, nw)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw
    torch.testing.assert_close(linear(x, w, bias=b, norm=nw, config=config), xn @ w.T + b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(linear(x, w, residual=r, config=config), r + x @ w.T, atol=1e-4, rtol=1e-4)
    gate, up = (xn @ w.T).chunk(2, dim=-1)
    torch.testing.assert_close(linear(x, w, norm=nw, swiglu=True, config=config), torch.nn.functional.silu(gate) * up,
                               atol=1e-4, rtol=1e-4)
    # attention output [1, nh, T, hd] read in place as [T, nh * hd]
    att = torch.randn(1, K // 8, T, 8, generator=g).to(DEV)
    flat = att.transpose(1, 2).reshape(T, K)
    torch.testing.assert_close(linear(att, w, head_dim=8, config=config), flat @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_fused_forward_matches_reference(attention):
    model = random_model(CONFIG, seed=3, std=0.1).to(DEV)
    fused = FusedQwen2(model, attention=attention)
    ref_cache, cache = model.new_cache(64), model.new_cache(64)
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    pos, slots, mask = chain_inputs(0, 9, 64, DEV)
    for c in (ref_cache, cache):               # prefill both caches the plain way
        model(prompt, pos, c, mask, slots, logits=False)
        c.length = 9
    # a 1-token decode step, then a 5-node tree step (T = 6): logits, hidden states and cache rows agree
    for draft in (Draft.empty(), Draft(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([-1, 0, 0, 1, 3]))):
        ids = torch.cat([torch.tensor([11]), draft.tokens])[None].to(DEV)
        pos, slots, mask = step_inputs(ref_cache.length, draft.parents, 64, DEV)
        want, wh = model(ids, pos, ref_cache, mask, slots, hidden_layers=(1, -1))
        got, gh = fused(ids, pos, cache, mask, slots, hidden_layers=(1, -1))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        for k in wh:
            torch.testing.assert_close(gh[k], wh[k], atol=2e-5, rtol=1e-4)
        n = ref_cache.length + ids.shape[1]
        torch.testing.assert_close(cache.k[:, :, :, :n], ref_cache.k[:, :, :, :n], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(cache.v[:, :, :, :n], ref_cache.v[:, :, :, :n], atol=2e-5, rtol=1e-4)
        ref_cache.keep(ref_cache.length, [0])
        cache.keep(cache.length, [0])


def test_fused_rejects_long_steps():
    model = random_model(CONFIG, seed=3).to(DEV)
    ids = torch.zeros(1, 17, dtype=torch.long, device=DEV)
    pos, slots, mask = chain_inputs(0, 17, 32, DEV)
    with pytest.raises(ValueError, match="at most 16"):
        FusedQwen2(model)(ids, pos, model.new_cache(32), mask, slots)


def test_greedy_chain_through_fused_kernels_equals_baseline():
    from specdec_lib.cuda_graphs import GreedyChain
    from specdec_lib.decoding import generate
    from specdec_lib.methods import make_proposer
    model = random_model(CONFIG, seed=4, std=0.1).to(DEV)
    prompt = list(range(3, 20))
    ref = generate(model, make_proposer("baseline"), prompt, 12).tokens
    chain = GreedyChain(FusedQwen2(model), model.new_cache(64), DEV)
    assert chain.generate(model, prompt, 12).tokens == ref


@pytest.mark.parametrize("T,S", [(1, 150), (6, 70), (16, 64)])
def test_attention_matches_reference(T, S):
    """Tree-masked grouped-query attention over the cache, incl. splits a row cannot see at all."""
    from specdec_lib.kernels import attention
    from specdec_lib.qwen2 import grouped_attention
    g = torch.Generator().manual_seed(T)
    nh, nkv, hd, max_len = 6, 2, 16, 160
    q = torch.randn(1, nh, T, hd, generator=g)
    k, v = torch.randn(1, nkv, max_len, hd, generator=g), torch.randn(1, nkv, max_len, hd, generator=g)
    visible = torch.rand(T, S, generator=g) < 0.5
    visible[:, 0] = True
    visible[0, 1:] = False          # row 0 sees only slot 0: every later split is empty for it
    mask = torch.zeros(T, S).masked_fill(~visible, float("-inf"))
    want = grouped_attention(q, k[:, :, :S], v[:, :, :S], mask)
    got = attention(q.to(DEV), k.to(DEV), v.to(DEV), mask.to(DEV)).cpu()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters."""
    seen = {}
    for p in model.parameters():
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def test_fusing_keeps_one_copy():
    """q/k/v and gate/up become views of one tensor each: no bytes added, fusing twice is free, and
    the plain forward still computes the same logits (also when fused inside inference mode)."""
    model = random_model(CONFIG, seed=5, std=0.1).to(DEV)
    ids = torch.tensor([[1, 2, 3]], device=DEV)
    pos, slots, mask = chain_inputs(0, 3, 16, DEV)
    before, _ = model(ids, pos, model.new_cache(16), mask, slots)
    nbytes = _storage_bytes(model)
    with torch.inference_mode():
        f1 = FusedQwen2(model)
    f2 = FusedQwen2(model)
    assert _storage_bytes(model) == nbytes
    a = model.model.layers[0].self_attn
    for f in (f1, f2):
        assert f.layers[0]["wqkv"].data_ptr() == a.q_proj.weight.data_ptr()
        assert f.layers[0]["wgu"].data_ptr() == model.model.layers[0].mlp.gate_proj.weight.data_ptr()
    after, _ = model(ids, pos, model.new_cache(16), mask, slots)
    torch.testing.assert_close(after, before)


def test_linear_rejects_bad_input():
    x, w = torch.randn(3, 8, device=DEV), torch.randn(8, 6, device=DEV)
    with pytest.raises(ValueError, match="contiguous"):
        linear(x, w.T)
    with pytest.raises(ValueError, match="inputs"):
        linear(x, torch.randn(4, 6, device=DEV))
    with pytest.raises(ValueError, match="at most 16"):
        linear(torch.randn(17, 8, device=DEV), torch.randn(4, 8, device=DEV))


def test_runner_drops_fused_kernels_for_a_failed_bucket():
    """A bucket whose fused kernels failed in the runner's warm-up (GPU only) is run by the plain
    forward: the variants it may use no longer include "fused"; the others keep both."""
    from specdec_lib.cuda_graphs import GraphRunner
    model = random_model(CONFIG, seed=0).to(DEV)
    r = GraphRunner(model, 64, buckets=(1, 2), fused=True)
    assert r._variants(1) == r._variants(2) == ("fused", "plain")
    r.fused_failed[2] = "CompilationError: (simulated)"
    assert r._variants(2) == ("plain",) and r._variants(1) == ("fused", "plain")
