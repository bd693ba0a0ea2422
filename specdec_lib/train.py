"""One training loop for every learned proposer (Medusa heads, an EAGLE drafter, a PARD adapter).

A method brings a `Learner`: the trainable module, the target layers its loss needs, and the loss.
Everything else is here, once:

    for step in range(steps):
        batch   = next(train_batches)                       # prompt + the target's own response
        teacher = teacher_forward(target, batch.ids, layers) # frozen target: hidden states, no grad
        loss, metrics = learner.loss(batch, teacher)         # the method's part
        loss.backward(); clip; AdamW step; warmup + cosine learning rate
        every eval_every steps: the same loss on held-out prompts, per-position accuracy

The target runs inside the loop (no stored activations: 2M tokens x 3 layers x 1536 floats would be
18 GB), under no_grad, in the model's own dtype. The full-vocabulary cross-entropy is chunked and
recomputed in the backward pass (`chunked_cross_entropy`), so a [tokens, 151936] logit matrix never
exists whole. bf16 autocast on a GPU; float32 on a CPU.

    python -m specdec_lib.train medusa --profile tiny        # seconds, on a CPU
    python -m specdec_lib.train medusa --profile small       # minutes, on a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .metrics import write_json
from .tree import chain_inputs

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = {"medusa": "05_medusa", "eagle3": "06_eagle3", "pard": "07_pard"}


@dataclass
class Batch:
    ids: torch.Tensor            # [B, T] long: prompt + response, right-padded with 0
    response_mask: torch.Tensor  # [B, T] bool: ids[b, t] is a response token (not prompt, not padding)
    # A learner that predicts token t + d from position t trains where response_mask[:, t + d] holds.

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.response_mask.to(device))


@dataclass
class TeacherOut:
    hidden: dict[int, torch.Tensor]   # {layer: [B, T, H]} the frozen target's hidden states (no grad)
    lm_head: torch.Tensor             # [V, H] the target's LM head weight (frozen)
    embed: torch.Tensor               # [V, H] the target's input embedding (frozen)


class Learner(Protocol):
    name: str
    hidden_layers: tuple[int, ...]    # target layers the loss needs; () = the target is not run
    module: torch.nn.Module           # the trainable part: what the checkpoint stores

    def loss(self, batch: Batch, teacher: TeacherOut | None) -> tuple[torch.Tensor, dict]:
        """Scalar loss and metrics {"acc": [top-1 per position], "top5": [...], "n": [counted tokens]}."""

    def header(self) -> dict:
        """JSON-able config, enough to rebuild the module (stored in the checkpoint)."""


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16           # sequences per step
    max_len: int = 768             # tokens per sequence: the tail of the prompt + the response
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    log_every: int = 10
    time_budget_s: float | None = None   # wall-clock cap: timed over steps 3-12, fewer steps if they would not fit


# ---------------------------------------------------------------- data -> batches
def to_batch(seqs, max_len: int) -> Batch:
    """Right-pad prompt + response rows; keep the response and as much of the prompt as fits.

    A right-padded batch needs no mask beyond the causal one: a padding slot comes after every real
    token of its row, and a causal row never looks ahead.
    """
    rows, masks = [], []
    for s in seqs:
        resp = s.response_ids[:max_len - 1]
        prompt = s.prompt_ids[-(max_len - len(resp)):]
        rows.append(prompt + resp)
        masks.append([False] * len(prompt) + [True] * len(resp))
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (r, m) in enumerate(zip(rows, masks)):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(m)] = torch.tensor(m)
    return Batch(ids, mask)


def batches(seqs, batch_size: int, max_len: int, seed: int = 0) -> Iterator[Batch]:
    """Shuffled batches forever (a new order each pass). Rows of similar length are grouped (less
    padding): shuffle, cut into chunks of 32 batches, sort each chunk by length."""
    if not seqs:
        raise ValueError("no sequences to train on: is the data set (or its split) empty?")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(seqs), generator=g).tolist()
        span = 32 * batch_size
        for c in range(0, len(order), span):
            chunk = sorted(order[c:c + span], key=lambda i: len(seqs[i].prompt_ids) + len(seqs[i].response_ids))
            groups = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            for j in torch.randperm(len(groups), generator=g).tolist():
                yield to_batch([seqs[i] for i in groups[j]], max_len)


# ---------------------------------------------------------------- the frozen target
@torch.no_grad()
def teacher_forward(target, ids: torch.Tensor, layers: tuple[int, ...]) -> TeacherOut:
    """Hidden states of `layers` for a right-padded batch [B, T], with a causal mask and a scratch cache."""
    B, T = ids.shape
    cache = target.new_cache(T, batch=B)
    pos, slots, mask = chain_inputs(0, T, device=target.device)
    _, hidden = target(ids.to(target.device), pos.expand(B, -1), cache, mask, slots, hidden_layers=layers,
                       logits=False)
    return TeacherOut({k: v.detach() for k, v in hidden.items()}, target.lm_head.weight.detach(),
                      target.model.embed_tokens.weight.detach())


# ---------------------------------------------------------------- losses over a 151,936-token vocabulary
def _ce_chunk(h, w, y):
    logits = (h @ w.t()).float()                                   # [n, V]
    loss = F.cross_entropy(logits, y, reduction="sum")
    top5 = logits.topk(5, dim=-1).indices                          # [n, 5]
    return loss, (top5[:, 0] == y).sum(), (top5 == y[:, None]).any(-1).sum()


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 4096):
    """Sum of cross-entropies of softmax(hidden @ weight.T) against targets, plus top-1/top-5 hit counts.

    hidden [N, H], weight [V, H], targets [N]. Each chunk of rows is recomputed in the backward pass
    (activation checkpointing), so memory holds one [chunk, V] block, not [N, V].
    Returns (loss_sum, top1_correct, top5_correct) as tensors.
    """
    loss = hidden.new_zeros((), dtype=torch.float32)
    top1 = top5 = torch.zeros((), dtype=torch.long, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        h, y = hidden[s:s + chunk], targets[s:s + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            l, c1, c5 = checkpoint(_ce_chunk, h, weight, y, use_reentrant=False)
        else:
            l, c1, c5 = _ce_chunk(h, weight, y)
        loss, top1, top5 = loss + l, top1 + c1, top5 + c5
    return loss, top1, top5


def _kl_chunk(h, w, th, tw):
    student = F.log_softmax((h @ w.t()).float(), dim=-1)
    teacher = F.softmax((th @ tw.t()).float(), dim=-1)
    return -(teacher * student).sum()


def chunked_soft_cross_entropy(hidden, weight, teacher_hidden, teacher_weight, chunk: int = 2048):
    """Sum over rows of -sum_v p_target(v) log p_student(v) (distillation to the target's distribution).

    The teacher's logits are teacher_hidden @ teacher_weight.T, computed per chunk, never stored."""
    loss = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s:s + chunk], weight, teacher_hidden[s:s + chunk], teacher_weight)
        loss = loss + (checkpoint(_kl_chunk, *args, use_reentrant=False)
                       if torch.is_grad_enabled() and hidden.requires_grad else _kl_chunk(*args))
    return loss


