"""Helpers shared by several test files (import as `from tests.helpers import ...`).

- Toy models: `toy_config`, `exact_distribution` (P of the first K tokens, by enumeration).
- Exact enumeration of a random procedure: `enumerate_outcomes` runs a function once per branch
  of its random draws and returns every outcome with its exact probability. The verifier draws
  through `sample` and `verify.accept_draft_token`, proposers through `sample`: replacing those
  two (see `RANDOM_DRAWS`) turns one verify step, or one propose + verify step, into an exact
  distribution that can be compared with the target's to 1e-6 instead of by a chi-square test.
- `tv`: total variation distance between two {outcome: probability} dicts; `tree_call`: the
  arguments of one verify forward over a draft tree.
- `load_tool`: a script of tools/ as a module (tools/ is not a package).
"""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import torch

from specdec_lib.qwen2 import Qwen2Config
from specdec_lib.sampling import probs_from_logits
from specdec_lib.tree import chain_inputs, step_inputs


def load_tool(name: str):
    """tools/<name>.py imported as a module: load_tool("pard_tree_replay").drafter_rows(...)."""
    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- toy models
def toy_config(vocab: int) -> Qwen2Config:
    """A two-layer Qwen2 of width 16: every forward takes well under a millisecond."""
    return Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)


@torch.no_grad()
def exact_distribution(target, params, prompt: list[int], k: int, vocab: int | None = None) -> dict:
    """P(first k tokens) under the target alone, from its forwards (no sampling): {tuple: prob}.
    vocab: only the first `vocab` ids exist for sampling (e.g. PARD's mask tokens lie above them)."""
    V = vocab or target.config.vocab_size
    probs = {}
    for seq in itertools.product(range(V), repeat=k):
        ids = prompt + list(seq[:-1])
        cache = target.new_cache(len(ids))
        pos, slots, mask = chain_inputs(0, len(ids))
        logits, _ = target(torch.tensor([ids]), pos, cache, mask, slots)
        p = probs_from_logits(logits[0, len(prompt) - 1:, :V], params)   # rows after prompt, prompt+seq[0], ...
        probs[seq] = float(torch.prod(torch.stack([p[i, seq[i]] for i in range(k)])))
    return probs


def tree_call(cache, root: int, tokens: list[int], parents: list[int]):
    """The arguments of one verify forward: root + a draft tree after the cache's contents."""
    pos, slots, mask = step_inputs(cache.length, torch.tensor(parents))
    return torch.tensor([[root] + tokens]), pos, cache, mask, slots


def tv(a: dict, b: dict) -> float:
    """Total variation distance: half the L1 distance between two distributions over outcomes."""
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def to_transformers(model):
    """The same weights, copied, in transformers' Qwen2ForCausalLM with eager attention: the reference
    we must agree with."""
    from specdec_lib.experiments import to_transformers as convert
    return convert(model, copy=True, attn_implementation="eager")


# ---------------------------------------------------------------- exact enumeration of random draws
class _Branch(Exception):
    def __init__(self, n: int):
        self.n = n


class _Script:
    """Answers the random draws of one run from a list of choices; raises _Branch past its end."""

    def __init__(self, choices: tuple):
        self.choices, self.pos, self.prob = choices, 0, 1.0

    def _pick(self, options: list[tuple[object, float]]):
        options = [(v, p) for v, p in options if p > 0]
        if self.pos == len(self.choices):
            raise _Branch(len(options))
        value, p = options[self.choices[self.pos]]
        self.pos += 1
        self.prob *= p
        return value

    def sample(self, probs: torch.Tensor, generator=None) -> torch.Tensor:
        """Like sampling.sample for one row: torch.multinomial's weights need not sum to 1."""
        if probs.dim() != 1:
            raise NotImplementedError("the exact enumeration draws one row at a time")
        w = probs.double().cpu()
        w = w / w.sum()
        return torch.tensor(self._pick([(i, float(w[i])) for i in range(len(w))]))

    def accept(self, p_x: float, q_x: float, generator=None, device=None) -> bool:
        a = min(1.0, p_x / q_x) if q_x > 0 else 0.0
        return self._pick([(True, a), (False, 1.0 - a)])


# (module, name) of every random draw made by the verifier and the proposers tested exactly
RANDOM_DRAWS = [("specdec_lib.verify", "sample", "sample"),
                ("specdec_lib.verify", "accept_draft_token", "accept"),
                ("specdec_lib.methods.draft_model", "sample", "sample")]


def enumerate_outcomes(fn, draws=RANDOM_DRAWS, max_runs: int = 200_000) -> dict:
    """{fn(): exact probability}, running fn once per branch of its random draws (depth first).

    fn must be deterministic given the draws (build any stateful proposer inside fn). Each
    (module, name, kind) in draws is replaced, for the duration, by the enumerating sample
    ("sample") or acceptance test ("accept").
    """
    import importlib
    modules = [(importlib.import_module(m), name, kind) for m, name, kind in draws]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in modules]
    out, stack, runs = {}, [()], 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny tensors: a second thread only waits (badly, on a busy machine)
    try:
        while stack:
            runs += 1
            if runs > max_runs:
                raise RuntimeError("too many branches: use a smaller vocabulary or draft")
            script = _Script(stack.pop())
            for mod, name, kind in modules:
                setattr(mod, name, getattr(script, kind))
            try:
                result = fn()
            except _Branch as b:
                stack += [script.choices + (i,) for i in range(b.n)]
                continue
            out[result] = out.get(result, 0.0) + script.prob
    finally:
        torch.set_num_threads(threads)
        for mod, name, orig in saved:
            setattr(mod, name, orig)
    return out
