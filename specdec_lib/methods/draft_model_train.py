"""Distil the draft toward the target: fine-tune it on the target's own greedy outputs.

Acceptance depends on how often the draft guesses what the *target* would say, not on how good
the draft is in general. So we train it on exactly that: prompts, the target's greedy
continuations (generated with our model), cross-entropy on the continuation tokens.

Measured by teacher-forced acceptance: run the draft once over prompt + the target's continuation;
its argmax at every position says what it would propose there. Under greedy verification a
g-token draft starting at position i is accepted up to its first mismatch, so the whole greedy
speculative loop can be replayed from that one forward (exactly, for every g at once).

Scaled down for a 2-core CPU (the default): 64 training prompts cut to their last 128 tokens,
16 target tokens each, only the last 2 blocks + final norm trained (the frozen trunk's output is
computed once and reused). On a GPU the same function does full fine-tuning (--full):

  python -m specdec_lib.methods.draft_model_train --profile small                  # CPU, ~5 min
  python -m specdec_lib.methods.draft_model_train --profile qwen7b --full --train 276 --heldout 24 \\
      --epochs 2 --lr 1e-5 --out chapters/results/02_draft_model/distill_qwen7b_full.json    # GPU
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from ..decoding import prefill
from ..qwen2 import Qwen2, rope_cos_sin
from ..replay import replay_greedy
from ..tree import Draft

DRAFT_LENS = (1, 2, 3, 4, 6, 8)


# ---------------------------------------------------------------- data: the target's own continuations
def last_tokens(prompt_ids: list[int], n: int) -> list[int]:
    """Keep the last n tokens: the prompt still ends where the assistant starts to answer."""
    return list(prompt_ids[-n:])


@torch.inference_mode()
def greedy_batch(model: Qwen2, prompts: list[list[int]], n_new: int, batch: int = 8) -> list[list[int]]:
    """Greedy continuations of equal-length prompts, `batch` at a time (our forward, batch > 1).

    Equal lengths keep it simple: no padding, one position per row. Same tokens as
    generate(model, baseline, prompt, n_new) up to float rounding (tests check it in float32).
    """
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("greedy_batch needs prompts of one length (cut them with last_tokens)")
    out, dev = [], model.device
    for s in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[s:s + batch], device=dev)     # [B, P]
        B, P = ids.shape
        cache = model.new_cache(P + n_new, batch=B)
        logits, _ = prefill(model, ids, cache)
        new = [logits[:, -1].argmax(-1)]
        for _ in range(n_new - 1):                                   # one token per row and step
            logits, _ = prefill(model, new[-1][:, None], cache)
            new.append(logits[:, -1].argmax(-1))
        out += torch.stack(new, 1).tolist()
    return out


# ---------------------------------------------------------------- a model cut in two: frozen trunk, trained head
@torch.inference_mode()
def trunk_features(model: Qwen2, seqs: list[list[int]], n_frozen: int) -> list[torch.Tensor]:
    """Residual stream after the first n_frozen blocks, [T, H] per sequence (0 = the embeddings)."""
    feats = []
    for ids in seqs:
        ids_t = torch.tensor([ids], device=model.device)
        if n_frozen == 0:
            feats.append(model.model.embed_tokens(ids_t)[0].float())
            continue
        cache = model.new_cache(len(ids))
        _, h = prefill(model, ids_t, cache, hidden_layers=(n_frozen,), logits=False)
        feats.append(h[n_frozen][0].float())
    return feats


class Head(torch.nn.Module):
    """The draft's last blocks + final norm + lm_head, run on trunk features (float32, trainable)."""

    def __init__(self, model: Qwen2, n_frozen: int, train_lm_head: bool = False):
        super().__init__()
        self.config = model.config
        self.layers = copy.deepcopy(model.model.layers[n_frozen:]).float()
        self.norm = copy.deepcopy(model.model.norm).float()
        self.lm_head = copy.deepcopy(model.lm_head).float()
        self.lm_head.weight.requires_grad_(train_lm_head)
        self.n_frozen = n_frozen

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] features (equal lengths) -> logits [B, len(rows), V] at positions `rows`."""
        B, T, _ = x.shape
        c = self.config
        pos = torch.arange(T, device=x.device)[None].expand(B, -1)
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, x.dtype)
        mask = torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        slots = torch.arange(T, device=x.device)
        for layer in self.layers:
            # a fresh key/value buffer per layer: nothing is overwritten that autograd still needs
            k = torch.zeros(B, c.num_key_value_heads, T, c.head_dim, device=x.device, dtype=x.dtype)
            x = layer(x, cos, sin, k, torch.zeros_like(k), slots, mask)
        return self.lm_head(self.norm(x[:, rows]))

    def write_back(self, model: Qwen2) -> None:
        """Copy the trained weights into the draft (in its dtype)."""
        with torch.no_grad():
            for src, dst in zip(self.layers, model.model.layers[self.n_frozen:]):
                dst.load_state_dict({k: v.to(model.dtype) for k, v in src.state_dict().items()})
            model.model.norm.weight.copy_(self.norm.weight)
            if self.lm_head.weight.requires_grad:
                model.lm_head.weight.copy_(self.lm_head.weight)


# ---------------------------------------------------------------- teacher-forced acceptance
@torch.no_grad()
def draft_guesses(head: Head, feats: list[torch.Tensor], prompt_lens: list[int]) -> list[list[int]]:
    """The draft's argmax after prompt + reference[:i], for every i (one forward per sequence)."""
    out = []
    for x, P in zip(feats, prompt_lens):
        rows = torch.arange(P - 1, x.shape[0], device=x.device)
        out.append(head(x[None], rows)[0].argmax(-1).tolist())
    return out