# ---------------------------------------------------------------- the loop
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to 10% of it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _autocast(device):
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _merge(metrics: list[dict], weights: list[float]) -> dict:
    """Average metric lists over batches, weighted (e.g. by counted tokens)."""
    out = {}
    for key in metrics[0]:
        vals = [m[key] for m in metrics]
        if isinstance(vals[0], (list, tuple)):
            out[key] = [sum(w * v[i] for w, v in zip(weights, vals)) / sum(weights) for i in range(len(vals[0]))]
        elif isinstance(vals[0], (int, float)):
            out[key] = sum(w * v for w, v in zip(weights, vals)) / sum(weights)
    return out


def steps_that_fit(step: int, elapsed: float, budget: float, per_step: float, per_eval: float,
                   eval_every: int) -> int:
    """How many steps a run that is at `step` after `elapsed` seconds can have in all and end within
    `budget`: the remaining steps at `per_step` seconds, one evaluation every `eval_every` steps and
    two more at the end (the last step's and the final one). At least step + 1: the run can always stop."""
    left = budget - elapsed - 2 * per_eval
    return max(step + 1, step + int(left / (per_step + per_eval / eval_every)))


def evaluate(learner, target, seqs, cfg: TrainConfig, n_batches: int | None = None) -> dict:
    """The learner's loss and metrics on held-out sequences (a fixed set of batches)."""
    it = batches(seqs, cfg.batch_size, cfg.max_len, seed=1234)
    metrics, weights = [], []
    learner.module.eval()
    with torch.no_grad(), _autocast(target.device):
        for _ in range(n_batches or cfg.eval_batches):
            b = next(it).to(target.device)
            teacher = teacher_forward(target, b.ids, learner.hidden_layers) if learner.hidden_layers else None
            loss, m = learner.loss(b, teacher)
            metrics.append(dict(m, loss=float(loss)))
            weights.append(float(b.response_mask.sum()))
    learner.module.train()
    return _merge(metrics, weights)


