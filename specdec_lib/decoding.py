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

import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .metrics import RequestRecord, StepRecord, request_record
from .sampling import SamplingParams
from .tree import Draft, chain_inputs, depths, step_inputs
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
    kv_len: int | None = None          # the verify mask's width (None: L + T), for a proposer that
                                       # builds the verify inputs itself (Draft.inputs)


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


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _token_list(prompt_ids, what: str = "prompt_ids") -> list[int]:
    """A list of ints, a 1-D tensor or a [1, T] tensor (what a tokenizer returns) -> list of ints."""
    if torch.is_tensor(prompt_ids):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1:
            raise ValueError(f"{what} has shape {list(prompt_ids.shape)}: generate takes one prompt, "
                             f"a list of ids, a [T] or a [1, T] tensor (loop over a batch)")
        if prompt_ids.is_floating_point() or prompt_ids.is_complex():
            raise ValueError(f"{what} has dtype {prompt_ids.dtype}: token ids are integers (use .long())")
        return prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__iter__"):
        raise ValueError(f"{what} must be a list of token ids, got {type(prompt_ids).__name__}"
                         + (": encode text with the tokenizer first" if what == "prompt_ids" else ""))
    out = []
    for t in prompt_ids:
        if not _is_int(t) and not (torch.is_tensor(t) and t.dim() == 0 and not t.is_floating_point()):
            raise ValueError(f"{what} must be token ids (ints), got {t!r} of type {type(t).__name__}")
        out.append(int(t))
    return out


def check_prompt(prompt_ids, max_new_tokens: int, max_len: int) -> list[int]:
    """The prompt as a list of ints, and that it and max_new_tokens fit max_len cache slots."""
    prompt = _token_list(prompt_ids)
    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if len(prompt) + max_new_tokens > max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} does not fit "
                         f"the KV cache of {max_len} slots: shorten the prompt or raise max_len")
    return prompt