class _Guesses:
    """A proposer that drafts the draft's teacher-forced guesses from where the output stands."""
    name, hidden_layers = "teacher_forced", ()

    def __init__(self, guesses: list[int], g: int):
        self.guesses, self.g = guesses, g

    def reset(self, prompt_ids) -> None:
        pass

    def propose(self, ctx) -> Draft:
        done = len(ctx.tokens) - ctx.prompt_len
        return Draft.chain(self.guesses[done:done + min(self.g, ctx.max_draft)])


def replay_acceptance(guesses: list[int], reference: list[int], g: int) -> tuple[int, int, int]:
    """Replay greedy speculation with draft length g against a reference continuation.

    guesses[i] = the draft's argmax after reference[:i]. At position i the draft proposes
    guesses[i], guesses[i+1], ... (each is what it would say after the earlier ones, as long as
    they matched), accepted up to the first mismatch; then one bonus token: exactly the shared
    greedy replay (replay.py) of a proposer that reads its drafts off `guesses`. Returns
    (proposed, accepted, steps). Example: reference [5, 6, 7], guesses [5, 9, 7, x], g = 2 ->
    step 1 proposes [5, 9], accepts 1 (+ bonus 6); step 2 has one token left, which is always a
    bonus, so it proposes nothing -> (2, 1, 2).
    """
    steps = replay_greedy(_Guesses(guesses, g), [], reference)
    return sum(p for p, _, _ in steps), sum(a for _, a, _ in steps), len(steps)


def acceptance_table(guesses, references, draft_lens=DRAFT_LENS) -> dict:
    """{"g": {acceptance_rate, mean_accepted_len}} (string keys, as JSON stores them) plus the per-token match rate, over all sequences."""
    out = {}
    for g in draft_lens:
        prop = acc = steps = emitted = 0
        for gs, ref in zip(guesses, references):
            p, a, s = replay_acceptance(gs, ref, g)
            prop, acc, steps, emitted = prop + p, acc + a, steps + s, emitted + len(ref)
        out[str(g)] = {"acceptance_rate": acc / prop if prop else 0.0, "mean_accepted_len": emitted / steps}
    matches = sum(int(a == b) for gs, ref in zip(guesses, references) for a, b in zip(gs, ref))
    return {"token_match_rate": matches / sum(len(r) for r in references), "by_draft_len": out}


# ---------------------------------------------------------------- training
def train_head(head: Head, feats, prompt_lens, targets, epochs: int = 2, lr: float = 2e-5, batch: int = 8,
               seed: int = 0, log=print) -> list[float]:
    """AdamW on cross-entropy to the target's tokens (equal-length sequences per batch)."""
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(len(feats), generator=gen).tolist()
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            P = prompt_lens[idx[0]]
            x = torch.stack([feats[i] for i in idx])                   # [B, T, H]
            rows = torch.arange(P - 1, x.shape[1] - 1, device=x.device)  # positions that predict the targets
            y = torch.tensor([targets[i] for i in idx], device=x.device)  # [B, C]
            logits = head(x, rows)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        log(f"epoch {epoch + 1}: mean loss {sum(losses[-len(range(0, len(order), batch)):]) / len(range(0, len(order), batch)):.3f}")
    head.eval()
    return losses