def train(learner, target, data, cfg: TrainConfig, log_path=None, progress: bool = True, provenance=None) -> dict:
    """Train learner.module on data.split("train"); evaluate on data.split("heldout"). Returns the log
    (also written to log_path as JSON after every evaluation, so an interrupted run keeps its curve)."""
    from tqdm.auto import tqdm
    torch.manual_seed(cfg.seed)
    train_seqs, held = data.split("train"), data.split("heldout") or data.split("train")[:cfg.batch_size]
    params = [p for p in learner.module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{learner.name}: the module has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    log = dict(method=learner.name, config=asdict(cfg), learner=learner.header(), provenance=provenance or {},
               data=dict(sha256=data.manifest.get("sha256"), train_sequences=len(train_seqs),
                         heldout_sequences=len(held)),
               trainable_parameters=sum(p.numel() for p in params), steps=[], evals=[])
    it = batches(train_seqs, cfg.batch_size, cfg.max_len, cfg.seed)
    tokens, t0, dev, eval_s = 0, time.perf_counter(), target.device, 0.0
    learner.module.train()
    bar = tqdm(total=cfg.steps, desc=f"train {learner.name}", disable=not progress)
    for step in range(cfg.steps):
        if step == cfg.steps:   # (the step count may shrink, below)
            break
        if step == 3:
            mark = (time.perf_counter(), eval_s, 3)  # steps 0-2 carry one-off costs (kernel choice, allocator)
        if cfg.time_budget_s and step >= 13 and (step == 13 or step % cfg.eval_every == 0):
            # Measured speed of the steps since the last plan (evaluations timed apart) -> the steps that
            # fit the budget with their evaluations. Planned again at every evaluation, so a run that
            # slows down (another job on the same GPU) still ends in time; a later cut steepens the rest of
            # the cosine decay (lr_at reads cfg.steps). (Timing from step 0 counted
            # an 11 s first step on the H200 and halved EAGLE-3's and PARD's steps.)
            now = time.perf_counter()
            per_step = ((now - mark[0]) - (eval_s - mark[1])) / (step - mark[2])
            fit = steps_that_fit(step, now - t0, cfg.time_budget_s, per_step, eval_s / len(log["evals"]),
                                 cfg.eval_every)
            if fit < cfg.steps:
                log.setdefault("steps_planned", cfg.steps)
                cfg.steps = log["config"]["steps"] = fit
                bar.total = cfg.steps
            mark = (now, eval_s, step)
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            te = time.perf_counter()
            ev = evaluate(learner, target, held, cfg)
            eval_s += time.perf_counter() - te
            log["evals"].append(dict(step=step, tokens=tokens, wall_s=time.perf_counter() - t0, **ev))
            if log_path:
                write_json(log_path, log)
        b = next(it).to(dev)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        teacher = teacher_forward(target, b.ids, learner.hidden_layers) if learner.hidden_layers else None
        with _autocast(dev):
            loss, m = learner.loss(b, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        tokens += int(b.response_mask.sum())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            row = dict(step=step, loss=float(loss.detach()), lr=lr_at(step, cfg), grad_norm=float(grad_norm), tokens=tokens,
                       wall_s=time.perf_counter() - t0, **{k: v for k, v in m.items() if k in ("acc", "top5")})
            log["steps"].append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    bar.close()
    ev = evaluate(learner, target, held, cfg, n_batches=cfg.eval_batches * 2)
    log["final"] = dict(step=cfg.steps, tokens=tokens, wall_s=time.perf_counter() - t0, **ev)
    if log_path:
        write_json(log_path, log)
    return log


# ---------------------------------------------------------------- one command for any method
# Sizes per profile: `tiny` trains in seconds on a CPU; `small` fits a few minutes of one H200.
PROFILE_CONFIG = {
    "tiny": dict(steps=30, batch_size=4, max_len=64, eval_every=10, eval_batches=2, lr=3e-3, warmup=5, log_every=5),
    "small": dict(steps=600, batch_size=32, max_len=768, eval_every=100, eval_batches=8),
    "qwen7b": dict(steps=600, batch_size=16, max_len=768, eval_every=100, eval_batches=8),
}


def train_method(method: str, models, data=None, out=None, log_path=None, bits: int | None = None,
                 progress: bool = True, config: dict | None = None, init=None, **options):
    """Build `method`'s learner, train it on the self-distilled data, save the checkpoint at `out`.

    bits: how the checkpoint stores matrices (checkpoint.save_checkpoint): by default full precision
    under `tiny`, else the method's CHECKPOINT_BITS (8 unless it says otherwise). A quantized checkpoint
    is loaded back and evaluated again, so the log's "final_stored" is what the committed weights do.
    init: a checkpoint of the same method and options to start from (a warm start: the new steps get
    their own warm-up and cosine decay); the log's "init" and the checkpoint's steps count both runs."""
    from .checkpoint import load_checkpoint, save_checkpoint, update_header
    from .selfdistill import load_data
    mod = importlib.import_module(f"specdec_lib.methods.{method}")
    learner = mod.learner(models, **options)
    base = getattr(learner, "base_model", models.target)
    init_info = None
    if init is not None:
        head = load_checkpoint(init, learner.module, method=method, base_model=base)
        if head["config"] != json.loads(json.dumps(learner.header())):     # as stored (tuples are lists)
            raise ValueError(f"{Path(init).name} was trained with {head['config']}, not {learner.header()}: "
                             "pass the same --option values to continue it")
        init_info = dict(checkpoint=Path(init).name, steps=head["steps"], heldout=head.get("heldout"))
    data = data or load_data(models)
    cfg = TrainConfig(**{**PROFILE_CONFIG[models.profile], **getattr(mod, "TRAIN_DEFAULTS", {}).get(models.profile, {}),
                         **(config or {})})
    log = train(learner, models.target, data, cfg, log_path, progress, provenance=models.provenance())
    if "only_temperatures" in data.manifest:          # SelfDistillData.only: a subset of the answers
        log["data"]["only_temperatures"] = data.manifest["only_temperatures"]
    if init_info is not None:
        log["init"] = init_info
    if log_path and ("init" in log or "only_temperatures" in log["data"]):
        write_json(log_path, log)
    if out is not None:
        if bits is None:
            bits = 32 if models.profile == "tiny" else getattr(mod, "CHECKPOINT_BITS", 8)
        extra = dict(heldout=log["final"], base_model_name=(
            models.draft_name if base is models.draft else models.target_name))
        if init_info is not None:
            extra.update(init_from=init_info["checkpoint"], init_steps=init_info["steps"])
        total = log["config"]["steps"] + (init_info["steps"] if init_info else 0)
        save_checkpoint(out, learner.module, method=method, base_model=base, config=learner.header(), bits=bits,
                        data_sha256=data.manifest.get("sha256"), steps=total, extra=extra)
        if bits < 16:
            # What the stored (rounded) weights do on the same held-out batches as log["final"]
            load_checkpoint(out, learner.module, method=method, base_model=base)
            held = data.split("heldout") or data.split("train")[:cfg.batch_size]   # as train() does
            log["final_stored"] = dict(bits=bits, **evaluate(learner, models.target, held, cfg,
                                                             n_batches=cfg.eval_batches * 2))
            update_header(out, heldout_stored=log["final_stored"])      # the stored tensors unchanged
            if log_path:
                write_json(log_path, log)
    return learner, log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=sorted(CHAPTERS))
    ap.add_argument("--profile", default=None)
    ap.add_argument("--data", default=None, help="self-distilled data folder (default data/selfdistill/<profile>)")
    ap.add_argument("--out", default=None, help="checkpoint (default specdec_lib/assets/checkpoints/<method>-<profile>)")
    ap.add_argument("--log", default=None, help="JSON log (default chapters/results/<chapter>/train_<method>_<profile>.json)")
    ap.add_argument("--bits", type=int, choices=(32, 16, 8, 4), default=None,
                    help="checkpoint precision (default: the method's CHECKPOINT_BITS, 8 unless it says; 32 under tiny)")
    for name, typ in (("steps", int), ("batch-size", int), ("max-len", int), ("lr", float), ("warmup", int),
                      ("eval-every", int), ("seed", int), ("time-budget-s", float)):
        ap.add_argument(f"--{name}", type=typ, default=None)
    ap.add_argument("--init", default=None, metavar="CHECKPOINT",
                    help="continue from this checkpoint (same method and options): a warm start")
    ap.add_argument("--temperatures", default=None, metavar="T[,T...]",
                    help="train and evaluate only on the answers sampled at these temperatures (0 = greedy)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="method option, e.g. --option heads=4 (value parsed as JSON when possible)")
    a = ap.parse_args(argv)
    from .checkpoint import checkpoint_path
    from .models import load_profile
    from .selfdistill import load_data
    from .timing import phase_printer
    options = {}
    for kv in a.option:
        k, _, v = kv.partition("=")
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    config = {k: getattr(a, k) for k in ("steps", "batch_size", "max_len", "lr", "warmup", "eval_every", "seed",
                                         "time_budget_s")
              if getattr(a, k) is not None}
    stamp = phase_printer()             # where the time goes outside the loop, printed as it happens
    models = load_profile(a.profile)
    stamp(f"models loaded ({models.profile}, {models.device})")
    data = load_data(models, a.data)
    if a.temperatures is not None:
        data = data.only([float(t) for t in a.temperatures.split(",")])
    stamp(f"data read: {len(data.sequences)} sequences, {data.response_tokens:,} response tokens")
    out = Path(a.out) if a.out else checkpoint_path(a.method, models.profile)
    log_path = a.log or ROOT / "chapters" / "results" / CHAPTERS[a.method] / f"train_{a.method}_{models.profile}.json"
    if models.profile == "tiny" and not a.log:
        log_path = None
    learner, log = train_method(a.method, models, data, out, log_path, bits=a.bits,
                                config=config, init=a.init, **options)
    stamp("trained and saved")
    f = log["final"]
    print(f"{a.method} on {models.profile}: {log['trainable_parameters'] / 1e6:.2f} M trainable parameters, "
          f"{f['tokens']} tokens in {f['wall_s']:.0f} s; held-out loss {f['loss']:.3f}, top-1 "
          + ", ".join(f"{x:.3f}" for x in f.get("acc", [])))
    if "final_stored" in log:
        s = log["final_stored"]
        print(f"stored in {s['bits']} bits: held-out loss {s['loss']:.3f}, top-1 "
              + ", ".join(f"{x:.3f}" for x in s.get("acc", [])))
    print(f"checkpoint: {out} ({out.stat().st_size / 2**20:.2f} MiB)" + (f"; log: {log_path}" if log_path else ""))


if __name__ == "__main__":
    main()