def check_inputs(target, prompt_ids, max_new_tokens, temperature, top_p, seed, eos_ids, max_len, kv_len,
                 cache) -> tuple[list[int], SamplingParams, set[int], int]:
    """Every argument of generate() checked in one place: (prompt, params, eos ids, max_len).

    Each failure is a ValueError that says what to change; nothing is silently reinterpreted.
    """
    params = SamplingParams(temperature, top_p)             # finite temperature >= 0, top_p in (0, 1]
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if cache is not None:
        if max_len is not None and max_len != cache.max_len:
            raise ValueError(f"max_len={max_len} but the cache given has {cache.max_len} slots: pass one of "
                             f"the two (the cache's size is used)")
        max_len = cache.max_len
    elif max_len is not None and (not _is_int(max_len) or max_len < 1):
        raise ValueError(f"max_len must be an int >= 1 (cache slots), got {max_len!r}")
    prompt = _token_list(prompt_ids)
    if max_len is None and _is_int(max_new_tokens):
        max_len = len(prompt) + max_new_tokens + 64
    prompt = check_prompt(prompt, max_new_tokens, max_len or 0)
    vocab = getattr(getattr(target, "config", None), "vocab_size", None)
    bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the target's vocabulary [0, {vocab}): "
                         f"encode the prompt with the model's own tokenizer")
    if _is_int(eos_ids) or (torch.is_tensor(eos_ids) and eos_ids.dim() == 0):   # one EOS id: fine
        eos_ids = (eos_ids,)
    eos = set(_token_list(eos_ids, "eos_ids"))
    if kv_len is not None:
        need = len(prompt) + max_new_tokens - 1          # the widest step: every token but the last in the cache
        if not _is_int(kv_len) or not need <= kv_len <= max_len:
            raise ValueError(f"kv_len={kv_len!r}: a static mask width must be an int in [{need}, {max_len}] "
                             f"(prompt + max_new_tokens - 1 up to the cache size); leave it None for L + T")
    return prompt, params, eos, max_len


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

    prompt_ids: a list of ids, a [T] or a [1, T] tensor; eos_ids: an int or a list of ints.
    max_len: KV cache slots (default prompt + max_new_tokens + 64). forward: optional replacement
    for target.forward with the same signature (e.g. a CUDA-graph runner); it receives its step
    inputs on the CPU and moves them itself, or on the GPU when the proposer left its draft there
    (the draft model's greedy chain: nothing is read back before the verify forward). kv_len: attend
    over this many cache slots every step (static shapes) instead of L + T; L + T is the default on
    a CPU, the whole cache on a GPU. cache: reuse this KVCache (a CUDA-graph runner owns one) instead
    of allocating one (then max_len is its size). Bad arguments: check_inputs' ValueErrors.
    """
    prompt, params, eos, max_len = check_inputs(target, prompt_ids, max_new_tokens, temperature, top_p, seed,
                                                eos_ids, max_len, kv_len, cache)
    device = target.device
    if kv_len is None and forward is None and torch.device(device).type == "cuda":
        # subtle: on a GPU the eager path attends over the whole cache too. A width of L + T is a new
        # attention shape every step, and SDPA's cuDNN backend (Hopper) builds a graph per new shape.
        kv_len = max_len                          # (the cache's size when a cache is given)
    inputs_on = device if forward is None else "cpu"
    forward = forward or target.forward
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
    # On a GPU a step's split into proposing and verifying is timed with CUDA events, not by waiting
    # for the GPU after the proposal: a draft left on the device is verified without that wait.
    events = [] if torch.device(device).type == "cuda" else None
    while len(tokens) - len(prompt) < max_new_tokens:
        t0 = time.perf_counter()
        if events is not None:
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        L = cache.length                     # == len(tokens) - 1
        left = max_new_tokens - (len(tokens) - len(prompt))
        ctx = Context(tokens, len(prompt), max_draft=min(left - 1, max_len - L - 1), params=params,
                      generator=generator, hidden=hidden, kv_len=kv_len)
        draft = proposer.propose(ctx) if ctx.max_draft > 0 else Draft.empty()
        draft = draft.truncate(max(ctx.max_draft, 0))
        if events is not None:
            events[-1][1].record()           # stamped when the GPU has finished the proposal's work
        t1 = time.perf_counter()

        # the verify inputs are built where the forward takes them, or on the GPU when the proposer
        # left its draft there (no copy, no wait; the verifier then reads the verdict, the tokens
        # and the parents back in one copy). A chain's causal mask takes a few launches.
        # A proposer may hand them over ready-made (Draft.inputs: PARD's tree recorded as one graph).
        on = draft.tokens.device if draft.tokens.device.type != "cpu" else torch.device(inputs_on)
        if draft.inputs is not None:
            pos, slots, mask, ids = draft.inputs
        else:
            ids = torch.cat([torch.full((1,), tokens[-1], dtype=torch.long, device=on), draft.tokens.to(on)])[None]
            if draft.known_chain:
                pos, slots, mask = chain_inputs(L, len(draft) + 1, kv_len, on)
            else:
                pos, slots, mask = step_inputs(L, draft.parents, kv_len, on)
        logits, h = forward(ids, pos, cache, mask, slots, layers)
        acc = verify(draft, logits[0], params, generator)
        # a tree's depth (not its node count) is how many positions could be accepted in a row
        # (read here, while the GPU has nothing queued: the verdict was just read back)
        depth = None if draft.is_chain() else int(depths(draft.parents).max())
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
                                emitted=len(new), propose_s=t1 - t0, verify_s=t2 - t1, wall_s=t2 - t0,
                                draft_depth=depth))
        if stop == "eos":
            break
    wall = time.perf_counter() - t_start
    if events is not None:           # every event has completed: the last verdict was read back
        for step, (a, b) in zip(steps, events):
            step.propose_s = min(a.elapsed_time(b) / 1e3, step.wall_s)
            step.verify_s = step.wall_s - step.propose_s
    name = getattr(proposer, "name", type(proposer).__name__)
    record = request_record(name, prompt_id, len(prompt), steps, prefill_s, wall)
    return GenerationResult(tokens[len(prompt):], steps, record, stop)
