"""Medusa-1 (Cai et al., 2024, arXiv 2401.10774): a few small heads on the frozen target guess further ahead.

The target's last hidden state at position t is what its LM head turns into the next token. Medusa adds
K *heads* that read the same vector and are trained to guess the tokens after that one. Under this
course's loop (decoding.py) the newest row of ctx.hidden is the last accepted token t; the target's own
logits there already chose the root (token t + 1), so head k (k = 1..K) guesses token t + 1 + k:

    hidden of token t ──► target's LM head ──► root           (exact: the target's own choice)
                      ├─► head 1 ──► token t + 2 candidates   (a guess, verified next step)
                      ├─► head 2 ──► token t + 3 candidates
                      └─► ...

One head = a residual SiLU block and a vocabulary projection. The paper gives each head its own LM
head (initialised from the target's); for Qwen2.5-1.5B that is 151,936 x 1,536 = 233 M parameters per
head, 40x the weight budget of this course. Here all heads share the target's frozen LM head, and the
block is either the paper's full H x H matrix or a low-rank bottleneck (2 H r parameters):

    full (rank=None):  head(h) = h + silu(W h + b)            W [H, H], zero at start: head = target
    low rank (rank=r): head(h) = h + U silu(D h)              D [r, H], U [H, r] (U zero at start)
    logits_k = lm_head(head_k(h))                             lm_head: the target's, frozen, shared

Training (Medusa-1: the target is frozen) is the shared loop of train.py with `MedusaLearner.loss`:
cross-entropy of head k at position t against the token at t + 1 + k of the target's own responses,
weighted decay^(k-1) (later heads are harder and matter less: they are only reached through earlier ones).

Inference: each head's top candidates form a *sparse tree*. A node is a path of ranks (i_1, ..., i_d):
head 1's i_1-th candidate, then head 2's i_2-th, ... Its chance of being accepted is estimated from the
measured per-head accuracies as acc[1][i_1] * ... * acc[d][i_d] (heads treated as independent), and
the tree keeps the `draft_len` most likely nodes (`sparse_tree`). The sum of those probabilities is the
expected number of accepted tokens per step. One target forward verifies the whole tree (verify.py);
greedy output is exactly the target's. With sampling, each node is drawn from its head's softmax
(siblings without replacement) and Draft.q carries those distributions, so the shared verifier stays
lossless. (The paper's "typical acceptance" is a lossy alternative and is not used here.)
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cuda_graphs import record
from ..sampling import probs_from_logits, sample
from ..tree import Draft


# ---------------------------------------------------------------- the heads
class ResidualSiLU(nn.Module):
    """One head's block: h -> h + silu(W h + b) (rank None, the paper's) or h + U silu(D h) (rank r).

    It starts as the identity (W = 0, or U = 0), so an untrained head predicts what the target's LM
    head predicts, and training only has to learn the shift."""

    def __init__(self, hidden_size: int, rank: int | None = None):
        super().__init__()
        if rank is None:
            self.down, self.up = nn.Linear(hidden_size, hidden_size), None
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)
        else:
            if not 1 <= rank <= hidden_size:
                raise ValueError(f"rank must be in [1, {hidden_size}] (or None for a full matrix), got {rank}")
            self.down = nn.Linear(hidden_size, rank, bias=False)
            self.up = nn.Linear(rank, hidden_size, bias=False)
            nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:   # [..., H] -> [..., H]
        z = F.silu(self.down(h))
        return h + (z if self.up is None else self.up(z))


class MedusaHeads(nn.Module):
    """K blocks; the vocabulary projection is the target's LM head, passed in (never stored here)."""

    def __init__(self, hidden_size: int, n_heads: int = 4, rank: int | None = 256):
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {n_heads}")
        self.hidden_size, self.n_heads, self.rank = hidden_size, n_heads, rank
        self.blocks = nn.ModuleList(ResidualSiLU(hidden_size, rank) for _ in range(n_heads))

    def forward(self, h: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """h [..., H], lm_head [V, H] -> logits [K, ..., V] (head k's guess for token t + 1 + k)."""
        return torch.stack([block(h) for block in self.blocks]) @ lm_head.t()


def head_parameters(hidden_size: int, vocab_size: int, rank: int | None, own_lm_head: bool = False) -> int:
    """Parameters of one head. own_lm_head: the paper's per-head vocabulary projection (V x H more).
    Example, Qwen2.5-1.5B (H = 1536, V = 151936): rank 256 -> 786,432; full -> 2,360,832."""
    block = hidden_size * hidden_size + hidden_size if rank is None else 2 * hidden_size * rank
    return block + (vocab_size * hidden_size if own_lm_head else 0)


# ---------------------------------------------------------------- the sparse tree
@dataclass
class TreeTemplate:
    """The shape of the draft tree, fixed once from measured accuracies; tokens are filled per step.

    Node i is head heads[i]'s ranks[i]-th candidate (both 0-based; head index = depth - 1), below node
    parents[i] (-1 = the root). probs[i] = estimated chance that node i is accepted."""
    parents: list[int]
    heads: list[int]
    ranks: list[int]
    probs: list[float]

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def expected_accepted(self) -> float:
        """E[accepted draft tokens per step] under the estimate: at most one node per depth is on the
        target's path, so this is the sum of the node probabilities (tau = 1 + this)."""
        return float(sum(self.probs))

    def truncate(self, n: int) -> "TreeTemplate":
        return TreeTemplate(self.parents[:n], self.heads[:n], self.ranks[:n], self.probs[:n])


def sparse_tree(rank_acc, budget: int) -> TreeTemplate:
    """The `budget` nodes of highest estimated acceptance probability, best first (parents first).

    rank_acc[k][i] = measured P(head k's i-th candidate is the right token) (k, i 0-based); a node
    (i_1, ..., i_d) has probability rank_acc[0][i_1] * ... * rank_acc[d-1][i_d]. Best-first search:
    pop the most probable frontier node, keep it, push its children (one per rank of the next head).
    A child is never more probable than its parent, so parents are kept first.

    Example: rank_acc [[0.6, 0.2], [0.5, 0.1]], budget 4 -> nodes (0), (0,0), (1), (1,0):
    parents [-1, 0, -1, 2], probs [0.6, 0.3, 0.2, 0.1], expected accepted 1.2.
    Ties go to the node pushed first.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    acc = [[float(a) for a in row] for row in rank_acc]
    if not acc or any(not row for row in acc):
        raise ValueError("rank_acc needs at least one head with at least one rank: [[a_00, a_01, ...], ...]")
    if any(not 0.0 <= a <= 1.0 for row in acc for a in row):
        raise ValueError("rank_acc entries are probabilities: each must lie in [0, 1]")
    out = TreeTemplate([], [], [], [])
    frontier, order = [], 0

    def push(parent: int, depth: int, prob: float):
        nonlocal order
        if depth >= len(acc):                 # no head guesses this far
            return
        for rank, a in enumerate(acc[depth]):
            heapq.heappush(frontier, (-prob * a, order, parent, depth, rank))
            order += 1

    push(-1, 0, 1.0)
    while frontier and len(out) < budget:
        neg_p, _, parent, depth, rank = heapq.heappop(frontier)
        out.parents.append(parent)
        out.heads.append(depth)
        out.ranks.append(rank)
        out.probs.append(-neg_p)
        push(len(out) - 1, depth + 1, -neg_p)
    return out


def default_rank_acc(n_heads: int, top_k: int = 10) -> list[list[float]]:
    """A prior when nothing was measured: head k's accuracy 0.6^(k+1), spread over ranks as 1/2^(i+1)."""
    return [[0.6 ** (k + 1) * 0.5 ** (i + 1) for i in range(top_k)] for k in range(n_heads)]


# ---------------------------------------------------------------- the proposer
def fill_greedy(template: TreeTemplate, logits: torch.Tensor) -> Draft:
    """logits [K, V] -> the tree's tokens: node i = head heads[i]'s ranks[i]-th most likely token.
    Siblings are distinct ranks of one head, hence distinct tokens."""
    return fill_candidates(template, logits.topk(max(template.ranks) + 1, dim=-1).indices)


def fill_candidates(template: TreeTemplate, top: torch.Tensor) -> Draft:
    """top [K, R]: each head's candidates, best first -> node i's token is top[heads[i], ranks[i]]."""
    heads = torch.tensor(template.heads, dtype=torch.long, device=top.device)
    ranks = torch.tensor(template.ranks, dtype=torch.long, device=top.device)
    return Draft(top[heads, ranks].cpu(), torch.tensor(template.parents, dtype=torch.long))


def fill_sampled(template: TreeTemplate, probs: torch.Tensor, generator) -> Draft:
    """probs [K, V] (each head's distribution) -> a tree of the template's shape, drawn at random.

    The children of one node are drawn from their head's distribution without replacement: the j-th
    child from q with the j - 1 earlier siblings removed and renormalised, and that q is its Draft.q
    row (what the verifier's min(1, p/q) needs). Ranks are ignored: the j-th child is the j-th draw.
    A node whose distribution has no mass left (top-p kept fewer tokens than siblings) is dropped,
    with its subtree.
    """
    tokens, parents, q_rows = [], [], []
    index = {-1: -1}                   # template node -> draft node (absent: dropped)
    remaining = {}                     # draft node -> distribution for its next child
    for i, (p, k) in enumerate(zip(template.parents, template.heads)):
        if p not in index:
            continue
        parent = index[p]
        q = remaining.get(parent, probs[k])
        if float(q.sum()) <= 0:
            continue
        x = int(sample(q, generator))
        tokens.append(x)
        parents.append(parent)
        q_rows.append(q)
        index[i] = len(tokens) - 1
        rest = q.clone()
        rest[x] = 0
        total = rest.sum()
        remaining[parent] = rest / total if float(total) > 0 else rest
    if not tokens:
        return Draft.empty()
    return Draft(torch.tensor(tokens), torch.tensor(parents), torch.stack(q_rows), without_replacement=True)


class HeadsGraph:
    """A whole greedy proposal of the full template (heads, shared LM head, top-k, the template's picks)
    recorded once as a CUDA graph.

    Eagerly a proposal is a few dozen small kernels, two copies of the template's indices to the device
    and one read back: 0.66-0.8 ms on the H200, half a 1.5B verify step, while the one big read (the LM
    head, 0.47 GB for all heads at once) takes ~0.1 ms. Replayed it measured 0.33 ms live: the launches
    are gone, the top-k and the copy back remain. The newest hidden row is copied into a fixed buffer
    before each replay. Without a GPU (tests) the same function runs eagerly from the same buffer; a
    failed capture falls back to eager for good.
    """

    def __init__(self, template: TreeTemplate):
        self.R = max(template.ranks) + 1
        self.pick = [k * self.R + r for k, r in zip(template.heads, template.ranks)]   # into top.flatten()
        self.graph, self.failed, self.h, self.index = None, False, None, None

    def run(self, medusa) -> torch.Tensor:
        """The recorded function: the buffered row -> [N] node tokens (node i = top[heads[i], ranks[i]])."""
        top = medusa.head_logits(self.h, medusa.n_heads).topk(self.R, dim=-1).indices    # [K, R]
        return top.flatten().index_select(0, self.index)

    def __call__(self, medusa, h_last: torch.Tensor) -> torch.Tensor | None:
        if self.failed:
            return None
        if self.h is None:
            self.h = torch.empty_like(h_last)
            self.index = torch.tensor(self.pick, dtype=torch.long, device=h_last.device)
        self.h.copy_(h_last)
        if h_last.device.type != "cuda":
            return self.run(medusa)
        if self.graph is None:
            try:
                self.graph, self.out = record(lambda: self.run(medusa))
            except Exception as e:                                   # noqa: BLE001 - any capture problem
                import warnings
                warnings.warn(f"medusa: CUDA graph capture failed ({e}); proposing eagerly")
                self.failed = True
                return None
        self.graph.replay()
        return self.out.cpu()


class Medusa:
    """Proposer: K heads on the newest hidden row -> a sparse tree of their top candidates."""

    def __init__(self, heads: MedusaHeads, lm_head: torch.Tensor, layer: int, template: TreeTemplate,
                 name: str | None = None):
        self.heads, self.lm_head, self.template = heads, lm_head, template
        self.hidden_layers = (layer,)      # the target's last hidden state (after the final norm)
        self.draft_len = len(template)
        self.n_heads = max(template.heads) + 1 if len(template) else 0
        self.name = name or f"medusa(K={self.n_heads}, nodes={self.draft_len})"
        # greedy steps with room for the whole tree replay one recorded proposal (on a GPU)
        self.graph = HeadsGraph(template) if len(template) else None
        self.parents = torch.tensor(template.parents, dtype=torch.long)

    def reset(self, prompt_ids) -> None:
        pass                               # nothing per request: the heads read the target's state

    def head_logits(self, h: torch.Tensor, n_heads: int) -> torch.Tensor:
        """h [H] (the newest hidden row) -> [n_heads, V]: one batched product with the shared LM head."""
        x = h.to(self.lm_head.dtype)
        return torch.stack([b(x) for b in self.heads.blocks[:n_heads]]) @ self.lm_head.t()

    @torch.inference_mode()
    def propose(self, ctx) -> Draft:
        h = ctx.hidden.get(self.hidden_layers[0])
        n = min(self.draft_len, ctx.max_draft)
        if h is None or h.shape[0] == 0 or n < 1:   # a one-token prompt: no hidden row yet
            return Draft.empty()
        if ctx.params.greedy and n == self.draft_len and self.graph is not None:
            tokens = self.graph(self, h[-1])
            if tokens is not None:
                return Draft(tokens, self.parents)
        template = self.template.truncate(n)
        logits = self.head_logits(h[-1], max(template.heads) + 1)     # [K, V] from the last accepted token
        if ctx.params.greedy:
            return fill_greedy(template, logits)
        probs = probs_from_logits(logits, ctx.params)
        if ctx.generator is not None:
            probs = probs.to(ctx.generator.device)
        return fill_sampled(template, probs, ctx.generator)


# ---------------------------------------------------------------- training (the shared loop calls this)
def score(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, top_k: int,
          chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation without gradients: cross-entropy sum and rank counts, in one pass over chunks of rows.

    hidden [N, H], weight [V, H], targets [N] -> (loss_sum, counts [top_k]): counts[i] = how many rows
    have their target token at rank i of softmax(hidden @ weight.T) (counts[0] = top-1 hits)."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    counts = torch.zeros(top_k, dtype=torch.long, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits, y = (hidden[s:s + chunk] @ weight.t()).float(), targets[s:s + chunk]    # [n, V], [n]
        loss += F.cross_entropy(logits, y, reduction="sum")
        counts += (logits.topk(top_k, dim=-1).indices == y[:, None]).sum(0)
    return loss, counts


class MedusaLearner:
    """What train.py needs: the heads (the trainable module), the target layer they read, the loss."""
    name = "medusa"

    def __init__(self, models, heads: int = 4, rank: int | str | None = "auto", loss_decay: float = 0.8,
                 top_k: int = 10):
        c = models.target.config
        if rank == "auto":                          # H / 4: 384 on the 1.5B (4.5 MiB in int8), 16 on `tiny`
            rank = c.hidden_size // 4
        if not 0 < loss_decay <= 1:
            raise ValueError(f"loss_decay must be in (0, 1], got {loss_decay}")
        self.layer = c.num_hidden_layers            # after the final norm: what the LM head reads
        self.hidden_layers = (self.layer,)
        self.module = MedusaHeads(c.hidden_size, heads, rank).to(models.target.device)
        self.loss_decay, self.top_k = loss_decay, top_k

    def loss(self, batch, teacher):
        """Head k (1-based) at position t against the token at t + 1 + k, where that token is a response
        token. Returns the weighted mean cross-entropy and per-head metrics (lists of K floats): top-1
        `acc`, `top5`, counted tokens `n`; in evaluation also `rank_acc`, K x top_k flattened:
        P(the right token is head k's i-th candidate), what `sparse_tree` needs."""
        from ..train import chunked_cross_entropy
        h = teacher.hidden[self.layer]                                     # [B, T, H] frozen
        w = teacher.lm_head                                                # [V, H] frozen, shared
        dtype = self.module.blocks[0].down.weight.dtype
        total, weights = 0.0, 0.0
        acc, top5, n, ranks = [], [], [], []
        for k, block in enumerate(self.module.blocks):                     # k = 0 is head 1
            shift = k + 2                                                  # from t to t + 1 + (k + 1)
            valid = batch.response_mask[:, shift:]                         # [B, T - shift]
            x = h[:, :-shift][valid].to(dtype)                             # [N, H]
            y = batch.ids[:, shift:][valid]                                # [N]
            out = block(x).to(w.dtype)
            count = max(int(y.numel()), 1)
            if self.module.training:
                loss_sum, c1, c5 = chunked_cross_entropy(out, w, y)
            else:                              # evaluation: also where the right token ranks
                loss_sum, hits = score(out, w, y, self.top_k)
                c1, c5 = hits[0], hits[:5].sum()
                ranks += (hits.float() / count).tolist()
            lam = self.loss_decay ** k
            total = total + lam * loss_sum / count
            weights += lam
            acc.append(float(c1) / count)
            top5.append(float(c5) / count)
            n.append(float(y.numel()))
        metrics = dict(acc=acc, top5=top5, n=n)
        if ranks:
            metrics["rank_acc"] = ranks
        return total / weights, metrics

    def header(self) -> dict:
        m = self.module
        return dict(heads=m.n_heads, rank=m.rank, hidden_size=m.hidden_size, layer=self.layer,
                    loss_decay=self.loss_decay, top_k=self.top_k)


def learner(models, **options) -> MedusaLearner:
    """python -m specdec_lib.train medusa --option heads=4 --option rank=256 (rank=null: the full H x H block;
    default "auto": H / 4)."""
    unknown = set(options) - {"heads", "rank", "loss_decay", "top_k"}
    if unknown:
        raise ValueError(f"unknown medusa training options {sorted(unknown)}: use heads, rank, loss_decay, top_k")
    return MedusaLearner(models, **options)


# Sizes for the shared loop (train.PROFILE_CONFIG is the default; these override it per profile).
TRAIN_DEFAULTS = {
    # tiny: a loss over 151,936 tokens per head is most of the time; keep it to seconds on a busy CPU
    "tiny": dict(steps=8, batch_size=2, max_len=48, lr=2e-2, warmup=2, eval_every=4, eval_batches=1, log_every=1),
    # small (on one H200): 400 steps x 16 sequences x <= 512 tokens ~ 2M response tokens, ~2-3 minutes
    "small": dict(steps=400, batch_size=16, max_len=512, lr=2e-3, warmup=20, eval_every=50, eval_batches=8),
}


# ---------------------------------------------------------------- loading a trained checkpoint
def measured_rank_acc(header: dict) -> list[list[float]] | None:
    """The held-out rank accuracies stored with a checkpoint (train.py saves the final evaluation)."""
    flat = (header.get("heldout") or {}).get("rank_acc")
    if not flat:
        return None
    cfg = header["config"]
    K, R = cfg["heads"], cfg["top_k"]
    return [flat[k * R:(k + 1) * R] for k in range(K)]


def load_heads(models, checkpoint=None, **train_options) -> tuple[MedusaHeads, dict]:
    """The trained heads for models.target, in its dtype and device, and the checkpoint's header.
    Default checkpoint: checkpoint.ensure_checkpoint("medusa", models, **train_options) (under `tiny`
    it trains one in seconds; train_options = heads, rank, ... pick which)."""
    from ..checkpoint import ensure_checkpoint, load_checkpoint, read_header
    if checkpoint is None:
        checkpoint = ensure_checkpoint("medusa", models, **train_options)
    elif train_options:
        raise ValueError(f"training options {sorted(train_options)} only apply without checkpoint=")
    header = read_header(checkpoint)
    cfg = header["config"]
    heads = MedusaHeads(cfg["hidden_size"], cfg["heads"], cfg["rank"])
    heads = heads.to(device=models.target.device, dtype=models.target.dtype)
    header = load_checkpoint(checkpoint, heads, method="medusa", base_model=models.target)
    return heads.eval(), header


OPTIONS = ("heads", "rank", "loss_decay")   # training options build() passes on (ensure_checkpoint under tiny)


def build(models=None, checkpoint=None, draft_len: int = 15, use_heads: int | None = None, top_k: int = 10,
          heads: MedusaHeads | None = None, rank_acc=None, name: str | None = None, **train_options) -> Medusa:
    """make_proposer("medusa", models, draft_len=15): a tree of at most draft_len nodes from the first
    use_heads heads (default all), shaped by the held-out rank accuracies stored in the checkpoint.
    The verify forward feeds the root too, draft_len + 1 tokens: 7, 15, 31, 63 nodes fill the GPU
    runner's buckets of 8, 16, 32, 64 tokens exactly.

    heads= (a MedusaHeads) and rank_acc= skip the checkpoint (tests, the chapter's experiments);
    without rank_acc the tree follows `default_rank_acc`."""
    if models is None:
        raise ValueError("medusa needs models (from load_profile): its heads read the target's hidden states")
    if draft_len < 0:
        raise ValueError(f"draft_len (tree nodes per step) must be >= 0, got {draft_len}")
    if heads is None:
        heads, header = load_heads(models, checkpoint, **train_options)
        rank_acc = rank_acc if rank_acc is not None else measured_rank_acc(header)
    elif train_options or checkpoint is not None:
        raise ValueError("give either heads= or a checkpoint (with its training options), not both")
    K = heads.n_heads if use_heads is None else use_heads
    if not 1 <= K <= heads.n_heads:
        raise ValueError(f"use_heads must be in [1, {heads.n_heads}] (the heads trained), got {use_heads}")
    prior = default_rank_acc(heads.n_heads, top_k)
    acc = prior if rank_acc is None else [
        # subtle: a rank never seen right (accuracy 0, common for late heads and on `tiny`) keeps a tiny
        # share of the prior, so unseen ranks are ordered by the prior instead of by insertion order
        [max(float(a), 1e-4 * p) for a, p in zip(row, prior_row)] for row, prior_row in zip(rank_acc, prior)]
    template = sparse_tree([row[:top_k] for row in acc[:K]], draft_len)
    return Medusa(heads, models.target.lm_head.weight, models.target.config.num_hidden_layers, template, name)


# ---------------------------------------------------------------- exact greedy replay (chapter 5's sweeps)
@torch.inference_mode()
def candidates(models, heads: MedusaHeads, sequence: list[int], start: int, top_k: int = 10) -> torch.Tensor:
    """Each head's top_k tokens at every position from `start` on: [len(sequence) - start, K, top_k].

    One causal forward of the target over the whole sequence gives the hidden row of every token; the
    heads read rows start, start + 1, ... . These are the rows the decode loop would give them (in
    float32 exactly; in bf16 up to rounding), so a greedy run can be replayed without the loop."""
    from ..decoding import prefill
    target = models.target
    n = target.config.num_hidden_layers
    cache = target.new_cache(len(sequence))
    _, h = prefill(target, torch.tensor([sequence], device=target.device), cache, (n,), logits=False)
    rows = h[n][0, start:]                                                     # [L, H]
    out = []
    for s in range(0, rows.shape[0], 64):                                      # [64, K, V] at a time
        logits = heads(rows[s:s + 64], target.lm_head.weight).transpose(0, 1)
        out.append(logits.topk(top_k, dim=-1).indices.cpu())
    return torch.cat(out)


def replay_greedy_tree(top: torch.Tensor, sequence: list[int], prompt_len: int, template: TreeTemplate,
                       max_new_tokens: int | None = None) -> list[tuple[int, int, int]]:
    """Replay generate()'s greedy loop with Medusa from precomputed candidates; no model runs.

    sequence = prompt + the target's greedy output; top = candidates(..., start=prompt_len - 2) (the
    first step's newest hidden row is the prompt's second-to-last token). Each step: the heads at the
    last accepted token i fill the tree, the verifier's greedy walk (verify.follow_greedy) runs against
    the known continuation, accepted tokens + bonus are emitted. Returns (proposed, accepted, emitted)
    per step, as replay.replay_greedy does for the other methods.
    """
    from ..verify import follow_greedy
    if prompt_len < 2:
        raise ValueError("replay needs a prompt of at least 2 tokens (the first step reads the hidden row of "
                         "the prompt's second-to-last token)")
    total = len(sequence) - prompt_len
    max_new = total if max_new_tokens is None else max_new_tokens
    depth = [0] * len(template)
    for j, p in enumerate(template.parents):
        depth[j] = 1 if p < 0 else depth[p] + 1
    steps, done, i = [], 0, prompt_len - 2        # i = index of the last accepted token (root = i + 1)
    while done < total:
        n = min(len(template), max_new - done - 1)
        t = template.truncate(max(n, 0))
        draft = fill_candidates(t, top[i - (prompt_len - 2)]) if len(t) else Draft.empty()
        # best[row]: the token the target emits after verify row `row` (row 0 = the root)
        best = [sequence[min(i + 2 + (0 if r == 0 else depth[r - 1]), len(sequence) - 1)]
                for r in range(len(t) + 1)]
        acc = follow_greedy(draft, best)
        emitted = min(len(acc.path) + 1, total - done)
        steps.append((len(t), min(len(acc.path), emitted), emitted))
        done += emitted
        i += emitted
    return steps
