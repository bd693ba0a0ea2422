"""Exact greedy replay: what the decode loop would do, given the target's greedy continuation.

Under greedy verification a draft node is accepted iff the path to it spells the target's next
greedy tokens. So for a proposer that needs no model of its own (n-gram lookup, suffix decoding),
the whole run follows from the target's greedy output alone: no target forward is needed. This is
how the course computes the acceptance the real Qwen2.5-7B would give, from its stored outputs.

The replay mirrors `decoding.generate` step for step: the same Context, the same max_draft, the
bonus token, stopping after EOS (also inside a draft) or at the length limit.
"""
from __future__ import annotations

from .decoding import Context
from .sampling import SamplingParams
from .tree import Draft
from .verify import follow_greedy


def replay_greedy(proposer, prompt_ids, reference_ids, eos_ids=(), max_new_tokens: int | None = None
                  ) -> list[tuple[int, int, int]]:
    """One (proposed, accepted, emitted) per step; the target would be fed proposed + 1 tokens.

    Example: a proposer that always drafts [7, 8] against reference [7, 9, ...] accepts 7, emits
    7 and the bonus 9: the step is (2, 1, 2).
    """
    prompt, ref = [int(t) for t in prompt_ids], [int(t) for t in reference_ids]
    n = len(ref) if max_new_tokens is None else min(max_new_tokens, len(ref))
    eos = set(int(e) for e in eos_ids)
    proposer.reset(prompt)
    tokens, steps = list(prompt), []
    while len(tokens) - len(prompt) < n:
        done = len(tokens) - len(prompt)
        left = n - done
        ctx = Context(tokens, len(prompt), max_draft=left - 1, params=SamplingParams(0.0), generator=None)
        draft = (proposer.propose(ctx) if left > 1 else Draft.empty()).truncate(max(left - 1, 0))
        # the target's greedy token after each verify row is the reference token at its depth
        # (the draft has at most left - 1 nodes, so done + depth < n: the index exists)
        depth = []                                         # of each node (a parent comes first)
        for parent in draft.parents.tolist():
            depth.append(1 if parent < 0 else depth[parent] + 1)
        best = [ref[done]] + [ref[done + d] for d in depth]
        accepted = len(follow_greedy(draft, best).path)     # the verifier's own greedy walk
        new = ref[done:done + min(accepted + 1, left)]
        stop = next((i for i, t in enumerate(new) if t in eos), None)
        if stop is not None:
            new = new[:stop + 1]
        tokens.extend(new)
        steps.append((len(draft), min(accepted, len(new)), len(new)))
        if stop is not None:
            break
    return steps
