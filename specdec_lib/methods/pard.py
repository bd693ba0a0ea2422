"""PARD: one forward of an adapted draft model proposes k tokens (An et al., 2025, arXiv 2504.18583).

Chapter 2's draft model needs k forwards for k tokens: each guess is fed back before the next.
PARD teaches the same small model to guess *ahead*: after the context it reads k - 1 **mask
tokens** and predicts one token at every row, so one forward gives k proposals:

    fed:      ... x5  x6 | m2  m3  m4          (x6 = the newest token, m_d = mask token of depth d)
    predicts:      x7?     x8? x9? x10?        row of depth d predicts the token d places after x6

Mask tokens are ids the Qwen2.5 vocabulary never uses (its tokenizer has 151,665 real tokens,
its embedding 151,936 rows): depth d is id MASK_ID0 + d - 2, its own learned embedding row.

What is trained (the checkpoint holds only this change; the draft's weights stay frozen):
- low-rank adapters (LoRA: W x + s * B A x, B zero at the start) on chosen projections of every
  block, and the embedding rows of the mask tokens;
- on text only: the loss asks the drafter to predict the text, never a target's hidden states,
  so the one drafter serves every target that shares the tokenizer (PARD calls it
  target-independent).

Training layout (one forward covers every depth). The real tokens x0..x(T-1) come first, causal
as usual; then for depth d = 2..K and anchor j (the last real token seen) a mask row (d, j) at
position j + d - 1 that sees real rows 0..j and the mask rows (2..d, j) of its own anchor: exactly
what it sees at inference. Row (d, j) predicts x(j + d); real row i predicts x(i + 1).
Full training adds (K - 1) mask rows per token: K times the cost of ordinary training.
**Conditional drop-token** (PARD's COD): keep only a fraction of the anchors at each depth,
rate(d) = max(keep^(d-1), keep_min), and keep (d, j) only if (d - 1, j) is kept, because its
attention needs the mask rows before it (one uniform draw u_j per anchor, kept where u_j < rate(d):
rates fall with d, so the kept sets are nested). With keep = 0.5, keep_min = 0.2, K = 8 the
forward has about 2.75 T rows instead of 8 T.

Inference (ParallelDraft): the drafter keeps its KV cache for the accepted context. Each step it
feeds what the cache lacks (the accepted tokens and the bonus) + k - 1 mask tokens in ONE forward,
takes the last k rows as proposals and rolls the mask rows back (moving the cache length). Greedy:
argmax, q = None. Sampling: each depth is drawn independently from its own row, and q holds those
rows: token d is drawn from q_d whatever tokens 1..d-1 were, so min(1, p/q_d) stays exact.

A tree from the same forward (`tree_nodes`): the k rows are one distribution per depth, each
blind to the tokens guessed before it, which is exactly what Medusa's K heads give (chapter 5).
So the same sparse tree applies, ranked by the live probabilities instead of measured accuracies
(`medusa.sparse_tree`): the tree_nodes paths of highest product of probabilities. No extra draft
forward: the cost is a wider verify step, which on a GPU is nearly free up to the bucket the
chain already pays for (a chain of 4 + the root is padded to 8 rows: a 7-node tree costs the same).
Its tokens are picked, not drawn (q = None), so sampling stays lossless through the verifier's
rule for deterministic proposals.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decoding import prefill
from ..qwen2 import Qwen2
from ..sampling import probs_from_logits, sample
from ..tree import Draft, ancestors_closure, attention_mask
from .draft_model import DraftModel, common_prefix_len, fit_vocab

MASK_ID0 = 151665          # first id the Qwen2.5 tokenizer does not use: mask of depth 2
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


# ---------------------------------------------------------------- 1. the mask for training
@dataclass
class Layout:
    """The rows of one training forward: T real rows, then the mask rows. R = T + M rows."""
    anchor: torch.Tensor   # [R] last real token each row has seen (real row i: i)
    depth: torch.Tensor    # [R] 1 for real rows, d for a mask row of depth d
    pos: torch.Tensor      # [R] RoPE position = anchor + depth - 1 (where it sits at inference)
    mask: torch.Tensor     # [R, R] bool, True = row may attend to column

    @property
    def target_index(self) -> torch.Tensor:
        """[R] index of the real token each row predicts: anchor + depth."""
        return self.anchor + self.depth


def parallel_layout(seq_len: int, anchors: list[list[int]]) -> Layout:
    """anchors[d - 2] = anchors j kept at depth d -> the rows and the attention mask of one forward.

    Row r sees column c when c is a real row up to r's anchor, or a mask row of the same anchor
    and no deeper depth (itself included). Example, seq_len 4, anchors [[0, 1], [0]]:
    rows 0-3 real; 4 = (d2, j0) at pos 1; 5 = (d2, j1) at pos 2; 6 = (d3, j0) at pos 2;
    row 6 sees [1 0 0 0 1 0 1]: x0, the depth-2 mask of anchor 0, itself.
    """
    anchor, depth = [list(range(seq_len))], [[1] * seq_len]
    for d, js in enumerate(anchors, start=2):
        js = sorted(int(j) for j in js)
        if js and not (0 <= js[0] and js[-1] + d < seq_len):
            raise ValueError(f"depth {d}: anchors must lie in [0, {seq_len - d}) so that the target exists")
        if d > 2 and not set(js) <= set(anchors[d - 3]):
            raise ValueError(f"depth {d}: every anchor needs its depth {d - 1} mask row (conditional drop)")
        anchor.append(js)
        depth.append([d] * len(js))
    a = torch.tensor([j for part in anchor for j in part], dtype=torch.long)
    dep = torch.tensor([d for part in depth for d in part], dtype=torch.long)
    real_c = (dep == 1)[None, :]
    sees_real = real_c & (a[None, :] <= a[:, None])
    sees_own_masks = ~real_c & (a[None, :] == a[:, None]) & (dep[None, :] <= dep[:, None])
    return Layout(a, dep, a + dep - 1, sees_real | sees_own_masks)


def keep_rate(depth: int, keep: float, keep_min: float) -> float:
    """The fraction of anchors kept at a depth. keep 0.5, keep_min 0.2: d2 0.5, d3 0.25, d4+ 0.2."""
    return max(keep ** (depth - 1), keep_min) if keep < 1 else 1.0


def drop_token_anchors(seq_len: int, max_depth: int, useful: torch.Tensor, keep: float = 0.5,
                       keep_min: float = 0.2, generator: torch.Generator | None = None) -> list[list[int]]:
    """Conditional drop-token: which anchors get mask rows at depths 2..max_depth.

    useful [T] bool: anchor j is worth a row (some depth's target x(j + d) is trained on).
    One uniform u_j per anchor; (d, j) is kept when u_j < keep_rate(d). Rates fall with d, so every
    kept (d, j) has its (d - 1, j): the mask rows it attends to exist. keep = 1: no dropping.
    """
    if not 0 < keep <= 1 or not 0 <= keep_min <= 1:
        raise ValueError(f"need 0 < keep <= 1 and 0 <= keep_min <= 1, got keep={keep}, keep_min={keep_min}")
    u = torch.rand(seq_len, generator=generator)
    out = []
    for d in range(2, max_depth + 1):
        rate = keep_rate(d, keep, keep_min)
        out.append([j for j in range(seq_len - d) if bool(useful[j]) and float(u[j]) < rate])
    return out


# ---------------------------------------------------------------- 2. the adapter
class LoRA(nn.Module):
    """A low-rank change of one projection: delta(x) = scale * (x A^T) B^T. A [r, in], B [out, r]."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in).uniform_(-1, 1) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))   # zero: the adapted model starts as the draft
        self.scale = alpha / rank

    def forward(self, x):
        # computed in x's dtype (bf16 activations, float32 adapter weights)
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale


class LoRALinear(nn.Module):
    """base(x) + lora(x): the frozen projection and its trained change."""

    def __init__(self, base: nn.Linear, lora: LoRA):
        super().__init__()
        self.base, self.lora = base, lora

    def forward(self, x):
        return self.base(x) + self.lora(x)


class MaskEmbedding(nn.Module):
    """The draft's embedding, except ids first_id .. first_id + n - 1 (the mask tokens) read `rows`."""

    def __init__(self, base: nn.Embedding, rows: nn.Parameter, first_id: int):
        super().__init__()
        self.base, self.rows, self.first_id = base, rows, first_id

    def forward(self, ids):
        x = self.base(ids)                                         # [B, T, H]
        slot = ids - self.first_id
        is_mask = (slot >= 0) & (slot < self.rows.shape[0])
        own = self.rows[slot.clamp(0, self.rows.shape[0] - 1)].to(x.dtype)
        return torch.where(is_mask[..., None], own, x)


class PardAdapter(nn.Module):
    """Everything PARD trains: one LoRA per chosen projection per block + the mask embedding rows.

    This module (and only it) goes into the checkpoint; `adapted_model` applies it to a draft.
    """

    def __init__(self, config, rank: int = 8, alpha: float = 16.0, targets=tuple(PROJECTIONS),
                 max_depth: int = 8, mask_id0: int = MASK_ID0):
        super().__init__()
        unknown = set(targets) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown projections {sorted(unknown)}: choose from {', '.join(PROJECTIONS)}")
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2 (depth 1 needs no mask), got {max_depth}")
        if mask_id0 + max_depth - 1 > config.vocab_size:
            raise ValueError(f"mask ids {mask_id0}..{mask_id0 + max_depth - 2} do not fit a vocabulary of "
                             f"{config.vocab_size}: lower max_depth or mask_id0")
        self.settings = dict(rank=rank, alpha=alpha, targets=list(targets), max_depth=max_depth, mask_id0=mask_id0)
        H, I = config.hidden_size, config.intermediate_size
        nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        shapes = {"q_proj": (H, nh * hd), "k_proj": (H, nkv * hd), "v_proj": (H, nkv * hd), "o_proj": (nh * hd, H),
                  "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
        self.layers = nn.ModuleList(
            nn.ModuleDict({name: LoRA(*shapes[name], rank, alpha) for name in targets})
            for _ in range(config.num_hidden_layers))
        self.mask_rows = nn.Parameter(torch.zeros(max_depth - 1, H))   # depth 2..max_depth

    @property
    def max_depth(self) -> int:
        return self.settings["max_depth"]

    @property
    def mask_id0(self) -> int:
        return self.settings["mask_id0"]

    def mask_ids(self, n: int) -> list[int]:
        """The mask tokens of depths 2 .. n + 1."""
        if n > self.max_depth - 1:
            raise ValueError(f"this adapter was trained for depths up to {self.max_depth}: "
                             f"draft_len <= {self.max_depth}")
        return [self.mask_id0 + i for i in range(n)]

    def init_mask_rows(self, embedding: torch.Tensor) -> None:
        """Start every mask row at the mean embedding of the real tokens (a neutral point)."""
        with torch.no_grad():
            mean = embedding[:self.mask_id0].float().mean(0)
            self.mask_rows.copy_(mean.expand_as(self.mask_rows))


def adapted_model(draft: Qwen2, adapter: PardAdapter) -> Qwen2:
    """A Qwen2 that shares every weight of `draft` (nothing copied) and runs the adapter.

    The module tree is copied, the parameters are not (deepcopy with the parameters pre-set in its
    memo), then the chosen projections are wrapped in LoRALinear and the embedding in MaskEmbedding.
    `draft` itself is left unchanged: chapter 2's proposer can still use it in the same session.
    """
    model = copy.deepcopy(draft, memo={id(p): p for p in draft.parameters()})
    for block, loras in zip(model.model.layers, adapter.layers):
        for name, lora in loras.items():
            parent = getattr(block, PROJECTIONS[name])
            setattr(parent, name, LoRALinear(getattr(parent, name), lora))
    model.model.embed_tokens = MaskEmbedding(model.model.embed_tokens, adapter.mask_rows, adapter.mask_id0)
    return model


def final_hidden(model: Qwen2, ids, pos, cache, attn_mask, slots) -> torch.Tensor:
    """[B, T, H] after the final norm (the LM head is applied only to the rows that need it)."""
    n = model.config.num_hidden_layers
    _, hidden = model(ids, pos, cache, attn_mask, slots, hidden_layers=(n,), logits=False)
    return hidden[n]


def merged_model(draft: Qwen2, adapter: PardAdapter) -> Qwen2:
    """A plain Qwen2 with the adapter folded into its weights: W + scale * B A, mask rows in the embedding.

    For inference: no extra matmuls, and anything that runs a Qwen2 (CUDA graphs, the fused GPU
    kernels, which read q_proj.weight directly) runs the drafter. Costs a copy of the changed weights
    (about 1 GB in bf16 for the 0.5B); unchanged ones (norms, unadapted projections) stay shared.
    With tied embeddings the LM head rows of the mask ids change too: the proposer never proposes them.
    """
    # subtle: built outside inference mode even when called inside it (bench_live.live is): the copies
    # would otherwise be inference tensors, and the fused GPU path (kernels.one_copy) rebinds their .data
    # to a normal tensor, after which a plain forward fails ("Inference tensors do not track version counter")
    with torch.inference_mode(False), torch.no_grad():
        changed = {id(draft.model.embed_tokens.weight)}
        for block, loras in zip(draft.model.layers, adapter.layers):
            for name in loras:
                changed.add(id(getattr(getattr(block, PROJECTIONS[name]), name).weight))
        model = copy.deepcopy(draft, memo={id(p): p for p in draft.parameters() if id(p) not in changed})
        for block, loras in zip(model.model.layers, adapter.layers):
            for name, lora in loras.items():
                w = getattr(getattr(block, PROJECTIONS[name]), name).weight          # [out, in], a copy
                w.copy_((w.float() + lora.scale * (lora.B.float() @ lora.A.float()).to(w.device)).to(w.dtype))
        emb = model.model.embed_tokens.weight                                     # tied: the LM head too
        n = adapter.mask_rows.shape[0]
        emb[adapter.mask_id0:adapter.mask_id0 + n] = adapter.mask_rows.to(emb.device, emb.dtype)
    return model


# ---------------------------------------------------------------- 3. the proposer
def tree_from_top(probs: torch.Tensor, ids: torch.Tensor, n_nodes: int) -> Draft:
    """Each depth's best tokens ids [k, r] and their probabilities probs [k, r] (on the host, best
    first) -> Medusa's sparse tree of the n_nodes paths with the highest product of probabilities."""
    from .medusa import fill_candidates, sparse_tree
    return fill_candidates(sparse_tree(probs.tolist(), n_nodes), ids)


MAX_CANDIDATES = 1 << 16   # more tree_candidates than this: the tree is built on the host instead


@functools.lru_cache(maxsize=32)
def tree_candidates(depth: int, width: int, n_nodes: int, device: str = "cpu"):
    """Every node that can be among the n_nodes most probable of tree_from_top's tree, as index tables
    on `device` (made once per shape and cached: a copy to the GPU would make the host wait).

    A node picks rank i_d (0 = best) of the width best tokens at each depth d = 1..D. Its probability
    is at most that of each node with the same or better ranks along a prefix of its path (its
    ancestors, its better siblings, ...), and there are at least D + sum(i) - 1 such nodes. So only a
    node with D + sum(i) <= n_nodes can make the cut: at most 2^n_nodes - 1 of them whatever the width
    and depth (127 for 7 nodes). Parents come before children (breadth first).

    Returns (path [C, depth] index of each level's probability in the flattened [depth * width] top
    values, depth * width = a padding slot of probability 1 below the node's own level; own [C] index
    of the node's token in the same flattening; parent [C] candidate index, C for the root; cost [C] =
    D + sum(i)), or None when there are more than MAX_CANDIDATES.
    """
    path, own, parent, cost = [], [], [], []
    level = [((), -1, 0)]                     # (ranks so far, candidate index, cost) of the previous level
    for d in range(1, depth + 1):
        nxt = []
        for ranks, c, cst in level:
            for i in range(width):
                if cst + 1 + i > n_nodes:
                    break
                r = ranks + (i,)
                path.append([m * width + ri for m, ri in enumerate(r)] + [depth * width] * (depth - d))
                own.append((d - 1) * width + i)
                parent.append(c)
                cost.append(cst + 1 + i)
                nxt.append((r, len(own) - 1, cst + 1 + i))
                if len(own) > MAX_CANDIDATES:
                    return None
        level = nxt
    C = len(own)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)   # noqa: E731
    return as_long(path), as_long(own), as_long([C if q < 0 else q for q in parent]), \
        torch.tensor(cost, dtype=torch.float64, device=device)


def tree_on_device(values: torch.Tensor, ids: torch.Tensor, n_nodes: int, table=None) -> Draft | None:
    """tree_from_top's tree, built where values and ids [k, r] live (the GPU), by tensor ops only.

    Nothing is copied to the host, so the target's verify forward is queued right behind the drafter's
    and the GPU does not wait for the host between them (prediction 23, notes/gpu_performance.md).
    Measured (H100, live run 11): no faster than the host's tree, because its ~50 small ops are
    launched one by one from Python; recorded as one CUDA graph they would cost one launch.
    Score every candidate (tree_candidates) by the log of its path's product of probabilities, keep
    the n_nodes best, in candidate order (parents first). Ties go to the smaller cost: every node that
    outranks a node costs less than it, so no node is kept without its parent.
    Same tree as tree_from_top up to the order of its nodes (tests/test_pard.py). None: too many
    candidates for this n_nodes (build it on the host). table: tree_candidates' tables, when the caller
    holds them (TreeGraph: a compiled function then sees no cache lookup).
    """
    k, r = values.shape
    table = table or tree_candidates(k, r, n_nodes, str(values.device))
    if table is None:
        return None
    path, own, parent, cost = table
    C = own.numel()
    n = min(n_nodes, C)
    logp = values.double().clamp_min(1e-30).log().reshape(-1)                # [k * r]
    logp = torch.cat([logp, logp.new_zeros(1)])                               # the padding slot: log 1
    score = logp[path].sum(-1) - 1e-9 * cost                                  # [C]
    keep = score.topk(n).indices.sort().values                                # [n] parents first
    node_of = torch.full((C + 1,), -1, dtype=torch.long, device=values.device)  # candidate -> node, root -1
    node_of[keep] = torch.arange(n, device=values.device)
    return Draft(ids.reshape(-1)[own[keep]], node_of[parent[keep]])


def tree_step_inputs(values: torch.Tensor, ids: torch.Tensor, n_nodes: int, L: torch.Tensor,
                     root: torch.Tensor, kv_len: int, table=None) -> Draft:
    """tree_on_device's tree together with its verify inputs, with the cache length L and the root
    token as device scalars: every shape is fixed, so one CUDA graph records it (TreeGraph).

    Same inputs as step_inputs(L, parents, kv_len) with the root in front of the tokens, built
    without knowing L on the host (attention_mask compares columns with L).
    """
    draft = tree_on_device(values, ids, n_nodes, table)
    anc = ancestors_closure(draft.parents)                                 # [T, T], T = n + 1
    pos = (L + anc.sum(1) - 1)[None]                                       # [1, T]: L + depth
    slots = L + torch.arange(anc.shape[0], device=values.device)           # [T]
    tokens = torch.cat([root.view(1), draft.tokens])[None]                 # [1, T]: the root first
    return Draft(draft.tokens, draft.parents, inputs=(pos, slots, attention_mask(L, anc, kv_len), tokens))


class TreeGraph:
    """PARD's greedy tree step recorded as one CUDA graph (prediction 26, notes/gpu_performance.md):
    the drafter's k rows of logits -> top-k per depth -> tree_on_device -> the verify inputs.

    Built eagerly on the GPU (device_tree without a graph) these are ~50 small ops, each launched from
    Python: on the H100 of live run 11 that cost more than the one read-back it saved. Recorded, they
    are one launch, queued behind the drafter's graph, and the target's verify graph follows without
    the host waiting for either. Inputs are copied into fixed buffers first (logits [k, V]; L and the
    root, the only per-step scalars). On a CPU the same function runs eagerly (what tests check).
    A replay rewrites the previous step's draft: it must have been verified by then (it always is).

    compiled: the recorded function goes through torch.compile first (static shapes). Measured (H200,
    live run 12): recorded, the step still took ~0.2 ms of GPU time, about what the host's round trip
    cost, because each of its ~50 kernels keeps its few-microsecond floor inside a graph; compiling
    fuses them into a few (prediction 28, notes/gpu_performance.md).
    """

    def __init__(self, k: int, vocab: int, width: int, n_nodes: int, kv_len: int, like: torch.Tensor,
                 compiled: bool = False):
        self.width, self.n_nodes, self.kv_len, self.compiled = width, n_nodes, kv_len, compiled
        self.table = tree_candidates(k, width, n_nodes, str(like.device))   # fixed index tables
        self.logits = torch.zeros(k, vocab, dtype=like.dtype, device=like.device)   # static input
        self.state = torch.zeros(2, dtype=torch.long, device=like.device)            # L, root
        on_gpu = like.device.type == "cuda"
        self.host = torch.zeros(2, dtype=torch.long).pin_memory() if on_gpu else None
        self.graph, self.out = None, None

    def _step(self) -> Draft:
        top = self.logits.float().softmax(-1).topk(self.width, dim=-1)     # T = 1: as the host's tree
        return tree_step_inputs(top.values, top.indices, self.n_nodes, self.state[0], self.state[1], self.kv_len,
                                self.table)

    def __call__(self, logits: torch.Tensor, L: int, root: int) -> Draft:
        self.logits.copy_(logits)
        if self.host is None:
            self.state[0], self.state[1] = L, root
            return self._step()
        # subtle: the pinned buffer is rewritten only after the last step's verdict was read back,
        # so its copy (queued before that verify) has long finished
        self.host[0], self.host[1] = L, root
        self.state.copy_(self.host, non_blocking=True)
        if self.graph is None:            # compiled at record()'s first warm-up call, outside the capture
            from ..cuda_graphs import record
            self.graph, self.out = record(torch.compile(self._step, dynamic=False) if self.compiled
                                          else self._step)
        self.graph.replay()
        return self.out


class ParallelDraft(DraftModel):
    """Proposer: k tokens from ONE forward of the drafter (context not yet cached + k - 1 masks).

    drafter: anything with Qwen2.forward's signature, `config`, `device` and `new_cache` (the merged
    Qwen2, the LoRA-wrapped one, or a CUDA-graph runner standing in for it); mask_ids: the mask
    tokens of depths 2, 3, ... Reuses DraftModel's cache bookkeeping (`seen`, `_ensure_capacity`).
    """
    prefill_split = 16   # a longer catch-up (the prompt, at the first step) is fed first without logits

    def __init__(self, drafter, mask_ids: list[int], draft_len: int = 4, target_vocab: int | None = None,
                 name: str | None = None, tree_nodes: int | None = None, tree_width: int = 4,
                 device_tree: bool = False, compile_tree: bool = False):
        if not 1 <= draft_len <= len(mask_ids) + 1:
            raise ValueError(f"draft_len must be in 1..{len(mask_ids) + 1} (the depths trained), got {draft_len}")
        if tree_nodes is not None and (tree_nodes < 1 or tree_width < 1):
            raise ValueError(f"tree_nodes and tree_width must be >= 1, got {tree_nodes}, {tree_width}")
        tree = "" if tree_nodes is None else f", tree={tree_nodes}"
        super().__init__(drafter, draft_len, target_vocab, name or f"pard(k={draft_len}{tree})")
        self.mask_ids = list(mask_ids)
        self.vocab = min(self.target_vocab, min(mask_ids))   # never propose a mask token (or an id the target lacks)
        # None: a chain of draft_len tokens; else a sparse tree of tree_nodes nodes, depth <= draft_len,
        # from the tree_width most likely tokens of each depth
        self.tree_nodes, self.tree_width = tree_nodes, tree_width
        # build the tree by device ops (tree_on_device) rather than on the host; where the verify's
        # mask has a static width (a graph runner's kv_len) as one recorded graph with its verify
        # inputs (TreeGraph, greedy). Off by default: eagerly, on the H100 of live run 11, it was no
        # faster (1.23x against 1.27x, same run): ~50 small ops launched one by one from Python cost
        # more than the read-back they save (notes/gpu_performance.md, 23; the graph is 26)
        self.device_tree, self.compile_tree = device_tree, compile_tree   # compile_tree: TreeGraph(compiled=True)
        self.graphs: dict[tuple, TreeGraph] = {}          # (k, nodes, kv_len) -> its recorded tree step

    @torch.inference_mode()
    def proposal_logits(self, tokens: list[int], k: int) -> torch.Tensor:
        """Feed what the cache lacks + k - 1 masks; returns [k, V] logits for depths 1..k.

        One forward, except when more than `prefill_split` tokens are missing (the prompt at the first
        step): those but the last are fed first, without the LM head over hundreds of rows.
        Afterwards the cache holds exactly `tokens` (the mask rows are rolled back).
        """
        self._ensure_capacity(len(tokens) + k)
        keep = min(common_prefix_len(self.seen, tokens), len(tokens) - 1)   # the root is always fed
        self.cache.rollback(keep)
        del self.seen[keep:]
        vocab, dev = self.draft.config.vocab_size, self.draft.device
        missing = [t if t < vocab else 0 for t in tokens[keep:]]
        self.fed_per_step.append(len(missing) + k - 1)
        if len(missing) > self.prefill_split:
            prefill(self.draft, torch.tensor([missing[:-1]], device=dev), self.cache, logits=False)
            missing = missing[-1:]
        ids = missing + self.mask_ids[:k - 1]              # masks follow the context: a causal chain
        logits, _ = prefill(self.draft, torch.tensor([ids], device=dev), self.cache)
        self.cache.length = len(tokens)                    # roll the k - 1 mask rows back
        self.seen = list(tokens)
        return logits[0, len(missing) - 1:]                # [k, V]: the last context row, then the masks

    @torch.inference_mode()
    def propose(self, ctx) -> Draft:
        k = min(self.draft_len, ctx.max_draft)
        if k < 1:
            return Draft.empty()
        logits = self.proposal_logits(ctx.tokens, k)[:, :self.vocab]
        if self.tree_nodes is not None:
            n = min(self.tree_nodes, ctx.max_draft)
            if self.device_tree and ctx.params.greedy and ctx.kv_len is not None:
                draft = self.recorded_tree(logits, n, ctx)     # with its verify inputs
                if draft is not None:
                    return draft
            return self.tree(logits, n, ctx.params)
        if ctx.params.greedy:
            return Draft.chain(logits.argmax(-1))      # left where the logits are: no read-back
        q = fit_vocab(probs_from_logits(logits, ctx.params), self.vocab, self.target_vocab)   # [k, V_target]
        drafted = sample(q.to(ctx.generator.device) if ctx.generator is not None else q, ctx.generator)
        return Draft.chain(drafted.cpu(), q)

    def recorded_tree(self, logits: torch.Tensor, n_nodes: int, ctx) -> Draft | None:
        """The greedy tree of n_nodes and its verify inputs (Draft.inputs, mask width ctx.kv_len) from
        this shape's TreeGraph, made at its first use; None when the tree has too many candidates to
        be built by device ops (tree_candidates)."""
        k = logits.shape[0]
        if tree_candidates(k, self.tree_width, n_nodes) is None:
            return None
        key = (k, n_nodes, ctx.kv_len)
        if key not in self.graphs:
            # compiled only at full size: the smaller trees of a request's last steps would each
            # cost a compile (seconds) inside a timed request
            full = (k, n_nodes) == (self.draft_len, self.tree_nodes)
            self.graphs[key] = TreeGraph(k, self.vocab, min(self.tree_width, self.vocab), n_nodes,
                                         ctx.kv_len, logits, self.compile_tree and full)
        return self.graphs[key](logits, len(ctx.tokens) - 1, ctx.tokens[-1])

    def tree(self, logits: torch.Tensor, n_nodes: int, params) -> Draft:
        """logits [k, V] (depths 1..k) -> a sparse tree of n_nodes: Medusa's, on this step's probabilities.

        Each depth's tree_width most likely tokens, with their probabilities (at the sampling temperature,
        or at T = 1 when greedy: a one-hot would rank nothing), go to the host in one copy; sparse_tree
        keeps the n_nodes paths whose product of probabilities is highest (tree_from_top). With
        device_tree=True the same tree is built where the logits are (tree_on_device) and stays
        there: the verify forward is queued behind the drafter's with no copy between them.
        Tokens are picked, q = None.
        """
        probs = logits.float().softmax(-1) if params.greedy else probs_from_logits(logits, params)
        top = probs.topk(min(self.tree_width, probs.shape[-1]), dim=-1)              # [k, r] each
        if self.device_tree:
            draft = tree_on_device(top.values, top.indices, n_nodes)   # no copy, no wait
            if draft is not None:
                return draft
        # one device -> host copy (ids < 2^24 are exact in float32)
        host = torch.stack([top.values, top.indices.float()]).cpu()
        return tree_from_top(host[0], host[1].long(), n_nodes)


# ---------------------------------------------------------------- 4. training (specdec_lib.train)
def _block_with_fresh_cache(block, x, cos, sin, k_cache, v_cache, slots, mask):
    """Qwen2.forward's block_fn for a training forward: each block writes its keys/values into new
    zero tensors of the cache's shape, never into the shared cache.

    subtle: the shared cache is one [layers, ...] tensor; writing layer i + 1's slice in place would
    bump the version of the tensor that layer i saved for its backward pass, and autograd would refuse.
    (The cache passed in may live on the meta device: only its shape is used.)
    """
    k = torch.zeros(k_cache.shape, dtype=x.dtype, device=x.device)
    v = torch.zeros(v_cache.shape, dtype=x.dtype, device=x.device)
    return block(x, cos, sin, k, v, slots, mask)


def _checkpointed_block(block, *args):
    """The same, recomputed in the backward pass (activation checkpointing: one block's internals
    in memory at a time instead of all 24)."""
    from torch.utils.checkpoint import checkpoint
    return checkpoint(_block_with_fresh_cache, block, *args, use_reentrant=False)


def layout_forward(model: Qwen2, adapter: PardAdapter, ids: torch.Tensor, lay: Layout,
                   grad_checkpoint: bool = False) -> torch.Tensor:
    """One forward over real rows ids [B, T] + the layout's mask rows; returns hidden [B, R, H]."""
    from ..qwen2 import KVCache
    B, T = ids.shape
    dev = ids.device
    masks = (adapter.mask_id0 + lay.depth[T:] - 2).to(dev)                  # [M] mask token of each depth
    x_ids = torch.cat([ids, masks[None].expand(B, -1)], dim=1)              # [B, R]
    R = x_ids.shape[1]
    shapes = KVCache(model.config, R, B, device="meta")                    # shapes only, no memory
    n = model.config.num_hidden_layers
    _, hidden = model(x_ids, lay.pos.to(dev)[None].expand(B, -1), shapes, lay.mask.to(dev), torch.arange(R, device=dev),
                      hidden_layers=(n,), logits=False,
                      block_fn=_checkpointed_block if grad_checkpoint else _block_with_fresh_cache)
    return hidden[n]


class PardLearner:
    """What specdec_lib.train needs: the module to train (the adapter), and the loss.

    The loss runs the adapted draft over each batch in the training layout (conditional drop-token
    while training, every anchor at every depth when evaluating, so accuracies are comparable) and
    takes the cross-entropy at every row whose target is a response token: real rows (depth 1) and
    mask rows (depths 2..K). The target is never run (hidden_layers = ()).
    """
    name = "pard"
    hidden_layers = ()

    def __init__(self, draft: Qwen2, adapter: PardAdapter, keep: float = 0.5, keep_min: float = 0.2,
                 grad_checkpoint: bool = False, seed: int = 0):
        self.base_model = draft                       # the checkpoint belongs to the draft
        self.module = adapter
        self.model = adapted_model(draft, adapter)
        for p in draft.parameters():                  # frozen: no gradients for 0.5B weights
            p.requires_grad_(False)
        self.keep, self.keep_min, self.grad_checkpoint = keep, keep_min, grad_checkpoint
        self.generator = torch.Generator().manual_seed(seed)
        self.rows_per_token: list[float] = []         # forward rows / real tokens, per training batch

    def header(self) -> dict:
        return dict(self.module.settings, keep=self.keep, keep_min=self.keep_min, grad_checkpoint=self.grad_checkpoint)

    def loss(self, batch, teacher=None):
        from ..train import chunked_cross_entropy
        ids, resp = batch.ids, batch.response_mask              # [B, T]
        B, T = ids.shape
        K = self.module.max_depth
        useful = torch.zeros(T, dtype=torch.bool)               # anchor j has some trained target x(j + d)
        any_resp = resp.any(0).cpu()
        for d in range(2, K + 1):
            useful[:T - d] |= any_resp[d:]
        keep = self.keep if self.module.training else 1.0
        lay = parallel_layout(T, drop_token_anchors(T, K, useful, keep, self.keep_min, self.generator))
        if self.module.training:
            self.rows_per_token.append(lay.mask.shape[0] / T)
        h = layout_forward(self.model, self.module, ids, lay, self.grad_checkpoint and self.module.training)
        target_at = lay.target_index.to(ids.device)               # [R]
        inside = target_at < T
        at = target_at.clamp(max=T - 1)
        y = ids[:, at]                                           # [B, R] the token each row predicts
        use = resp[:, at] & inside[None]                         # [B, R]
        depth = lay.depth.to(ids.device)[None].expand(B, -1)
        w = self.model.lm_head.weight
        total = h.new_zeros((), dtype=torch.float32)
        acc, top5, counts = [], [], []
        for d in range(1, K + 1):
            sel = use & (depth == d)
            n = int(sel.sum())
            c1 = c5 = 0
            if n:
                l, c1, c5 = chunked_cross_entropy(h[sel], w, y[sel])
                total = total + l
            acc.append(float(c1) / max(n, 1))
            top5.append(float(c5) / max(n, 1))
            counts.append(n)
        loss = total / max(sum(counts), 1)
        return loss, {"acc": acc, "top5": top5, "n": counts, "rows_per_token": lay.mask.shape[0] / T}


# Sizes for `python -m specdec_lib.train pard --profile small` (one H200, about 2 minutes in bf16);
# `tiny` is a smoke run of a few seconds (tests, CI, the chapter under nbval).
TRAIN_DEFAULTS = {"tiny": dict(steps=12, batch_size=2, max_len=48, eval_every=6, eval_batches=1, lr=1e-2, warmup=2),
                  "small": dict(steps=300, batch_size=16, max_len=512, eval_every=50, eval_batches=4, lr=1e-3),
                  "qwen7b": dict(steps=300, batch_size=16, max_len=512, eval_every=50, eval_batches=4, lr=1e-3)}


def learner(models, rank: int = 8, alpha: float = 16.0, targets=tuple(PROJECTIONS), max_depth: int = 8,
            keep: float = 0.5, keep_min: float = 0.2, grad_checkpoint: bool = False, seed: int = 0,
            mask_id0: int = MASK_ID0) -> PardLearner:
    """The PARD learner on models.draft. keep = 1 trains every depth at every anchor (no dropping)."""
    draft = models.draft
    adapter = PardAdapter(draft.config, rank, alpha, tuple(targets), max_depth, mask_id0).to(draft.device)
    adapter.init_mask_rows(draft.model.embed_tokens.weight)
    return PardLearner(draft, adapter, keep, keep_min, grad_checkpoint, seed)


# ---------------------------------------------------------------- 5. loading a trained drafter
def load_adapter(models, checkpoint=None) -> tuple[PardAdapter, dict]:
    """The trained adapter for models.draft and its checkpoint header. Default checkpoint: the
    profile's (trained here in seconds under `tiny`). Refuses a checkpoint made for another draft."""
    from ..checkpoint import ensure_checkpoint, load_checkpoint, read_header
    path = checkpoint or ensure_checkpoint("pard", models)
    settings = read_header(path)["config"]
    adapter = PardAdapter(models.draft.config, settings["rank"], settings["alpha"], tuple(settings["targets"]),
                          settings["max_depth"], settings["mask_id0"]).to(models.draft.device)
    header = load_checkpoint(path, adapter, method="pard", base_model=models.draft)
    return adapter.eval(), header


def load_drafter(models, checkpoint=None) -> tuple[Qwen2, list[int], dict]:
    """(merged drafter, its mask ids, checkpoint header): what `build(drafter=...)` takes, so a sweep
    over k merges the weights once."""
    adapter, header = load_adapter(models, checkpoint)
    return merged_model(models.draft, adapter), adapter.mask_ids(adapter.max_depth - 1), header


# passed on to ParallelDraft
OPTIONS = ("target_vocab", "name", "tree_nodes", "tree_width", "device_tree", "compile_tree")


def build(models=None, checkpoint=None, draft_len: int = 4, drafter: tuple | None = None, **options):
    """make_proposer("pard", models, draft_len=4); add tree_nodes=7 for a tree (ParallelDraft.tree).
    drafter=(model, mask_ids[, header]) reuses a loaded drafter (load_drafter), or a CUDA-graph runner
    standing in for the merged model."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown pard options {sorted(unknown)}: use draft_len, checkpoint, drafter, target_vocab, "
                         "tree_nodes, tree_width, device_tree, compile_tree")
    if drafter is None:
        if models is None:
            raise ValueError("pard needs models (from load_profile) or drafter=(model, mask_ids)")
        drafter = load_drafter(models, checkpoint)
    if models is not None:
        options.setdefault("target_vocab", models.target.config.vocab_size)
    return ParallelDraft(drafter[0], drafter[1], draft_len, **options)
