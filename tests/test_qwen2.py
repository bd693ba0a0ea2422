"""Our Qwen2 forward agrees with transformers' Qwen2ForCausalLM on the same weights."""

import pytest
import torch

from specdec_lib.decoding import prefill
from specdec_lib.tree import root_to_leaf_paths
from tests.helpers import to_transformers, tree_call

TOL = 1e-4  # float32


def run(model, cache, ids, kv_len=None, hidden_layers=()):
    """Feed ids as a chain after the cache's contents and advance it (decoding.prefill)."""
    return prefill(model, torch.as_tensor(ids)[None], cache, hidden_layers, kv_len)


@torch.no_grad()
def check_against_transformers(model, hf, seq):
    ref = hf(torch.tensor([seq])).logits[0]
    # prefill everything but the last 5 tokens, then 5 one-token steps
    cache = model.new_cache(128)
    logits, _ = run(model, cache, seq[:-5])
    steps = [logits[0]]
    for i in range(len(seq) - 5, len(seq)):
        out, _ = run(model, cache, [seq[i]])
        steps.append(out[0])
    ours = torch.cat(steps)
    assert (ours - ref).abs().max().item() <= TOL


def test_prefill_and_steps_match_transformers(tiny_target):
    hf = to_transformers(tiny_target)
    g = torch.Generator().manual_seed(0)
    check_against_transformers(tiny_target, hf, torch.randint(0, 151936, (40,), generator=g).tolist())
    # a prefill of more than 64 tokens takes the fused-attention path
    check_against_transformers(tiny_target, hf, torch.randint(0, 151936, (90,), generator=g).tolist())


def test_hidden_states_match_transformers(tiny_target):
    hf = to_transformers(tiny_target)
    seq = list(range(100, 120))
    with torch.no_grad():
        ref = hf(torch.tensor([seq]), output_hidden_states=True).hidden_states
        n = tiny_target.config.num_hidden_layers
        _, hidden = run(tiny_target, tiny_target.new_cache(32), seq, hidden_layers=(0, 1, n, -1))
    for layer in (0, 1, n):
        assert (hidden[layer][0] - ref[layer][0]).abs().max().item() <= TOL
    assert torch.equal(hidden[-1], hidden[n])


@torch.no_grad()
def test_tree_step_matches_each_path(tiny_target):
    """One forward over a tree == transformers over prefix + each root-to-leaf path on its own."""
    hf = to_transformers(tiny_target)
    prefix = list(range(500, 512))
    root = 777
    tokens = [11, 12, 13, 14, 15, 16]
    parents = [-1, 0, 0, -1, 3, 1]   # root -> 11 -> {12 -> 16, 13}; root -> 14 -> 15
    cache = tiny_target.new_cache(64)
    run(tiny_target, cache, prefix)
    # verify rows: 0 = root, i + 1 = node i
    logits, _ = tiny_target(*tree_call(cache, root, tokens, parents))
    for path in root_to_leaf_paths(torch.tensor(parents)):
        seq = prefix + [root] + [tokens[i] for i in path]
        ref = hf(torch.tensor([seq])).logits[0, len(prefix):]
        ours = logits[0, [0] + [i + 1 for i in path]]
        assert (ours - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_static_kv_len_gives_same_logits(tiny_target):
    """Attending over the whole cache (static shapes, for CUDA graphs) changes nothing."""
    seq = list(range(40, 60))
    a, _ = run(tiny_target, tiny_target.new_cache(64), seq)
    b, _ = run(tiny_target, tiny_target.new_cache(64), seq, kv_len=64)
    assert (a - b).abs().max().item() <= 1e-5


def test_real_1_5b_matches_transformers():
    """The real Qwen2.5-Coder-1.5B (from `make models`) against transformers, float32."""
    from specdec_lib.models import gguf_path
    path = gguf_path("target")
    if not path.exists():
        pytest.skip(f"{path.name} not present: run `make models` to include the real 1.5B")
    from transformers import AutoModelForCausalLM
    from specdec_lib.qwen2 import from_transformers
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours = from_transformers(hf, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 151000, (24,), generator=g).tolist()
    check_against_transformers(ours, hf, seq)
    with torch.no_grad():
        cache = ours.new_cache(64)
        run(ours, cache, seq[:16])
        parents = [-1, 0, -1, 2]
        tokens = seq[17:21]
        logits, _ = ours(*tree_call(cache, seq[16], tokens, parents))
        for path in root_to_leaf_paths(torch.tensor(parents)):
            ref = hf(torch.tensor([seq[:17] + [tokens[i] for i in path]])).logits[0, 16:]
            assert (logits[0, [0] + [i + 1 for i in path]] - ref).abs().max().item() <= TOL


def test_training_attention_equals_grouped_attention():
    """attention_for_training (a GPU forward that will be differentiated: kv heads repeated, cuDNN left out,
    because of its masked-backward NaN) computes what grouped_attention does, values and gradients, here
    on the CPU with a tree-like mask and 3 query heads per kv head."""
    from specdec_lib.qwen2 import attention_for_training, grouped_attention
    g = torch.Generator().manual_seed(0)
    B, nh, nkv, T, S, hd = 2, 6, 2, 5, 9, 8
    q = torch.randn(B, nh, T, hd, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, nkv, S, hd, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, nkv, S, hd, generator=g, dtype=torch.float64, requires_grad=True)
    visible = torch.rand(T, S, generator=g) < 0.6
    visible[:, 0] = True                                    # every row sees something
    mask = torch.zeros(T, S, dtype=torch.float64).masked_fill(~visible, float("-inf"))
    outs, grads = [], []
    for fn in (grouped_attention, attention_for_training):
        out = fn(q, k, v, mask)
        outs.append(out)
        grads.append(torch.autograd.grad((out * out.detach().sin()).sum(), (q, k, v)))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)     # grouped_attention scores in float32
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)
