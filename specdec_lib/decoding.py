"""The one decode loop. Every method, and the autoregressive baseline, runs through `generate`.

State: `tokens` = prompt + output so far. The target's KV cache holds every token except the
last one, the *root* (the newest accepted token, not fed yet). Each step:

  1. draft = proposer.propose(ctx)                       a chain or tree of N tokens
  2. one target forward over [root] + draft (T = N + 1)  positions L + depth, tree mask
  3. accepted = verify(draft, logits)                    path + bonus token
  4. cache.keep(L, [0] + [1 + i for i in path])          root and accepted nodes stay
  5. tokens += accepted tokens + bonus; the bonus is the new root

The baseline proposes nothing (N = 0): step 2 is then an ordinary one-token decode step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .metrics import RequestRecord, StepRecord, request_record
from .sampling import SamplingParams
from .tree import Draft, chain_inputs, step_inputs
from .verify import verify


@dataclass
class Context:
    """What a proposer sees at each step."""
    tokens: list[int]                  # prompt + output so far; tokens[-1] is the root
    prompt_len: int
    max_draft: int                     # at most this many nodes can be verified this step
    params: SamplingParams
    generator: torch.Generator | None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    # ^ target hidden states {layer: [n, H]} of the n tokens written to the cache since the
    #   last call: prompt[:-1] at the first step, then the root and the accepted nodes.


class Proposer(Protocol):
    """A speculative method is only this: look at the context, propose a draft."""
    name: str
    hidden_layers: tuple[int, ...]     # target layers whose hidden states it needs, () for none

    def reset(self, prompt_ids: list[int]) -> None:
        """A new request starts (drop per-request state, keep anything learned across requests)."""

    def propose(self, ctx: Context) -> Draft:
        ...


@dataclass
class GenerationResult:
    tokens: list[int]                  # generated tokens (EOS included when reached)
    steps: list[StepRecord]
    record: RequestRecord
    stop_reason: str                   # "eos" or "length"


def check_prompt(prompt_ids, max_new_tokens: int, max_len: int) -> list[int]:
    prompt = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} does not fit "
                         f"the KV cache of {max_len} slots: shorten the prompt or raise max_len")
    return prompt


def prefill(model, ids: torch.Tensor, cache, hidden_layers=(), kv_len: int | None = None,
            forward: Callable | None = None, logits: bool = True):
    """Feed ids [B, T] as a causal chain right after the cache's `length` tokens, then advance
    cache.length by T: the one place a cache grows without a verify step.

    Positions and slots continue from cache.length (every row of the batch at the same ones).
    forward: a replacement for model.forward (same signature); kv_len: static mask width.
    Returns forward's (logits [B, T, V] or None when logits=False, {layer: hidden [B, T, H]}).
    """
    B, T = ids.shape
    if cache.length + T > cache.max_len:
        raise ValueError(f"{T} tokens after {cache.length} cached ones do not fit the cache of "
                         f"{cache.max_len} slots: allocate a larger cache (new_cache(max_len))")
    pos, slots, mask = chain_inputs(cache.length, T, kv_len, ids.device)
    out = (forward or model.forward)(ids, pos.expand(B, -1), cache, mask, slots, hidden_layers, logits=logits)
    cache.length += T
    return out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def generate(target, proposer: Proposer, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_ids=(), max_len: int | None = None,
             forward: Callable | None = None, kv_len: int | None = None, cache=None,
             prompt_id="0") -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids with target, speculating with proposer.

    forward: optional replacement for target.forward with the same signature (e.g. a CUDA-graph
    runner); it receives its step inputs on the CPU and moves them itself; kv_len: attend over this many cache slots every step (static shapes) instead of L + T;
    cache: reuse this KVCache (a CUDA-graph runner owns one) instead of allocating one.
    """
    params = SamplingParams(temperature, top_p)
    max_len = cache.max_len if cache is not None else (max_len or (len(prompt_ids) + max_new_tokens + 64))
    prompt = check_prompt(prompt_ids, max_new_tokens, max_len)
    device = target.device
    inputs_on = device if forward is None else "cpu"
    forward = forward or target.forward
    eos = set(int(e) for e in eos_ids)
    generator = torch.Generator(device=device).manual_seed(seed)
    layers = tuple(getattr(proposer, "hidden_layers", ()))
    if cache is None:
        cache = target.new_cache(max_len)
    cache.rollback(0)                         # a reused cache starts empty
    _sync(device)
    t_start = time.perf_counter()

    # Prefill everything but the root.
    hidden = {}
    if len(prompt) > 1:
        body = torch.tensor([prompt[:-1]], device=inputs_on)
        _, h = prefill(target, body, cache, layers, kv_len, forward, logits=False)
        hidden = {k: v[0] for k, v in h.items()}
    _sync(device)
    prefill_s = time.perf_counter() - t_start

    proposer.reset(prompt)
    tokens, steps, stop = list(prompt), [], "length"
    while len(tokens) - len(prompt) < max_new_tokens:
        t0 = time.perf_counter()
        L = cache.length                     # == len(tokens) - 1
        left = max_new_tokens - (len(tokens) - len(prompt))
        ctx = Context(tokens, len(prompt), max_draft=min(left - 1, max_len - L - 1), params=params,
                      generator=generator, hidden=hidden)
        draft = proposer.propose(ctx) if ctx.max_draft > 0 else Draft.empty()
        draft = draft.truncate(max(ctx.max_draft, 0))
        _sync(device)
        t1 = time.perf_counter()

        ids = torch.cat([torch.tensor([tokens[-1]]), draft.tokens.cpu()])[None].to(inputs_on)
        pos, slots, mask = step_inputs(L, draft.parents, kv_len, inputs_on)
        logits, h = forward(ids, pos, cache, mask, slots, layers)
        acc = verify(draft, logits[0], params, generator)
        rows = [0] + [1 + i for i in acc.path]
        cache.keep(L, rows)
        hidden = {k: v[0, rows] for k, v in h.items()}

        new = acc.emitted[:left]
        for i, t in enumerate(new):     # stop after the first EOS, even inside the draft
            if t in eos:
                new, stop = new[:i + 1], "eos"
                break
        tokens.extend(new)
        t2 = time.perf_counter()
        steps.append(StepRecord(proposed=len(draft), accepted=min(len(acc.path), len(new)),
                                emitted=len(new), propose_s=t1 - t0, verify_s=t2 - t1, wall_s=t2 - t0))
        if stop == "eos":
            break
    wall = time.perf_counter() - t_start
    name = getattr(proposer, "name", type(proposer).__name__)
    record = request_record(name, prompt_id, len(prompt), steps, prefill_s, wall)
    return GenerationResult(tokens[len(prompt):], steps, record, stop)
