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

Back-off (cost_curve=...): the counts say how often a continuation followed in the text, not
how often the target will agree. A tally per (trie, match length) learns a factor a, "the target
follows a continuation of count-probability r with probability a * r", from every step: the
last step's trees (all their nodes, sent or not) are walked along the tokens the target wrote.
A node's path is then accepted with probability a^depth * (its count probability), and the
proposer sends the best-first prefix of k nodes (maybe none) that maximises expected tokens per
verify cost, E(k) / c(k + 1), on this machine's curve. Like the global cache, the tally carries
over between requests.

A trie of depth D: every substring of length <= D of the inserted sequences is a path from the
root, and its node counts how often it occurs. [1, 2, 1, 2] with D = 2:
    1 (2) ── 2 (2)          2 (2) ── 1 (1)
"""
from __future__ import annotations

import heapq
import math
from collections import deque

import torch

from ..costmodel import AcceptanceTally, best_prefix, cost_list
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


def tree_gains(parents: list[int], probs: list[float], a: float) -> list[float]:
    """gains[k] = expected tokens emitted when the first k nodes (best-first order) are sent:
    1 (the bonus token) + the sum over those nodes of a^depth * (the node's count probability).

    The tree of grow_tree's docstring, parents [-1, 0, -1], probs [0.8, 0.6, 0.2], a = 0.5
    -> [1, 1.4, 1.55, 1.65] (0.5 * 0.8, then 0.25 * 0.6, then 0.5 * 0.2).
    """
    depth, gains = [], [1.0]
    for parent, p in zip(parents, probs):
        depth.append(1 if parent < 0 else depth[parent] + 1)
        gains.append(gains[-1] + a ** depth[-1] * p)
    return gains


def check_tree(tokens: list[int], parents: list[int], probs: list[float], appended: list[int]
               ) -> tuple[int, float]:
    """(accepted, tried): walk a candidate tree along the tokens the target wrote since.

    At each level the target's token is one of the children there (accepted += 1, go down) or not
    (stop); tried += the count probability r of those children (r = p(child) / p(parent)). If
    the target follows a child with probability a * r, accepted / tried estimates a; a chain
    (every r = 1) counts like ngram.check_candidate. The tree above, target wrote [a, c]: level 1
    tried 0.8 + 0.2 = 1, a accepted; level 2 tried 0.6 / 0.8 = 0.75, c is no child -> (1, 1.75).
    """
    accepted, tried, node = 0, 0.0, -1
    for t in appended:
        kids = [i for i, p in enumerate(parents) if p == node]
        if not kids:
            break
        tried += sum(probs[i] for i in kids) / (probs[node] if node >= 0 else 1.0)
        node = next((i for i in kids if tokens[i] == t), None)
        if node is None:
            break
        accepted += 1
    return accepted, tried


def match_bucket(source: str, m: int) -> tuple[str, int]:
    """The tally's bucket: the trie and the match length in powers of two (1, 2-3, 4-7, 8+), few
    enough buckets that each fills within a few steps, while longer matches (more trustworthy)
    keep their own estimate."""
    return source, min(m.bit_length(), 4)


def prior_acceptance(bucket: tuple[str, int]) -> float:
    """The factor a to assume for a bucket before any evidence, by its match-length class (1, 2-3,
    4-7, 8+): measured by exact replay of the real Qwen2.5-7B's greedy outputs (data/qwen25_7b_greedy,
    eval60, warm cache, both tries alike): 0.35, 0.5, 0.63, 0.96, rounded. Other model, other prompts
    than the Spec-Bench runs it is used on; evidence outweighs it within a few steps."""
    return (0.35, 0.5, 0.65, 0.95)[bucket[1] - 1]


class SuffixProposer:
    hidden_layers = ()
    name = "suffix"

    def __init__(self, draft_len: int = 16, max_spec_factor: float = 1.0, min_token_prob: float = 0.1,
                 max_depth: int = 24, max_match: int | None = None, cache_size: int = 20_000,
                 use_request: bool = True, cost_curve=None):
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
        # back-off (None: send every tree whole): [c(1), ..., c(draft_len + 1)], the acceptance
        # tally (kept across requests), the last step's candidate trees and context length
        self.costs = None if cost_curve is None else cost_list(cost_curve, draft_len + 1)
        if cost_curve is not None:
            self.name = f"suffix(backoff={cost_curve if isinstance(cost_curve, str) else 'curve'})"
        self.tally = AcceptanceTally()
        self._trees: list[dict] = []
        self._last_len = 0

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
        self._trees = []                               # last request's trees say nothing about this one

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
        trees = []                                     # one candidate tree per trie with a match
        for source, trie in (("request", self.request_trie), ("global", self.global_trie)):
            m, node = longest_match(trie, tokens, self.max_match)
            if m == 0:
                continue
            budget = min(self.draft_len, ctx.max_draft, math.floor(self.max_spec_factor * m))
            toks, parents, probs = grow_tree(node, budget, self.min_token_prob)
            score = sum(probs)                         # expected accepted tokens, by the counts
            if toks:
                trees.append(dict(source=source, match_len=m, score=score, tokens=toks, parents=parents,
                                  probs=probs))
        if self.costs is None:
            best = max(trees, key=lambda t: t["score"], default=None)     # ties: the request trie's
        else:
            best = self._back_off(tokens, trees)
        self.last = best or {}
        if best is None:
            return Draft.empty()
        return Draft(torch.tensor(best["tokens"], dtype=torch.long), torch.tensor(best["parents"], dtype=torch.long))

    def _back_off(self, tokens: list[int], trees: list[dict]) -> dict | None:
        """Learn from the last step's trees, then keep the prefix (of either tree) with the most
        expected tokens per verify cost; None when no prefix beats an ordinary step, 1 / c(1)."""
        for t in self._trees:
            self.tally.add(t["key"], *check_tree(t["tokens"], t["parents"], t["probs"], tokens[self._last_len:]))
        best, best_rate = None, 1.0 / self.costs[0]
        for t in trees:
            t["key"] = match_bucket(t["source"], t["match_len"])
            a = self.tally.estimate(t["key"], prior_acceptance(t["key"]))
            gains = tree_gains(t["parents"], t["probs"], a)
            k = best_prefix(gains, self.costs)
            if k and gains[k] / self.costs[k] > best_rate:
                best, best_rate = dict(t, a=a, candidates=len(t["tokens"]), score=gains[k] - 1,
                                       tokens=t["tokens"][:k], parents=t["parents"][:k],
                                       probs=t["probs"][:k]), gains[k] / self.costs[k]
        self._trees, self._last_len = trees, len(tokens)     # whole trees: checked next step
        return best


OPTIONS = ("draft_len", "max_spec_factor", "min_token_prob", "max_depth", "max_match", "cache_size", "use_request",
           "cost_curve")


def build(models=None, **options) -> SuffixProposer:
    return SuffixProposer(**options)
