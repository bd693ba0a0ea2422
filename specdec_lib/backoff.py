"""Measured back-off: draft only while drafting is measured to be faster than not drafting.

Any proposer can be wrapped (`make_proposer(name, models, backoff="measured", ...)`). Each step the
wrapper chooses one of two modes:

    spec   call the method's proposer and send its draft (a speculative step)
    plain  send nothing (an ordinary decode step: one target forward of one token)

and it learns which mode is faster on this machine, for this method, on this text, from the only
evidence that needs no model of the machine: the wall time between two calls of `propose` and the
tokens the loop appended between them. That interval holds everything a step costs (the draft, the
verify forward, the loop's own overhead), so no cost curve is needed, and whatever the reader's
CPU does with a k-token forward (an AVX2-only CPU makes it cost ~k one-token forwards, where
speculation cannot pay) is measured, not assumed.

    seconds per token, per mode = (decayed sum of step times) / (decayed sum of tokens appended)

The faster mode runs; the other is tried again now and then (a probe), so a change in the text
(a stretch that quotes the prompt) is noticed. A probe costs: on a CPU where a k-token forward
costs ~k one-token forwards, one speculative step of a 16-node tree costs ~10 plain steps. So the
wait before the next probe is set from what the last probe cost, measured, as a share of a step
of the winning mode: wait >= cost / overhead, so that probing costs at most `overhead` (5%) of the
time; and it at least doubles after every probe that does not change the winner, up to max_wait
steps. The moment a probe changes the winner, the wait drops back to probe_every. The rates carry
over from one request to the next (they describe this machine and this method), and so does the
count of steps since the last probe; the doubling does not: a new request is new text, so its wait
starts from what the last probe's cost alone asks for (at least probe_every), which on a GPU, where
a probe costs little, means a probe within the first few steps of every request, and on a CPU,
where it costs many steps, keeps the long wait.

The first speculative step of a request is not timed: it also catches the proposer up on the
prompt (a draft model's prefill), a one-off cost counted in the request's wall time but not in
the rate of a step; a probe that lands on that first call goes on for one more step, which is
timed, and what the first step cost beyond its tokens (the catch-up included) is added to what
the probe cost, so the wait it sets pays for the catch-up too. Going back to `spec` after plain
steps, the proposer catches up on the tokens it skipped: the target's hidden states of those steps
are kept and handed to it concatenated, in order, as if it had been called every step. Lossless
by construction: the wrapper only ever sends the method's own draft or nothing, and the verifier
decides.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from .tree import Draft

MODES = ("spec", "plain")


class MeasuredBackOff:
    """proposer wrapped: drafts with it only while that is measured to pay (see the module docstring).

    warmup: timed steps of each mode before the rates are compared (spec first); probe_every,
    max_wait: the shortest and longest wait (in steps) before trying the losing mode again;
    overhead: the share of time probes may cost; decay: each timed step multiplies a mode's sums
    by this first (0.9: about the last 10 steps of that mode count). clock: seconds (a test
    passes its own).
    """

    def __init__(self, proposer, warmup: int = 1, probe_every: int = 8, max_wait: int = 256,
                 overhead: float = 0.05, decay: float = 0.9, clock=time.perf_counter):
        if warmup < 1 or probe_every < 1 or max_wait < probe_every:
            raise ValueError(f"need warmup >= 1 and 1 <= probe_every <= max_wait, got warmup={warmup}, "
                             f"probe_every={probe_every}, max_wait={max_wait}")
        if not 0 < decay <= 1 or not 0 < overhead < 1:
            raise ValueError(f"need decay in (0, 1] and overhead in (0, 1), got decay={decay}, "
                             f"overhead={overhead}")
        self.inner, self.warmup, self.probe_every, self.max_wait, self.decay = (
            proposer, warmup, probe_every, max_wait, decay)
        self.overhead, self.clock = overhead, clock
        self.name = f"{getattr(proposer, 'name', type(proposer).__name__)}+backoff"
        self.hidden_layers = tuple(getattr(proposer, "hidden_layers", ()))
        self.seconds = {m: 0.0 for m in MODES}        # decayed sums of step times per mode
        self.tokens = {m: 0.0 for m in MODES}         # ... and of the tokens those steps appended
        self.steps = {m: 0.0 for m in MODES}          # ... and of the steps
        self.timed = {m: 0 for m in MODES}            # timed steps per mode (for the warm-up)
        self.wait, self.since_probe = probe_every, 0  # steps between probes; steps since the last
        self.need = probe_every                       # the wait the last probe's cost alone asks for
        self.log: list[str] = []                      # the mode of every step of the last request
        self.reset([])

    def reset(self, prompt_ids) -> None:
        self.inner.reset(prompt_ids)
        # new text: drop the doubling, keep what a probe's cost asks for (and the steps since one)
        self.wait = min(self.wait, max(self.probe_every, self.need))
        self.pending = None            # (mode, time, len(tokens), probe_of, lost_before) of the step
        #                                in flight, if it is timed (lost_before: seconds its probe
        #                                already lost in an untimed first step)
        self.probe_again = None        # a probe whose first step was not timed goes on one more
        #                                step: (the mode it probes against, time, len(tokens)) of
        #                                that untimed step
        self.called = False            # has the inner proposer been called in this request?
        self.skipped: dict = {}        # layer -> [hidden states of the steps it did not see]
        self.log = []

    def observe(self, tokens) -> None:                # suffix decoding learns across requests
        if hasattr(self.inner, "observe"):
            self.inner.observe(tokens)

    def rate(self, mode: str) -> float:
        """Seconds per token appended, in this mode (inf before any evidence)."""
        return self.seconds[mode] / self.tokens[mode] if self.tokens[mode] else float("inf")

    def best(self) -> str:
        return min(MODES, key=self.rate)

    def _record(self, now: float, n_tokens: int) -> None:
        """Time the step that ran since the last call; after a probe, set the wait for the next."""
        if self.pending is None:
            return
        mode, t, n, probe_of, lost_before = self.pending
        for sums, x in ((self.seconds, now - t), (self.tokens, n_tokens - n), (self.steps, 1)):
            sums[mode] = self.decay * sums[mode] + x
        self.timed[mode] += 1
        if probe_of is None:
            return
        if self.best() != probe_of:                   # a new winner: probe again soon
            self.wait = self.need = self.probe_every
            return
        # what the probe cost beyond what its tokens were worth at the winner's rate, in steps of
        # the winner: wait long enough that probing costs at most `overhead` of the time
        # (plus what an untimed first step of the same probe lost: the proposer's catch-up)
        lost = lost_before + max(0.0, (now - t) - (n_tokens - n) * self.rate(probe_of))
        step = self.seconds[probe_of] / self.steps[probe_of]
        self.need = min(self.max_wait, math.ceil(lost / step / self.overhead))
        self.wait = min(self.max_wait, max(2 * self.wait, self.need))

    def choose(self) -> tuple[str, str | None]:
        """This step's mode, and the mode it probes against (None unless it is a probe):
        the warm-up (spec, then plain), then the faster mode, the other one every `wait` steps."""
        if self.probe_again is not None:              # the probe's first step was not timed
            best, self.probe_again = self.probe_again[0], None
            return "spec", best
        for mode in MODES:
            if self.timed[mode] < self.warmup:
                return mode, None
        best = self.best()
        self.since_probe += 1
        if self.since_probe < self.wait:
            return best, None
        self.since_probe = 0
        return MODES[1 - MODES.index(best)], best

    def propose(self, ctx) -> Draft:
        now = self.clock()
        self._record(now, len(ctx.tokens))
        lost_before = 0.0
        if self.probe_again is not None:               # the second step of a probe: what the first lost
            best, t0, n0 = self.probe_again
            lost_before = max(0.0, (now - t0) - (len(ctx.tokens) - n0) * self.rate(best))
        mode, probe_of = self.choose()
        self.log.append(mode)
        if mode == "plain":
            for k, v in ctx.hidden.items():           # kept (copied: a graph's buffers are reused)
                self.skipped.setdefault(k, []).append(v.clone())
            self.pending = (mode, now, len(ctx.tokens), probe_of, 0.0)
            return Draft.empty()
        if self.skipped:                              # what it missed, then this step's rows
            hidden = {k: torch.cat(self.skipped[k] + [ctx.hidden[k]]) for k in ctx.hidden}
            ctx = dataclasses.replace(ctx, hidden=hidden)
            self.skipped = {}
        first = not self.called
        self.called = True
        draft = self.inner.propose(ctx)
        # the first call of a request also catches up on the prompt: paid, but not a step's rate.
        # A probe that landed on it goes on for a step that can be timed.
        if first:
            self.pending = None
            self.probe_again = None if probe_of is None else (probe_of, now, len(ctx.tokens))
        else:
            self.pending = (mode, now, len(ctx.tokens), probe_of, lost_before)
        return draft


def wrap(proposer, backoff: str | None):
    """make_proposer's `backoff` option: None (as built) or "measured" (MeasuredBackOff)."""
    if backoff is None:
        return proposer
    if backoff != "measured":
        raise ValueError(f"unknown backoff {backoff!r}: choose 'measured' (or leave it out)")
    return MeasuredBackOff(proposer)
