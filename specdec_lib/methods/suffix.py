"""Suffix decoding (Oliaro et al., 2024, arXiv 2411.04975): speculate from what was already written.

A retrieval-based proposer. It keeps two suffix tries over token ids, with occurrence counts:
  - the request trie: the prompt and the output so far of the current request;
  - the global trie: the outputs of earlier requests, at most `cache_size` tokens (oldest evicted).
At each step it finds the longest suffix of the context (up to `max_match` tokens) that was seen
before with a continuation, and grows from there the most probable continuation *tree*, by
empirical frequency: node probability = product of count(child) / count(all children) along the
path. The tree keeps at most max_spec_factor x match_length nodes (longer matches are more
trustworthy, so they may speculate more), never more than `draft_len`, and no node whose
probability is below `min_token_prob`. Of the two candidate trees (request, global) the one with
the larger expected number of accepted tokens (sum of node probabilities) is proposed.

It is not a new decoding rule: the tree goes to the shared verifier (one target forward with a
tree mask), so the output is exactly the target's.

Learning across requests: call `proposer.observe(output_tokens)` after a request to put its full
output in the global cache. If you do not, `reset` of the next request adds the previous output
as far as the proposer saw it (all but the last step's tokens). The harness in experiments.py
calls `observe` after every request.

A trie of depth D: every substring of length <= D of the inserted sequences is a path from the
root, and its node counts how often it occurs. [1, 2, 1, 2] with D = 2:
    1 (2) ── 2 (2)          2 (2) ── 1 (1)
"""
from __future__ import annotations

import heapq
import math
from collections import deque

import torch

from ..tree import Draft


class Node:
    __slots__ = ("count", "children")

    def __init__(self):
        self.count = 0
        self.children: dict[int, Node] = {}


class SuffixTrie:
    """Counts of every substring of length <= max_depth, updated one token at a time."""

    def __init__(self, max_depth: int):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        self.root = Node()
        self.n_nodes = 0

    def extend(self, tokens, open_nodes: list[Node] | None = None) -> list[Node]:
        """Append tokens to a sequence whose open suffixes are `open_nodes`; return the new ones.

        The open nodes are those of the suffixes (shorter than max_depth) that end at the sequence's
        end; each new token extends every one of them by one child, so a token costs O(max_depth).
        """
        nodes = list(open_nodes or [])
        for t in tokens:
            t = int(t)
            grown = []
            for n in [self.root] + nodes:           # the empty suffix, then the longer ones
                child = n.children.get(t)
                if child is None:
                    child = n.children[t] = Node()
                    self.n_nodes += 1
                child.count += 1
                grown.append(child)
            nodes = grown[:self.max_depth - 1]       # grown[k] has depth k + 1; depth D can't grow
        return nodes

    def remove(self, tokens) -> None:
        """Undo `extend(tokens)` of a whole sequence (used to evict it); empty nodes are deleted."""
        tokens = [int(t) for t in tokens]
        for start in range(len(tokens)):
            node = self.root
            for t in tokens[start:start + self.max_depth]:
                child = node.children[t]
                child.count -= 1
                if child.count == 0:                 # nothing below an empty node either
                    self.n_nodes -= _size(child)
                    del node.children[t]
                    break
                node = child

    def find(self, pattern) -> Node | None:
        node = self.root
        for t in pattern:
            node = node.children.get(int(t))
            if node is None:
                return None
        return node

    def count(self, pattern) -> int:
        node = self.find(pattern)
        return 0 if node is None else node.count

    def items(self):
        """(substring tuple, count) for every node, depth first (for tests and the chapter)."""
        stack = [((), self.root)]
        while stack:
            path, node = stack.pop()
            for t, child in node.children.items():
                yield path + (t,), child.count
                stack.append((path + (t,), child))


def _size(node: Node) -> int:
    return 1 + sum(_size(c) for c in node.children.values())


def longest_match(trie: SuffixTrie, tokens: list[int], max_match: int) -> tuple[int, Node | None]:
    """Longest suffix of tokens (<= max_match) found in the trie *with a continuation*.

    Subtle: in the request trie the context's own suffix is always present (it was just inserted),
    but with no child, so "has children" is the test. It is monotone: if a suffix was seen followed
    by something, so was every shorter suffix; we can stop at the first failure.
    """
    best, node_best = 0, None
    for m in range(1, min(max_match, len(tokens)) + 1):
        node = trie.find(tokens[-m:])
        if node is None or not node.children:
            break
        best, node_best = m, node
    return best, node_best