def distill(models, n_train: int = 64, n_heldout: int = 24, prompt_tokens: int = 128, new_tokens: int = 16,
            n_eval7b: int = 20, eval7b_tokens: int = 64, train_blocks: int = 2, full: bool = False,
            epochs: int = 2, lr: float = 2e-5, batch: int = 8, log=print) -> dict:
    """The whole recipe; returns measured results (acceptance before/after on held-out prompts)."""
    from ..data import qwen7b_greedy
    t0 = time.perf_counter()
    pool = qwen7b_greedy("train300")
    eval60 = qwen7b_greedy("eval60")[:n_eval7b]
    eval_ids = {p.prompt_id for p in eval60}
    pool = [p for p in pool if p.prompt_id not in eval_ids]
    if n_train + n_heldout > len(pool):
        raise ValueError(f"asked for {n_train} + {n_heldout} prompts, the pool has {len(pool)}")
    train, heldout = pool[:n_train], pool[n_train:n_train + n_heldout]

    # 1. the target's own greedy continuations (train and held-out prompts alike)
    prompts = [last_tokens(p.prompt_ids, prompt_tokens) for p in train + heldout]
    completions = greedy_batch(models.target, prompts, new_tokens)
    log(f"target continuations: {len(prompts)} x {new_tokens} tokens ({time.perf_counter() - t0:.0f} s)")

    # 2. the draft cut in two: frozen trunk features once, a trainable float32 head
    n_layers = models.draft.config.num_hidden_layers
    n_frozen = 0 if full else n_layers - train_blocks
    seqs = [p + c for p, c in zip(prompts, completions)]
    feats = trunk_features(models.draft, seqs, n_frozen)
    e_prompts = [p.prompt_ids for p in eval60]
    e_refs = [p.reference_ids[:eval7b_tokens] for p in eval60]
    e_feats = trunk_features(models.draft, [p + r for p, r in zip(e_prompts, e_refs)], n_frozen)
    log(f"trunk features ({n_frozen} frozen blocks): {time.perf_counter() - t0:.0f} s")
    head = Head(models.draft, n_frozen, train_lm_head=full)

    P = len(prompts[0])
    tr, ho = slice(0, n_train), slice(n_train, None)

    def measure():
        return {"target_heldout": acceptance_table(draft_guesses(head, feats[ho], [P] * n_heldout),
                                                   completions[ho]) if n_heldout else None,
                "target_train": acceptance_table(draft_guesses(head, feats[tr], [P] * n_train), completions[tr]),
                "qwen7b_eval60": acceptance_table(draft_guesses(head, e_feats, [len(p) for p in e_prompts]), e_refs)}

    before = measure()
    log(f"before: 7B eval60 token match {before['qwen7b_eval60']['token_match_rate']:.3f}")
    losses = train_head(head, feats[tr], [P] * n_train, completions[tr], epochs, lr, batch, log=log)
    after = measure()
    log(f"after: 7B eval60 token match {after['qwen7b_eval60']['token_match_rate']:.3f} ({time.perf_counter() - t0:.0f} s)")
    trained = sum(p.numel() for p in head.parameters() if p.requires_grad)
    return {"before": before, "after": after, "losses": losses, "trained_parameters": trained,
            "n_train": n_train, "n_heldout": n_heldout, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "n_eval7b": len(eval60), "eval7b_tokens": eval7b_tokens, "train_blocks": "all" if full else train_blocks,
            "epochs": epochs, "lr": lr, "batch": batch, "seconds": time.perf_counter() - t0,
            "train_prompt_ids": [p.prompt_id for p in train], "heldout_prompt_ids": [p.prompt_id for p in heldout],
            **models.provenance(), "head": head}


def main(argv=None):
    from ..metrics import write_json
    from ..models import load_profile
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--full", action="store_true", help="train every block, the norm and lm_head (GPU)")
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--eval7b", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--save", default=None, help="folder for the trained draft (config.json + safetensors)")
    ap.add_argument("--out", default="chapters/results/02_draft_model/distill.json")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    models = load_profile(a.profile)
    res = distill(models, a.train, a.heldout, a.prompt_tokens, a.new_tokens, a.eval7b, full=a.full,
                  epochs=a.epochs, lr=a.lr)
    head = res.pop("head")
    res["command"] = "python -m specdec_lib.methods.draft_model_train " + " ".join(argv or __import__("sys").argv[1:])
    write_json(a.out, res)
    if a.save:
        from ..qwen2 import save_pretrained
        head.write_back(models.draft)
        save_pretrained(models.draft, a.save)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
