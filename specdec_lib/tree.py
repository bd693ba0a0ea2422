"""Drafts (a chain or a tree of proposed tokens) and the inputs one verify forward needs.

A draft of N nodes is `tokens [N]` and `parents [N]`: parents[i] is the index of node i's parent
inside the draft, or -1 when its parent is the root (the newest accepted token, not yet fed to
the target). Parents come before children. A chain of g tokens has parents [-1, 0, 1, ..., g-2].

The verify forward feeds T = N + 1 tokens: row 0 is the root, row i + 1 is node i.

    root ── a ── b          tokens  [a, b, c]      rows: 0=root 1=a 2=b 3=c
        └── c               parents [-1, 0, -1]    depth: a=1 b=2 c=1
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draft:
    tokens: torch.Tensor                 # [N] long
    parents: torch.Tensor                # [N] long, -1 = child of the root
    q: torch.Tensor | None = None        # [N, V]: row i = distribution node i was drawn from (sampling only)
    without_replacement: bool = False    # siblings drawn without replacement: verify drops earlier siblings from q
    known_chain: bool = False            # made by Draft.chain: a chain without reading parents (on the
                                         # GPU its verify inputs need no ancestor closure: fewer launches)
    inputs: tuple | None = None          # (pos [1, T], slots [T], mask [T, kv_len], ids [1, T]) of the verify,
                                         # built with the draft on the GPU (PARD's TreeGraph), or None:
                                         # generate builds them (step_inputs)

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @staticmethod
    def chain(tokens, q=None) -> "Draft":
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        return Draft(tokens, torch.arange(tokens.numel(), device=tokens.device) - 1, q, known_chain=True)

    @staticmethod
    def empty() -> "Draft":
        return Draft.chain([])

    def is_chain(self) -> bool:
        return self.known_chain or bool(torch.equal(self.parents.cpu(), torch.arange(len(self)) - 1))

    def truncate(self, max_nodes: int) -> "Draft":
        """Keep the first max_nodes nodes (parents precede children, so this is still a tree)."""
        if len(self) <= max_nodes:
            return self
        q = None if self.q is None else self.q[:max_nodes]     # (prebuilt verify inputs no longer fit: dropped)
        return Draft(self.tokens[:max_nodes], self.parents[:max_nodes], q, self.without_replacement, self.known_chain)


def validate_parents(parents: torch.Tensor) -> None:
    p = parents.tolist()
    for i, pi in enumerate(p):
        if not -1 <= pi < i:
            raise ValueError(f"parents[{i}] = {pi}: a parent must come before its child (or be -1)")


def ancestors(parents: torch.Tensor) -> torch.Tensor:
    """[N] parents -> [N+1, N+1] bool; A[i, j] = row j is row i itself or one of its ancestors.

    Rows are the verify rows (0 = root). Example, parents [-1, 0, -1]:
        root [1 0 0 0]
        a    [1 1 0 0]
        b    [1 1 1 0]
        c    [1 0 0 1]
    """
    parents = parents.cpu()
    validate_parents(parents)
    n = parents.numel() + 1
    anc = torch.eye(n, dtype=torch.bool)
    for i, pi in enumerate(parents.tolist()):  # parents come first, so their row is complete
        anc[i + 1] |= anc[pi + 1]
    return anc


def ancestors_closure(parents: torch.Tensor) -> torch.Tensor:
    """ancestors() without leaving the parents' device: no loop over nodes, no copy to the host.

    For a tree built on the GPU (PARD's, with device_tree=True): the verify inputs are then built
    there too and the target's forward is queued behind the drafter's without the host waiting for
    either. Start from "itself or its parent" and square the reachability matrix: after j squarings
    a row sees every ancestor up to 2^j levels up, so ceil(log2(N)) squarings reach the root from
    any depth <= N.
    Same result as ancestors() (tests/test_tree.py); parents are trusted (the builder guarantees
    that they come first), since checking them would need the host.
    """
    n = parents.numel() + 1
    rows = torch.arange(n, device=parents.device)
    up = torch.cat([rows[:1], parents.long() + 1])                  # [N+1] verify row of each row's parent
    reach = ((rows[None, :] == up[:, None]) | (rows[None, :] == rows[:, None])).float()
    for _ in range(max(n - 1, 1).bit_length()):
        reach = ((reach @ reach) > 0).float()                         # exact: 0/1 entries, n <= a few hundred
    return reach > 0


def depths(parents: torch.Tensor) -> torch.Tensor:
    """[N] parents -> [N+1] depth of each verify row (root = 0)."""
    return ancestors(parents).sum(1) - 1


def attention_mask(cache_len: int, anc: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
    """[T, kv_len] bool: row i sees every cached slot (< cache_len) and the new slots of its ancestors.

    New row i is written at slot cache_len + i. kv_len defaults to cache_len + T; a larger value
    (e.g. the whole cache, for static shapes on a GPU) adds columns nobody sees. Columns are compared
    with cache_len, never sliced by it, so cache_len may also be a number on the GPU (PARD's recorded
    tree step: the shapes then do not depend on its value; kv_len must be given).
    """
    T = anc.shape[0]
    kv_len = cache_len + T if kv_len is None else kv_len
    col = torch.arange(kv_len, device=anc.device) - cache_len      # < 0: a cached slot, 0..T-1: new row
    new = (col >= 0) & (col < T)
    return (col < 0)[None] | (anc[:, col.clamp(0, T - 1)] & new[None])


def step_inputs(cache_len: int, draft_parents: torch.Tensor, kv_len: int | None = None, device="cpu"):
    """Everything the verify forward needs besides token ids, for a draft with these parents.

    Returns pos [1, T] (cache_len + depth), slots [T] (cache_len + row) and the mask [T, kv_len].
    Parents on the GPU (a draft built there) give inputs built there, by device ops only.
    """
    anc = ancestors(draft_parents) if draft_parents.device.type == "cpu" else ancestors_closure(draft_parents)
    T = anc.shape[0]
    pos = (cache_len + anc.sum(1) - 1)[None]
    slots = cache_len + torch.arange(T, device=anc.device)
    mask = attention_mask(cache_len, anc, kv_len)
    return pos.to(device), slots.to(device), mask.to(device)


def chain_inputs(cache_len: int, T: int, kv_len: int | None = None, device="cpu"):
    """step_inputs for T tokens in a row (prefill, or the baseline's one-token step): causal mask.
    Built on `device` by tensor ops (no copy from the host: on a GPU a copy would wait for it)."""
    rows = torch.arange(T, device=device)
    anc = rows[:, None] >= rows[None, :]
    pos = (cache_len + rows)[None]
    return pos, cache_len + rows, attention_mask(cache_len, anc, kv_len)


def root_to_leaf_paths(parents: torch.Tensor) -> list[list[int]]:
    """Node indices of every root-to-leaf path. parents [-1, 0, -1] -> [[0, 1], [2]]."""
    p = parents.tolist()
    has_child = set(x for x in p if x >= 0)
    paths = []
    for leaf in range(len(p)):
        if leaf in has_child:
            continue
        path, node = [], leaf
        while node >= 0:
            path.append(node)
            node = p[node]
        paths.append(path[::-1])
    return paths


def children(parents: torch.Tensor) -> dict[int, list[int]]:
    """parent row -> its child nodes, in draft order; -1 is the root. [-1, 0, -1] -> {-1: [0, 2], 0: [1]}."""
    out: dict[int, list[int]] = {}
    for i, pi in enumerate(parents.tolist()):
        out.setdefault(pi, []).append(i)
    return out
