"""Tree mask, positions and paths on hand-made trees; KV cache rollback and compaction."""
import pytest
import torch

from specdec_lib.decoding import prefill
from specdec_lib.tree import (Draft, ancestors, ancestors_closure, attention_mask, chain_inputs, children,
                              depths, root_to_leaf_paths, step_inputs)
from tests.helpers import tree_call

#  root ── a(0) ── b(1)
#      └── c(2) ── d(3) ── e(4)
#               └── f(5)
PARENTS = torch.tensor([-1, 0, -1, 2, 3, 2])


def test_ancestors_hand_made():
    anc = ancestors(PARENTS).int().tolist()
    assert anc == [
        [1, 0, 0, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0, 0, 0],  # a
        [1, 1, 1, 0, 0, 0, 0],  # b
        [1, 0, 0, 1, 0, 0, 0],  # c
        [1, 0, 0, 1, 1, 0, 0],  # d
        [1, 0, 0, 1, 1, 1, 0],  # e
        [1, 0, 0, 1, 0, 0, 1],  # f
    ]


def test_ancestors_closure_equals_the_loop():
    """The device version (reachability by squaring) on the hand-made tree, a chain of 40, one node,
    and random trees: the same matrix as the loop over nodes."""
    g = torch.Generator().manual_seed(0)
    trees = [PARENTS, torch.arange(40) - 1, torch.tensor([-1])]
    for n in range(2, 30):
        trees.append(torch.tensor([int(torch.randint(-1, i, (), generator=g)) for i in range(n)]))
    for parents in trees:
        assert torch.equal(ancestors_closure(parents), ancestors(parents)), parents.tolist()


def test_chain_inputs_are_a_chains_step_inputs():
    """What generate builds for a Draft.chain on the GPU (chain_inputs) is step_inputs of its parents."""
    d = Draft.chain([5, 6, 7])
    assert d.known_chain and not Draft(d.tokens, d.parents).known_chain and d.truncate(2).known_chain
    for kv_len in (None, 32):
        for a, b in zip(chain_inputs(10, len(d) + 1, kv_len), step_inputs(10, d.parents, kv_len)):
            assert torch.equal(a, b)


def test_depths_positions_slots_mask():
    assert depths(PARENTS).tolist() == [0, 1, 2, 1, 2, 3, 2]
    pos, slots, mask = step_inputs(10, PARENTS)
    assert pos.tolist() == [[10, 11, 12, 11, 12, 13, 12]]
    assert slots.tolist() == list(range(10, 17))
    assert mask.shape == (7, 17)
    assert mask[:, :10].all()                      # everyone sees the cached prefix
    assert mask[6, 10:].int().tolist() == [1, 0, 0, 1, 0, 0, 1]   # f sees root, c, itself
    _, _, full = step_inputs(10, PARENTS, kv_len=32)
    assert full.shape == (7, 32) and not full[:, 17:].any()  # static width adds unseen columns


def test_paths_and_children():
    assert root_to_leaf_paths(PARENTS) == [[0, 1], [2, 3, 4], [2, 5]]
    assert children(PARENTS) == {-1: [0, 2], 0: [1], 2: [3, 5], 3: [4]}


def test_chain_is_lower_triangular():
    d = Draft.chain([5, 6, 7])
    assert d.parents.tolist() == [-1, 0, 1] and d.is_chain()
    assert torch.equal(ancestors(d.parents), torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_bad_parents_raise():
    with pytest.raises(ValueError, match="parent must come before"):
        ancestors(torch.tensor([-1, 2, 0]))


def test_attention_mask_chain_after_cache():
    m = attention_mask(2, torch.tril(torch.ones(2, 2, dtype=torch.bool)))
    assert m.int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_cache_rollback_and_keep(tiny_target):
    cache = tiny_target.new_cache(16)
    # fill slots with their own index so moves are visible
    idx = torch.arange(16, dtype=cache.k.dtype)[None, None, None, :, None]
    cache.k[:] = idx
    cache.v[:] = -idx
    cache.keep(0, list(range(12)))      # 12 slots in place (a chain prefix: nothing moves)
    assert cache.length == 12
    cache.rollback(8)
    assert cache.length == 8
    with pytest.raises(ValueError):
        cache.rollback(9)
    cache.keep(5, [0, 2, 3])            # root at slot 5, accepted path rows 2 and 3
    assert cache.length == 8
    assert cache.k[0, 0, 0, 5:8, 0].tolist() == [5.0, 7.0, 8.0]
    assert cache.v[0, 0, 0, 5:8, 0].tolist() == [-5.0, -7.0, -8.0]
    assert cache.k[0, 0, 0, :5, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


@torch.no_grad()
def test_compacted_cache_equals_fresh_prefill(tiny_target):
    """After verifying a tree and keeping one path, the cache is what a plain prefill would give."""
    prefix, root = [3, 1, 4, 1, 5], 9
    tokens, parents = [20, 21, 22, 23], torch.tensor([-1, -1, 1, 2])   # path: node 1 -> 2 -> 3
    cache = tiny_target.new_cache(32)
    prefill(tiny_target, torch.tensor([prefix]), cache)
    tiny_target(*tree_call(cache, root, tokens, parents.tolist()))
    cache.keep(len(prefix), [0, 2, 3, 4])
    fresh = tiny_target.new_cache(32)
    prefill(tiny_target, torch.tensor([prefix + [root, 21, 22, 23]]), fresh)
    n = cache.length
    assert n == 9
    assert (cache.k[..., :n, :] - fresh.k[..., :n, :]).abs().max() < 1e-5
    assert (cache.v[..., :n, :] - fresh.v[..., :n, :]).abs().max() < 1e-5
