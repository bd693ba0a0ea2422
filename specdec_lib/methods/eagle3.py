"""EAGLE-3: a one-layer drafter that reads the target's own features (Li et al., 2025, arXiv 2503.01840).

EAGLE-1 (arXiv 2401.15077) noticed that the target's last hidden state is easier to extrapolate
than tokens: a single decoder layer, fed the target's feature of position t together with the
token sampled at t + 1, predicts the token at t + 2 well. EAGLE-2 (arXiv 2406.16858) kept that
drafter and made the draft tree *dynamic*: grow it where the drafter is confident. EAGLE-3 changes
what the drafter reads and how it is trained:

1. **Fused features.** Not only the last layer: the hidden states of a low, a middle and a high
   target layer, concatenated (3h) and projected to the drafter's width (`fuse`). The last layer is
   already committed to one next token; lower layers still carry the alternatives.
2. **Training-time test (TTT).** At inference, from depth 2 on, the drafter has no target feature
   (those tokens were never fed to the target): it reads *its own output* of the step before.
   EAGLE-1 trained only on true features and regressed features (an L1 loss); EAGLE-3 drops the
   feature loss and trains the drafter the way it runs: unrolled n steps on its own outputs, with
   a token loss at every step (`ttt_loss`), so errors that compound at inference are seen in
   training. (Because nothing forces its output to imitate a feature, it is free to carry what
   helps prediction, and more data keeps helping: the paper's scaling argument.)

The drafter (`Eagle3Drafter`), per entry t (all widths for the 1.5B target, h = 1536, d = 1024):

    f_t   = cat(norm(h_low[t]), norm(h_mid[t]), norm(h_high[t]))      [3h]   target features
    g_t   = fuse(f_t)                                                  [d]    (EAGLE-3's fc)
    x_t   = g_t + embed_proj(norm(E[x_{t+1}]))                         [d]    E: the target's frozen embedding
    a_t   = Block(x_t)   one Qwen2 decoder layer, own KV cache         [d]    (qwen2.Block, reused)
    logit = head @ out(norm(a_t))                                      [Vd]   head: frozen rows of the target's LM head
    a_t predicts x_{t+2}; at depth >= 2 the next entry reads a_t where the target feature g would be.

Draft vocabulary: the `draft_vocab` most frequent response tokens of the training data (the map
back, `d2t`, is stored with the drafter). The head is those rows of the target's own, frozen LM
head: it costs no trained weights, and its matrix product is 151936 / draft_vocab times cheaper
than the full head's, which dominates the drafter's cost (a 1.5B target's LM head holds 233M of its
parameters; the drafter layer 12M). A token outside it can never be proposed (it still comes out as
the bonus token): `vocab_coverage` measures how often that happens.

Inference (`Eagle3Proposer`): each step the drafter first reads the entries the target just wrote
(ctx.hidden: the root and the accepted tokens), then grows a **dynamic tree** (`dynamic_tree`,
EAGLE-2): from the top_k children of the root, repeatedly feed the top_k nodes of the newest level
with the highest cumulative probability (product of the drafter's probabilities along the path)
and give each its top_k children, down to `depth`; then rerank all candidates and keep the best
`total_tokens`. Tree nodes live in the drafter's KV cache behind the committed entries, each
attending to the committed context and its own ancestors (tree attention), and are overwritten
next step. Greedy: the verifier accepts exactly the target's greedy output. Sampling: children
are *drawn* without replacement from the drafter's distribution q (each with its q, earlier
siblings removed, for the shared verifier), and the rerank is skipped: dropping a drawn node
because of its own value would bias what the verifier sees, so the tree is cut in creation order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cuda_graphs import record
from ..qwen2 import Block, KVCache, Qwen2Config, RMSNorm, rope_cos_sin, varying_shape_attention
from ..sampling import probs_from_logits
from ..tree import Draft

EOS = (151643, 151645)
OPTIONS = {"ttt_steps", "eval_steps", "layers", "width", "intermediate", "draft_vocab", "seed"}   # training options build() passes on
# Tree shape per device: a CPU pays for every verified node (cost curve of chapter 1), an H200 barely.
TREE_DEFAULTS = {"cpu": dict(top_k=4, depth=5, total_tokens=12), "cuda": dict(top_k=8, depth=6, total_tokens=48)}
# The training command's sizes (train.train_method reads TRAIN_DEFAULTS[profile]).
# small: 200 steps x 32 sequences x <= 768 tokens (~4M response tokens, ~2 passes over the data), sized
# for ~3 minutes of one H200 with 5 unrolled steps (the n = 1 ablation costs ~60% of that).
TRAIN_DEFAULTS = {"tiny": dict(lr=3e-3),
                  "small": dict(steps=200, batch_size=32, max_len=768, lr=1e-3, warmup=20, eval_every=50, eval_batches=8),
                  "qwen7b": dict(steps=400, batch_size=16, max_len=768, lr=1e-3, warmup=20, eval_every=100)}

# The checkpoint stores int4 with a scale per 64 columns (checkpoint.save_checkpoint): 12M parameters
# in int8 came to 11.7 MiB, over the course's 8 MB per file; in int4 they take ~6.3 MiB. Training logs
# "final_stored", the held-out accuracy of the rounded weights beside that of the trained ones.
CHECKPOINT_BITS = 4


def default_layers(n_layers: int) -> tuple[int, int, int]:
    """Low, middle and high target layer (Qwen2.forward numbering: i = after block i).

    28 layers -> (2, 14, 25), as EAGLE-3's reference picks for its targets; toy models with few
    layers -> embeddings, middle, last block (3 layers -> (0, 1, 2))."""
    if n_layers >= 8:
        return (2, n_layers // 2, n_layers - 3)
    return (0, n_layers // 2, n_layers - 1)


# ---------------------------------------------------------------- 1. the drafter
class Eagle3Drafter(nn.Module):
    """Everything EAGLE-3 trains (and the checkpoint stores): fusion, input projection, one decoder
    layer at width d, output projection, and the draft-vocabulary map `d2t`. The target's embedding
    and LM head are frozen and passed in as arguments, never copied in here."""

    def __init__(self, hidden: int, layers, width: int, heads: int, kv_heads: int, intermediate: int,
                 draft_vocab: int, rope_theta: float = 1e6, eps: float = 1e-6):
        super().__init__()
        if width % heads or heads % kv_heads:
            raise ValueError(f"width {width} must split into {heads} heads, in groups of {heads // kv_heads}")
        self.settings = dict(hidden=hidden, layers=list(layers), width=width, heads=heads, kv_heads=kv_heads,
                             intermediate=intermediate, draft_vocab=draft_vocab, rope_theta=rope_theta, eps=eps)
        # one Qwen2 decoder layer at the drafter's width (vocab_size unused: no embedding here)
        self.config = Qwen2Config(vocab_size=draft_vocab, hidden_size=width, intermediate_size=intermediate,
                                  num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  rope_theta=rope_theta, rms_norm_eps=eps)
        self.feature_norms = nn.ModuleList(RMSNorm(hidden, eps) for _ in layers)   # Qwen's residual stream has
        self.fuse = nn.Linear(len(layers) * hidden, width, bias=False)             # outliers in the thousands
        self.embed_norm = RMSNorm(hidden, eps)
        self.embed_proj = nn.Linear(hidden, width, bias=False)
        self.block = Block(self.config)
        self.norm = RMSNorm(width, eps)
        self.out = nn.Linear(width, hidden, bias=False)
        self.register_buffer("d2t", torch.arange(draft_vocab, dtype=torch.int32))   # draft id -> target id

    def fuse_features(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """[..., h] of each chosen layer -> g [..., d]."""
        return self.fuse(torch.cat([n(h) for n, h in zip(self.feature_norms, hidden)], dim=-1))

    def forward(self, feature, token_emb, pos, k_cache, v_cache, slots, mask, block_fn=None) -> torch.Tensor:
        """One pass of the decoder layer over T entries.

        feature [B, T, d]: g (fused target features) or the drafter's own earlier output a;
        token_emb [B, T, h]: the target's embedding of the token each entry reads;
        pos [B or 1, T] RoPE positions; k_cache, v_cache [B, nkv, S_max, hd]; slots [T]; mask [T, S] bool.
        block_fn: what runs the decoder layer (default Block.forward; a GPU proposer may pass
        torch.compile(Block.forward), as the target's graph runner does). Returns a [B, T, d]
        (fed back as the next depth's feature)."""
        x = feature + self.embed_proj(self.embed_norm(token_emb))
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        add = torch.zeros(mask.shape, dtype=torch.float32, device=x.device).masked_fill(~mask, float("-inf"))
        return (block_fn or Block.forward)(self.block, x, cos, sin, k_cache, v_cache, slots, add)

    def head_input(self, a: torch.Tensor) -> torch.Tensor:
        """a [..., d] -> [..., h], in the space of the target's final hidden state (where its LM head reads)."""
        return self.out(self.norm(a))

    def new_cache(self, max_len: int, device, dtype) -> KVCache:
        return KVCache(self.config, max_len, 1, device, dtype)


def drafter_sizes(hidden: int, head_dim: int, width: int | None = None, intermediate: int | None = None) -> dict:
    """Default widths: d = 2/3 of h rounded down to whole heads, MLP d / 2, two KV heads.

    For the 1.5B (h 1536, head_dim 128): d 1024, 8 heads, MLP 512, about 12.1M parameters, 6.3 MiB in
    int4 (11.7 in int8): inside 8 MB a file. A full-width layer (d = h) with Qwen's MLP would need 59M."""
    width = width or max(head_dim, (2 * hidden // 3) // head_dim * head_dim)
    heads = width // head_dim
    kv_heads = 2 if heads % 2 == 0 else 1
    return dict(width=width, heads=heads, kv_heads=kv_heads, intermediate=intermediate or max(width // 2, 16))


# ---------------------------------------------------------------- 2. the draft vocabulary
def frequent_tokens(seqs, vocab_size: int, n: int, always=EOS) -> torch.Tensor:
    """The n most frequent response tokens (ties and unseen ids by id), `always` included. -> [n] ids, sorted.

    frequent_tokens([Sequence(..., response_ids=[5, 5, 7])], 10, 3) -> tensor([0, 5, 7]) (5 and 7 seen, then id 0)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in seqs:
        counts += torch.bincount(torch.tensor(s.response_ids, dtype=torch.long), minlength=vocab_size)[:vocab_size]
    for t in always:
        if t < vocab_size:
            counts[t] = counts.max() + 1
    # stable sort by count, descending: equal counts keep id order
    order = torch.sort(counts, descending=True, stable=True).indices[:n]
    return order.sort().values


def target_to_draft(d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The inverse map: [V] target id -> draft id, or -1 where the token is outside the draft vocabulary."""
    t2d = torch.full((vocab_size,), -1, dtype=torch.long, device=d2t.device)
    t2d[d2t.long()] = torch.arange(d2t.numel(), device=d2t.device)
    return t2d


def vocab_coverage(d2t: torch.Tensor, seqs, vocab_size: int) -> float:
    """Fraction of response tokens inside the draft vocabulary (an upper bound on what it can guess)."""
    inside = torch.zeros(vocab_size, dtype=torch.bool)
    inside[d2t.long().cpu()] = True
    ids = torch.tensor([t for s in seqs for t in s.response_ids], dtype=torch.long)
    return float(inside[ids].float().mean()) if ids.numel() else 0.0


# ---------------------------------------------------------------- 3. training-time test
def ttt_mask(T: int, step: int, device=None) -> torch.Tensor:
    """[T, (step + 1) T] bool: what entry t of unroll step `step` attends to in training.

    Columns are the keys of steps 0..step, T per step. Step 0 (true target features) is causal; every
    later step's key of the *same* t only: that is exactly the tree at inference, where a node sees
    the committed context and its own ancestors. T = 3, step 1:
        t=0 [1 0 0 | 1 0 0]
        t=1 [1 1 0 | 0 1 0]
        t=2 [1 1 1 | 0 0 1]
    """
    rows = torch.arange(T, device=device)
    causal = rows[None, :] <= rows[:, None]
    diag = torch.eye(T, dtype=torch.bool, device=device)
    return torch.cat([causal] + [diag] * step, dim=1)


def _shift(x: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """x[:, t] <- x[:, t + k] along dim 1 (the last k positions get `fill`)."""
    out = torch.full_like(x, fill)
    if k < x.shape[1]:
        out[:, :x.shape[1] - k] = x[:, k:]
    return out


def _soft_ce_chunk(h, w, th, y):
    """KL(p_teacher || p_student) over the draft vocabulary (summed over rows), and the student's
    top-1 / top-5 hits on y. The KL is the cross-entropy minus the teacher's entropy: the same
    gradient, but it falls to 0 when the drafter matches, whatever the target's own uncertainty."""
    logits = (h @ w.t()).float()                                  # [n, Vd]
    t_logp = F.log_softmax((th @ w.t()).float(), dim=-1)         # the target, restricted to the draft vocab
    loss = (t_logp.exp() * (t_logp - F.log_softmax(logits, dim=-1))).sum()
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return loss, (top5[:, 0] == y).sum(), (top5 == y[:, None]).any(-1).sum()


def soft_cross_entropy(h, w, teacher_h, y, chunk: int = 2048):
    """KL summed over rows, chunked `_soft_ce_chunk` (each chunk recomputed in the backward pass: memory holds [chunk, Vd])."""
    from torch.utils.checkpoint import checkpoint
    loss = h.new_zeros((), dtype=torch.float32)
    top1 = top5 = torch.zeros((), dtype=torch.long, device=h.device)
    for s in range(0, h.shape[0], chunk):
        args = (h[s:s + chunk], w, teacher_h[s:s + chunk], y[s:s + chunk])
        if torch.is_grad_enabled() and h.requires_grad:
            l, c1, c5 = checkpoint(_soft_ce_chunk, *args, use_reentrant=False)
        else:
            l, c1, c5 = _soft_ce_chunk(*args)
        loss, top1, top5 = loss + l, top1 + c1, top5 + c5
    return loss, top1, top5


@torch.no_grad()
def teacher_top1(final_hidden: torch.Tensor, lm_head: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """The target's greedy next token over the FULL vocabulary, [N, h] -> [N] (in chunks of rows)."""
    return torch.cat([(final_hidden[s:s + chunk] @ lm_head.t()).argmax(-1)
                      for s in range(0, final_hidden.shape[0], chunk)]) if final_hidden.shape[0] else \
        torch.zeros(0, dtype=torch.long, device=final_hidden.device)


def ttt_unroll(drafter: Eagle3Drafter, ids, feature, embed, steps: int) -> list[torch.Tensor]:
    """Run the drafter `steps` times over a batch, each step on its own outputs of the step before.

    ids [B, T]; feature g [B, T, d] (fused target features); embed [V, h] frozen. Step j, entry t:
    reads feature (g_t at j = 0, else its own a^{j-1}_t) and token x_{t+j+1}, sits at RoPE position
    t + j, attends per `ttt_mask`, and predicts x_{t+j+2}. Returns [a^0, ..., a^{steps-1}], each [B, T, d].
    This is the drafter's path at inference, for every position at once: a^j_t is what a depth-(j+1)
    tree node computes after the context x_0..x_{t+1}, when the tokens before it were right.
    """
    B, T = ids.shape
    c = drafter.config
    k_all = feature.new_zeros(B, c.num_key_value_heads, 0, c.head_dim)
    v_all = k_all
    pos0 = torch.arange(T, device=ids.device)[None]
    outs = []
    for j in range(steps):
        # this step's cache: keys of steps 0..j-1 (kept for autograd, never written in place) + T new slots
        k_all = torch.cat([k_all, k_all.new_zeros(B, c.num_key_value_heads, T, c.head_dim)], dim=2)
        v_all = torch.cat([v_all, v_all.new_zeros(B, c.num_key_value_heads, T, c.head_dim)], dim=2)
        slots = torch.arange(j * T, (j + 1) * T, device=ids.device)
        a = drafter(feature, embed[_shift(ids, j + 1)], pos0 + j, k_all, v_all, slots, ttt_mask(T, j, ids.device))
        outs.append(a)
        feature = a                                                       # training-time test: its own output
    return outs


def ttt_loss(drafter: Eagle3Drafter, ids, response_mask, hidden: dict, embed, lm_head, steps: int,
             t2d: torch.Tensor | None = None):
    """The training step: `ttt_unroll`, then at every step a distillation loss (KL) against the target.

    hidden {layer: [B, T, h]} from the frozen target, including its final layer n (after the norm,
    where its LM head reads); lm_head [V, h] frozen. Step j's entry t predicts x_{t+j+2}: its label
    is the target's distribution at position t + j + 1, restricted to the draft vocabulary, counted
    where x_{t+j+2} is a response token. Accuracy = top-1 agreement with the target's greedy token
    over the whole vocabulary (a token outside the draft vocabulary counts as a miss).
    Returns (mean over steps of the per-step mean loss, {"acc", "top5", "n"} per step).
    """
    n = max(hidden)
    d2t = drafter.d2t.long()
    head = lm_head[d2t]                                                   # [Vd, h] frozen rows
    t2d = target_to_draft(d2t, lm_head.shape[0]) if t2d is None else t2d
    final = hidden[n]
    # the target's greedy token at every position u that predicts a response token (u + 1), once
    # for all steps: step j reads it at u = t + j + 1. -1 where it is outside the draft vocabulary.
    need = _shift(response_mask, 1, False)
    greedy = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
    greedy[need] = t2d[teacher_top1(final[need], lm_head)]
    feature = drafter.fuse_features([hidden[l] for l in drafter.settings["layers"]])    # g [B, T, d]
    outs = ttt_unroll(drafter, ids, feature, embed, steps)
    losses, acc, top5, counts = [], [], [], []
    for j, a in enumerate(outs):
        valid = _shift(response_mask, j + 2, False)                       # x_{t+j+2} is a response token
        teacher_h = _shift(final, j + 1)[valid]                           # the target at t + j + 1
        label = _shift(greedy, j + 1, -1)[valid]
        N = int(valid.sum())
        if N:
            h = drafter.head_input(a[valid])          # bf16 under CUDA autocast; the drafter's dtype on a CPU
            l, c1, c5 = soft_cross_entropy(h, head.to(h.dtype), teacher_h.to(h.dtype), label)
            losses.append(l / N)
            c1, c5 = float(c1), float(c5)
        else:
            c1 = c5 = 0.0
        acc.append(c1 / max(N, 1))
        top5.append(c5 / max(N, 1))
        counts.append(N)
    loss = torch.stack(losses).mean() if losses else outs[0].sum() * 0
    return loss, {"acc": acc, "top5": top5, "n": counts}


class Eagle3Learner:
    """For specdec_lib.train: the drafter, the target layers it reads, and the TTT loss."""
    name = "eagle3"

    def __init__(self, drafter: Eagle3Drafter, n_layers: int, ttt_steps: int, eval_steps: int = 6):
        if ttt_steps < 1 or eval_steps < 1:
            raise ValueError(f"ttt_steps and eval_steps must be >= 1, got {ttt_steps}, {eval_steps}")
        # held-out evaluation always unrolls eval_steps (the tree depth), whatever was trained: step-k
        # accuracy of a drafter trained with n = 1 shows what training-time test is for
        self.module, self.ttt_steps, self.eval_steps = drafter, ttt_steps, eval_steps
        self.hidden_layers = tuple(drafter.settings["layers"]) + (n_layers,)   # + the final layer: the labels
        self._t2d = None

    def loss(self, batch, teacher):
        if self._t2d is None or self._t2d.device != teacher.lm_head.device:
            self._t2d = target_to_draft(self.module.d2t.long().to(teacher.lm_head.device), teacher.lm_head.shape[0])
        steps = self.ttt_steps if self.module.training else self.eval_steps
        return ttt_loss(self.module, batch.ids, batch.response_mask, teacher.hidden, teacher.embed,
                        teacher.lm_head, steps, self._t2d)

    def header(self) -> dict:
        return dict(self.module.settings, ttt_steps=self.ttt_steps, eval_steps=self.eval_steps)


def learner(models, ttt_steps: int = 5, eval_steps: int = 6, layers=None, width: int | None = None, intermediate: int | None = None,
            draft_vocab: int | None | str = "auto", data=None, seed: int = 0) -> Eagle3Learner:
    """A fresh drafter for models.target. draft_vocab: size of the reduced vocabulary (the most frequent
    response tokens of the training split), None for the whole target vocabulary, "auto" for 32768
    (2048 under `tiny`, whose random target makes a large head pure cost)."""
    if draft_vocab == "auto":
        draft_vocab = 2048 if models.profile == "tiny" else 32768
    c = models.target.config
    layers = tuple(layers or default_layers(c.num_hidden_layers))
    if any(not 0 <= l < c.num_hidden_layers for l in layers):
        raise ValueError(f"layers {layers}: pick target layers in 0..{c.num_hidden_layers - 1}")
    sizes = drafter_sizes(c.hidden_size, c.head_dim, width, intermediate)
    V = c.vocab_size
    vd = V if draft_vocab is None else min(int(draft_vocab), V)
    torch.manual_seed(seed)
    drafter = Eagle3Drafter(c.hidden_size, layers, draft_vocab=vd, rope_theta=c.rope_theta, eps=c.rms_norm_eps,
                            **sizes)
    if vd < V:
        if data is None:
            from ..selfdistill import load_data
            data = load_data(models)
        drafter.d2t.copy_(frequent_tokens(data.split("train"), V, vd).to(torch.int32))
    drafter.to(models.target.device)
    return Eagle3Learner(drafter, c.num_hidden_layers, ttt_steps, eval_steps)


# ---------------------------------------------------------------- 4. the dynamic draft tree (EAGLE-2)
@dataclass
class Tree:
    tokens: torch.Tensor      # [N] draft-vocabulary ids
    parents: torch.Tensor     # [N] -1 = child of the root; parents come first
    scores: torch.Tensor      # [N] float64 log of the drafter's path probability
    q: torch.Tensor | None    # [N, Vd] sampling: the distribution each node was drawn from


def pick_children(logp: torch.Tensor, k: int, generator=None, q: torch.Tensor | None = None):
    """Children of each row: logp [R, Vd] -> tokens [R, k], their log-probabilities [R, k], q rows or None.

    Greedy (q None): the top k. Sampling: k draws without replacement from q [R, Vd]; sibling i's
    q row is q with siblings 0..i-1 removed and renormalised (what the verifier must be told)."""
    if q is None:
        lp, tok = logp.topk(k, dim=-1)
        return tok, lp, None
    tok = torch.multinomial(q, k, replacement=False, generator=generator)          # [R, k], in draw order
    lp = torch.log(q.gather(1, tok))
    rows = []
    left = q.clone()
    for i in range(k):
        rows.append(left / left.sum(-1, keepdim=True))
        left = left.scatter(1, tok[:, i:i + 1], 0.0)
    return tok, lp, torch.stack(rows, dim=1)                                        # q: [R, k, Vd]


def dynamic_tree(root_logp: torch.Tensor, expand: Callable, top_k: int, depth: int, total_tokens: int,
                 generator=None, temperature_q: Callable | None = None) -> Tree:
    """EAGLE-2's draft tree, from the drafter's next-token log-probabilities.

    root_logp [Vd]: after the root. expand(tokens [F], parent_rank [F], level) -> logp [F, Vd]: runs the
    drafter on F nodes of depth `level` (their draft-vocab tokens; each one's parent as its row in the
    previous expand call, 0 = the root at level 1) and returns their children's log-probabilities.
    Greedy: level 1 = the root's top_k tokens; then depth - 1 times: feed the top_k nodes of the newest
    level by score (cumulative log-probability) and give each its top_k children; finally rerank every
    candidate by score and keep the best total_tokens. A child's score never exceeds its parent's
    (ties go to the shallower node), so the kept set holds every kept node's parent: it is a tree.
    Everything stays on the drafter's device (no host sync until the caller reads the tree).

    Sampling (temperature_q maps logp rows to the q rows to draw from): children are drawn, and the
    tree is cut in creation order instead of reranked (see the module docstring).

    Example (greedy, top_k 2, depth 2), root: a .6, b .35; after a: c .5, d .4; after b: e .9, f .05.
    Candidates a .6, b .35, ac .30, ad .24, be .315, bf .0175. total_tokens 3 keeps a, b, be:
    tokens [a, b, e], parents [-1, -1, 1]; total_tokens 4 adds ac: [a, b, c, e], [-1, -1, 0, 1].
    """
    if top_k < 1 or depth < 1 or total_tokens < 1:
        raise ValueError(f"need top_k, depth, total_tokens >= 1, got {top_k}, {depth}, {total_tokens}")
    sampling = temperature_q is not None
    dev = root_logp.device
    logp = root_logp[None]                                    # [F, Vd] rows of the nodes just expanded
    frontier = torch.full((1,), -1, device=dev)               # their node indices (-1: the root)
    front_score = torch.zeros(1, dtype=torch.float64, device=dev)
    tokens, parents, scores, depths, qs = [], [], [], [], []
    n = 0
    for level in range(1, depth + 1):
        k = min(top_k, logp.shape[-1])
        q = temperature_q(logp) if sampling else None
        tok, lp, qrows = pick_children(logp, k, generator, q)               # [F, k]
        child_score = front_score[:, None] + lp.double()                    # [F, k]
        tokens.append(tok.reshape(-1))
        parents.append(frontier[:, None].expand(-1, k).reshape(-1))
        scores.append(child_score.reshape(-1))
        depths.append(torch.full((tok.numel(),), float(level), dtype=torch.float64, device=dev))
        if sampling:
            qs.append(qrows.reshape(-1, qrows.shape[-1]))
        first = n
        n += tok.numel()
        if level == depth or (sampling and n >= total_tokens):
            break
        # the top_k most confident nodes of this level are fed to the drafter next
        best = child_score.reshape(-1).topk(min(top_k, tok.numel())).indices
        best = best.sort().values                                           # keep creation order
        frontier = first + best
        front_score = child_score.reshape(-1)[best]
        logp = expand(tokens[-1][best], torch.div(best, k, rounding_mode="floor"), level)
    tokens, parents, scores = torch.cat(tokens), torch.cat(parents), torch.cat(scores)
    q = torch.cat(qs) if sampling else None
    if sampling:
        keep = torch.arange(min(total_tokens, n), device=dev)
    else:
        # rerank; subtle: a child whose probability rounds to 1 ties with its parent: the depth
        # penalty (far below any real log-probability gap in float64) lets the parent win.
        keep = (scores - 1e-9 * torch.cat(depths)).topk(min(total_tokens, n)).indices.sort().values
    # renumber parents into the kept list (a parent precedes its child, so it is already numbered)
    new_index = torch.full((n + 1,), -1, dtype=torch.long, device=dev)      # slot n stands for the root
    new_index[keep] = torch.arange(keep.numel(), device=dev)
    kept_parents = new_index[torch.where(parents[keep] < 0, n, parents[keep])]
    return Tree(tokens[keep], kept_parents, scores[keep], None if q is None else q[keep])


# ---------------------------------------------------------------- 5. the proposer
class Eagle3Proposer:
    """Reads the target's new features, grows a dynamic tree with the drafter, proposes it.

    The drafter's cache: committed entries at slots 0..L-1 (slot = position), then this step's tree
    nodes. Tree nodes are numbered by *rows*: row 0 is the root entry (its output a_{L-1}), row r >= 1
    the r-th node fed this step, in cache slot L + r - 1. Per row the proposer keeps, on the device,
    the drafter output (`out`: the feature its children read) and which tree slots it may see (`anc`:
    its ancestors and itself), so a level costs one drafter forward and no host sync."""

    def __init__(self, drafter: Eagle3Drafter, embed: torch.Tensor, lm_head: torch.Tensor, top_k: int = 8,
                 depth: int = 6, total_tokens: int = 48, name: str | None = None, graph: bool = True,
                 compile_block: bool = False, compile_proposal: bool = False):
        if top_k < 1 or depth < 1 or total_tokens < 1:
            raise ValueError(f"need top_k, depth, total_tokens >= 1, got {top_k}, {depth}, {total_tokens}")
        self.drafter, self.embed = drafter.eval(), embed
        self.d2t = drafter.d2t.long()
        self.head = lm_head[self.d2t]                            # [Vd, h]: the reduced head (a copy of rows)
        self.target_vocab = lm_head.shape[0]
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens
        self.hidden_layers = tuple(drafter.settings["layers"])
        self.name = name or (f"eagle3(chain, depth={depth})" if top_k == 1 else
                             f"eagle3(tree, N={total_tokens}, depth={depth}, k={top_k})")
        self.cache: KVCache | None = None
        self.length = 0                                          # committed entries in the drafter cache
        self.max_rows = 1 + top_k * max(depth - 1, 0)            # root + every node that can be fed
        self.fed_per_step: list[int] = []
        # a greedy proposal replayed from one CUDA graph on a GPU (see ProposeGraph); None: always eager.
        # compile_proposal: the whole recorded function through torch.compile first (ProposeGraph)
        self.graph = ProposeGraph(compile_proposal) if graph and drafter.d2t.is_cuda else None
        # compile_block: the decoder layer through torch.compile, which fuses its norms, RoPE and SwiGLU
        # into a few kernels (a proposal is several hundred small kernels; measured on the GPU only)
        self.block_fn = torch.compile(Block.forward, dynamic=True) if compile_block else None

    def reset(self, prompt_ids) -> None:
        self.length, self.fed_per_step = 0, []

    def _ensure_capacity(self, n: int) -> None:
        if self.cache is not None and n <= self.cache.max_len:
            return
        p = next(self.drafter.parameters())
        # a captured graph holds the cache's address: start big on a GPU so it is rarely reallocated
        new = self.drafter.new_cache(max(2 * n, 4096 if self.graph is not None else 256), p.device, p.dtype)
        if self.cache is not None and self.length:
            new.k[:, :, :, :self.length] = self.cache.k[:, :, :, :self.length]
            new.v[:, :, :, :self.length] = self.cache.v[:, :, :, :self.length]
        self.cache = new

    def logp(self, a: torch.Tensor) -> torch.Tensor:
        """a [R, d] -> log-probabilities over the draft vocabulary [R, Vd] (float32)."""
        return F.log_softmax((self.drafter.head_input(a) @ self.head.t()).float(), dim=-1)

    def read_context(self, tokens: list[int], hidden: dict) -> torch.Tensor | None:
        """Write the entries of the n tokens the target just cached (positions L - n .. L - 1, each with
        the token after it) into the drafter's cache; return a_{L-1}, the root entry's output [1, d]."""
        L = len(tokens) - 1
        if not hidden:
            return None
        start, ids = self.new_entries(tokens, hidden)
        a = self.read_rows(hidden, ids, start)
        self.length = L
        return a[-1:]

    def new_entries(self, tokens: list[int], hidden: dict) -> tuple[int, torch.Tensor]:
        """The entries the target just cached: their first position start = L - n (it must follow the
        drafter's entries) and each one's next token, ids [n] on the device. Makes room in the cache for
        them, a tree and a padded context read (ProposeGraph)."""
        L = len(tokens) - 1
        start = L - hidden[self.hidden_layers[0]].shape[0]
        if start != self.length:
            raise ValueError(f"the drafter holds {self.length} entries but the target's new features start at "
                             f"{start}: call reset() when a request starts")
        self._ensure_capacity(L + max(self.max_rows, self.depth + 1) + 1)
        return start, torch.tensor(tokens[start + 1:L + 1], device=self.head.device)

    def read_rows(self, hidden: dict, ids: torch.Tensor, start) -> torch.Tensor:
        """The drafter over T consecutive context entries: features {layer: [T, h]}, ids [T] (each entry's
        next token), positions start .. start + T - 1 (start: an int or a 0-d device tensor); -> [T, d].

        Entry i sits in cache slot start + i and sees slots 0 .. start + i. subtle: the mask spans the
        whole cache (columns past start + i are never visible), as in feed(): a width that grows every
        step is a new attention shape every step, and on an H100/H200 SDPA's cuDNN backend builds a new
        graph per shape (tens of ms, more than the step itself)."""
        dev = ids.device
        g = self.drafter.fuse_features([hidden[l][None].to(self.head.dtype) for l in self.hidden_layers])
        at = start + torch.arange(ids.shape[0], device=dev)                       # [T] positions = slots
        mask = torch.arange(self.cache.max_len, device=dev)[None] <= at[:, None]  # [T, W] causal
        a = self.drafter(g, self.embed[ids][None], at[None], self.cache.k[0], self.cache.v[0], at, mask,
                         self.block_fn)
        return a[0]

    def new_rows(self, a_root: torch.Tensor) -> dict:
        """Per-step row state: out [R, d] (row 0 = a_root), anc [R, R - 1] bool over the tree slots."""
        R = self.max_rows
        out = a_root.new_zeros(R, a_root.shape[-1])
        out[0] = a_root[0]
        return {"out": out, "anc": torch.zeros(R, R - 1, dtype=torch.bool, device=a_root.device)}

    def feed(self, tokens: torch.Tensor, parent_rows: torch.Tensor, rows: torch.Tensor, level: int, L,
             state: dict) -> torch.Tensor:
        """Run the drafter on tree nodes of depth `level`; return their children's logp [F, Vd].

        tokens [F] draft-vocab ids; parent_rows [F] (0 = the root); rows [F] their own rows (>= 1);
        L: committed entries (an int, or a 0-d tensor on the device: then nothing here reads the host).
        Node reads its parent's output and its own token, sits at RoPE position L + level - 1 and in
        cache slot L + row - 1, and sees the committed entries [0, L) plus its ancestors and itself.
        The mask spans the whole cache (static shape): columns past the tree are never visible."""
        out, anc = state["out"], state["anc"]
        dev = anc.device
        Fn, W = tokens.shape[0], self.cache.max_len
        # [F, R - 1] its own slot (a comparison, not one_hot: that may check its input on the host)
        own = torch.arange(anc.shape[1], device=dev)[None] == (rows - 1)[:, None]
        anc[rows] = anc[parent_rows] | own                                  # tree attention rows
        mask = (torch.arange(W, device=dev) < L)[None].repeat(Fn, 1)      # the committed entries
        mask[:, L + torch.arange(anc.shape[1], device=dev)] = anc[rows]      # + ancestors and itself
        pos = (L + level - 1 + torch.zeros(1, Fn, dtype=torch.long, device=dev))
        a = self.drafter(out[parent_rows][None], self.embed[self.d2t[tokens]][None], pos,
                         self.cache.k[0], self.cache.v[0], L + rows - 1, mask, self.block_fn)[0]
        out[rows] = a
        return self.logp(a)

    def grow(self, a_root: torch.Tensor, L, budget: int, generator=None, q_fn=None) -> Tree:
        """The dynamic tree after the root entry's output a_root [1, d] (L: int or 0-d device tensor)."""
        state = self.new_rows(a_root)
        K, dev = self.top_k, a_root.device

        def expand(node_tokens, parent_rank, level):
            # level-l nodes get rows 1 + (l-1)K ..; their parents were fed at level l-1 (the root at level 1)
            rows = 1 + (level - 1) * K + torch.arange(node_tokens.shape[0], device=dev)
            parent_rows = parent_rank * 0 if level == 1 else 1 + (level - 2) * K + parent_rank
            return self.feed(node_tokens, parent_rows, rows, level, L, state)
        return dynamic_tree(self.logp(a_root)[0], expand, K, self.depth, budget, generator, q_fn)

    @torch.inference_mode()
    def propose(self, ctx) -> Draft:
        tokens, L = ctx.tokens, len(ctx.tokens) - 1
        budget = min(self.total_tokens, ctx.max_draft)
        # the graph grows total_tokens nodes; a smaller budget (the last steps) reranks for fewer: eager
        if ctx.params.greedy and self.graph is not None and ctx.hidden and budget == self.total_tokens:
            drafted = self.graph(self, tokens, ctx.hidden)    # context read + tree growth in one replay
            if drafted is not None:       # None: the graph could not be used (capture failed)
                self.fed_per_step.append(self.top_k * (self.depth - 1))
                return Draft(drafted[0], drafted[1])
        a_root = self.read_context(tokens, ctx.hidden)
        if a_root is None or budget < 1:
            return Draft.empty()
        self.fed_per_step.append(self.top_k * (self.depth - 1))
        q_fn = None
        if not ctx.params.greedy:
            def q_fn(logp):
                # the drafter's distribution at the sampling temperature, mixed with a 1e-6 uniform so
                # that k draws without replacement always exist (q is what is reported, so still exact)
                q = probs_from_logits(logp, ctx.params)
                return (1 - 1e-6) * q + 1e-6 / q.shape[-1]
        tree = self.grow(a_root, L, budget, ctx.generator, q_fn)
        q = None
        if tree.q is not None:
            q = torch.zeros(len(tree.tokens), self.target_vocab, device=tree.q.device)
            q[:, self.d2t] = tree.q
        return Draft(self.d2t[tree.tokens].cpu(), tree.parents.cpu(), q, without_replacement=q is not None)


class ProposeGraph:
    """A whole greedy proposal (the context read and the tree growth) recorded once as a CUDA graph.

    At batch 1 each of the few hundred small kernels of a proposal costs more to launch from Python
    than to run; a graph replays them all with one call and one copy back. Shapes must be static, so:
    - the context read always takes P = depth + 1 rows (a step accepts at most depth draft tokens, so at
      most depth + 1 entries arrive). Rows past the n real ones are padding: they land in cache slots
      >= L, tree slots that the tree growth overwrites before any node may see them, or slots past the
      tree that nobody sees; their outputs are dropped (the root is row n - 1);
    - n, the first new position and the features live in device buffers, filled before each replay;
    - every mask spans the whole drafter cache; each level feeds exactly top_k nodes.
    The first step reads the prompt: all but its last P entries are read eagerly first. Captured at the
    first greedy step (with that step's real inputs, so warm-up writes are the real entries), and
    re-captured if the drafter cache is reallocated; a failed capture falls back to eager for good.
    Without a GPU (tests) the same padded function runs eagerly from the same buffers.

    compiled: the recorded function goes through torch.compile (static shapes) before the capture.
    Inside a graph a launch is cheap, but each of a proposal's few hundred kernels still costs its
    2-4 us floor (a depth-3 proposal took 1.4-1.6 ms on an H100, live run 7, where the drafter's
    weights take ~0.1 ms to read); compiling fuses the norms, RoPE, masks and the tree's bookkeeping
    into far fewer kernels.
    """

    def __init__(self, compiled: bool = False):
        self.graph, self.cache_id, self.failed, self.buf = None, None, False, None
        self.compiled = compiled

    def run(self, proposer) -> torch.Tensor:
        """The recorded function: buffers -> [2, N] (the tree's target-vocabulary tokens; its parents)."""
        b = self.buf
        a = proposer.read_rows(b["hidden"], b["ids"], b["start"])                  # [P, d]
        a_root = a.index_select(0, (b["n"] - 1).view(1))                           # [1, d]
        tree = proposer.grow(a_root, b["start"] + b["n"], proposer.total_tokens)   # L = start + n
        return torch.stack([proposer.d2t[tree.tokens], tree.parents])

    def __call__(self, proposer, tokens: list[int], hidden: dict):
        if self.failed:
            return None
        L, P = len(tokens) - 1, proposer.depth + 1
        start, ids = proposer.new_entries(tokens, hidden)
        dev, n = ids.device, ids.shape[0]
        if n > P:                           # the prompt: all but the last P entries eagerly (a new shape)
            with varying_shape_attention():
                proposer.read_rows({l: h[:n - P] for l, h in hidden.items()}, ids[:n - P], start)
            hidden, ids, start, n = {l: h[n - P:] for l, h in hidden.items()}, ids[n - P:], start + n - P, P
        if self.buf is None:
            some = hidden[proposer.hidden_layers[0]]
            self.buf = {"hidden": {l: some.new_zeros(P, some.shape[-1]) for l in proposer.hidden_layers},
                        "ids": torch.zeros(P, dtype=torch.long, device=dev),
                        "start": torch.zeros((), dtype=torch.long, device=dev),
                        "n": torch.ones((), dtype=torch.long, device=dev)}
        b = self.buf
        for l in proposer.hidden_layers:
            b["hidden"][l][:n].copy_(hidden[l])
        b["ids"][:n].copy_(ids)
        b["start"].fill_(start)
        b["n"].fill_(n)
        if dev.type != "cuda":
            out = self.run(proposer)
        else:
            if self.graph is None or self.cache_id != id(proposer.cache.k):
                try:
                    self._capture(proposer)
                except Exception as e:                               # noqa: BLE001 - any capture problem
                    import warnings
                    warnings.warn(f"eagle3: CUDA graph capture failed ({e}); proposing eagerly")
                    self.failed = True
                    return None
            self.graph.replay()
            out = self.out
        proposer.length = L
        out = out.cpu()
        return out[0], out[1]

    def _capture(self, proposer):
        fn = lambda: self.run(proposer)                                    # noqa: E731
        if self.compiled:                  # compiled at the first warm-up call of record(), outside the capture
            fn = torch.compile(fn, dynamic=False)
        self.graph, self.out = record(fn)
        self.cache_id = id(proposer.cache.k)


def load_drafter(path, models) -> Eagle3Drafter:
    """Rebuild the drafter from a checkpoint's header, load its weights (refusing another target's)."""
    from ..checkpoint import load_checkpoint, read_header
    cfg = dict(read_header(path)["config"])
    cfg.pop("ttt_steps", None)
    cfg.pop("eval_steps", None)
    drafter = Eagle3Drafter(**cfg)
    load_checkpoint(path, drafter, method="eagle3", base_model=models.target)
    return drafter.to(device=models.target.device, dtype=models.target.dtype).eval()


def build(models=None, checkpoint=None, top_k: int | None = None, depth: int | None = None,
          total_tokens: int | None = None, chain: bool = False, name: str | None = None, graph: bool = True,
          compile_block: bool = False, compile_proposal: bool = False, **train_options):
    """make_proposer("eagle3", models, total_tokens=12, depth=5): the dynamic-tree proposer.

    chain=True: the chain variant (top_k 1: one token per level, `depth` tokens). Tree sizes default to
    TREE_DEFAULTS of the target's device. checkpoint: default checkpoint_path("eagle3", profile) (under
    `tiny` one is trained in seconds; train_options such as ttt_steps=1 pick which). graph: on a GPU, replay
    each greedy proposal from one CUDA graph (ProposeGraph); False keeps it eager. compile_block: run the
    drafter's decoder layer through torch.compile (Eagle3Proposer); compile_proposal: the whole recorded
    proposal through torch.compile (ProposeGraph; GPU only)."""
    if models is None:
        raise ValueError("eagle3 needs models (from load_profile): it reads the target's features")
    from ..checkpoint import ensure_checkpoint
    path = checkpoint or ensure_checkpoint("eagle3", models, **train_options)
    drafter = load_drafter(path, models)
    d = TREE_DEFAULTS["cuda" if models.target.device.type == "cuda" else "cpu"]
    depth = depth or d["depth"]
    if chain:
        top_k, total_tokens = 1, depth
    top_k, total_tokens = top_k or d["top_k"], total_tokens or d["total_tokens"]
    t = models.target
    return Eagle3Proposer(drafter, t.model.embed_tokens.weight, t.lm_head.weight, top_k, depth, total_tokens, name,
                          graph, compile_block, compile_proposal)