def grow_tree(node: Node, budget: int, min_token_prob: float) -> tuple[list[int], list[int], list[float]]:
    """The most probable continuation tree below `node`, best first, at most `budget` nodes.

    A node's probability is the product of count(child) / sum(counts of its siblings) on its path.
    Best-first: pop the most probable frontier node, add it, push its children. A child is never
    more probable than its parent, so parents are added first (as Draft requires), and once the best
    frontier node is below min_token_prob every remaining one is too.
    Returns tokens, parents (draft indices, -1 = child of the root) and node probabilities.

    Example: after the match we saw "a b" 3 times, "a c" once, "d" once; budget 3:
    a = 4/5 = 0.8, a b = 0.8 * 3/4 = 0.6, a c = 0.2, d = 0.2 -> tokens [a, b, d], parents [-1, 0, -1]
    (d and a c tie at 0.2: the one pushed first wins).
    """
    tokens, parents, probs = [], [], []
    frontier, order = [], 0

    def push(parent_node, parent_idx, parent_prob):
        nonlocal order
        total = sum(c.count for c in parent_node.children.values())
        for t, child in parent_node.children.items():
            p = parent_prob * child.count / total
            heapq.heappush(frontier, (-p, order, t, child, parent_idx))
            order += 1

    push(node, -1, 1.0)
    while frontier and len(tokens) < budget:
        neg_p, _, t, child, parent_idx = heapq.heappop(frontier)
        if -neg_p < min_token_prob:
            break
        tokens.append(t)
        parents.append(parent_idx)
        probs.append(-neg_p)
        if child.children:
            push(child, len(tokens) - 1, -neg_p)
    return tokens, parents, probs


class SuffixProposer:
    hidden_layers = ()
    name = "suffix"

    def __init__(self, draft_len: int = 16, max_spec_factor: float = 1.0, min_token_prob: float = 0.1,
                 max_depth: int = 24, max_match: int | None = None, cache_size: int = 20_000,
                 use_request: bool = True):
        if draft_len < 1:
            raise ValueError(f"draft_len (the hard cap on tree nodes) must be >= 1, got {draft_len}")
        if max_spec_factor <= 0:
            raise ValueError(f"max_spec_factor must be > 0, got {max_spec_factor}")
        if not 0 <= min_token_prob <= 1:
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0 tokens, got {cache_size}")
        max_match = max_depth // 2 if max_match is None else max_match
        if not 1 <= max_match < max_depth:
            raise ValueError(f"max_match must be in [1, max_depth - 1], got {max_match} (max_depth={max_depth})")
        self.draft_len, self.max_spec_factor, self.min_token_prob = draft_len, max_spec_factor, min_token_prob
        self.max_depth, self.max_match, self.cache_size = max_depth, max_match, cache_size
        self.use_request = use_request
        self.global_trie = SuffixTrie(max_depth)
        self.cached: deque[list[int]] = deque()      # outputs in the global trie, oldest first
        self.request_trie = SuffixTrie(max_depth)
        self._open: list[Node] = []
        self._seen: list[int] = []                     # request tokens inserted so far
        self._prompt_len = 0
        self._pending: list[int] | None = None         # output not yet learned into the global cache
        self.last: dict = {}                           # what the last propose did (for the chapter)

    # -- global cache ------------------------------------------------------------------------
    @property
    def cached_tokens(self) -> int:
        return sum(len(s) for s in self.cached)

    def observe(self, output_tokens) -> None:
        """Learn a finished request's output into the global cache, evicting the oldest outputs."""
        seq = [int(t) for t in output_tokens][-self.cache_size:] if self.cache_size else []
        self._pending = None
        if not seq:
            return
        while self.cached and self.cached_tokens + len(seq) > self.cache_size:
            self.global_trie.remove(self.cached.popleft())
        self.global_trie.extend(seq)
        self.cached.append(seq)

    def clear_cache(self) -> None:
        self.global_trie, self.cached, self._pending = SuffixTrie(self.max_depth), deque(), None

    # -- per request -------------------------------------------------------------------------
    def reset(self, prompt_ids) -> None:
        if self._pending:                              # the caller did not call observe(): do it
            self.observe(self._pending)
        prompt = [int(t) for t in prompt_ids]
        self.request_trie = SuffixTrie(self.max_depth)
        self._open = self.request_trie.extend(prompt) if self.use_request else []
        self._seen, self._prompt_len, self._pending = prompt, len(prompt), None

    def _sync(self, tokens: list[int]) -> None:
        """Insert the tokens accepted since the last call (the loop does not call us back)."""
        if tokens[:self._prompt_len] != self._seen[:self._prompt_len]:
            raise ValueError("the context does not start with the prompt given to reset(): call reset first")
        new = tokens[len(self._seen):]
        if self.use_request:
            self._open = self.request_trie.extend(new, self._open)
        self._seen = list(tokens)
        self._pending = self._seen[self._prompt_len:]

    def propose(self, ctx) -> Draft:
        tokens = list(ctx.tokens)
        self._sync(tokens)
        best = None
        for source, trie in (("request", self.request_trie), ("global", self.global_trie)):
            m, node = longest_match(trie, tokens, self.max_match)
            if m == 0:
                continue
            budget = min(self.draft_len, ctx.max_draft, math.floor(self.max_spec_factor * m))
            toks, parents, probs = grow_tree(node, budget, self.min_token_prob)
            score = sum(probs)                         # expected accepted tokens, by the counts
            if toks and (best is None or score > best["score"]):
                best = dict(source=source, match_len=m, score=score, tokens=toks, parents=parents, probs=probs)
        self.last = best or {}
        if best is None:
            return Draft.empty()
        return Draft(torch.tensor(best["tokens"], dtype=torch.long), torch.tensor(best["parents"], dtype=torch.long))


OPTIONS = ("draft_len", "max_spec_factor", "min_token_prob", "max_depth", "max_match", "cache_size", "use_request")


def build(models=None, **options) -> SuffixProposer:
    return SuffixProposer(**options)
