"""The one verifier: which draft nodes does the target accept, and what token comes next?

Input: a Draft (chain or tree) and the target's logits for the verify rows, [N + 1, V]
(row 0 = after the root, row i + 1 = after node i). Output: the accepted path (node indices,
root to deepest accepted node) and the bonus token drawn at the end of it.

Greedy: follow the child whose token is the target's argmax; stop when none matches; the
bonus is that argmax. The output is then exactly the target's greedy output.

Sampling (Leviathan et al. 2023; Chen et al. 2023; for trees SpecInfer, Miao et al. 2023):
at the current node with target distribution p, try its children in order. Child c, with
token x drawn from q_c, is accepted with probability min(1, p(x) / q_c(x)). On rejection
p <- normalise(max(0, p - q_c)) and the next sibling is tried against that residual. If
every child is rejected the bonus is drawn from the final residual. q_c is the distribution
node c was actually drawn from: for siblings drawn without replacement (top-k trees) the
proposer gives each sibling q with the earlier siblings removed and renormalised (Recursive
Speculative Decoding, Jeon et al. 2024); a draft marked `without_replacement` may instead give
every sibling the parent's q, and the verifier removes the earlier siblings itself. A proposer that picks tokens deterministically
(n-gram, suffix, greedy drafts) gives q = None, which means one-hot at its token: then a
rejected token is simply removed from p. tests/test_verify.py checks the output distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingParams, probs_from_logits, sample
from .tree import Draft, children


@dataclass
class Accepted:
    path: list[int]     # accepted node indices, root to leaf (empty: nothing accepted)
    tokens: list[int]   # their tokens
    bonus: int          # the token the target emits after them

    @property
    def emitted(self) -> list[int]:
        return self.tokens + [self.bonus]


def follow_greedy(draft: Draft, best: list[int]) -> Accepted:
    """best[row] = the target's greedy token after verify row `row` (0 = the root).

    From the root, follow the child whose token is the target's greedy token; stop when none
    matches; the bonus is the greedy token there. Also used by replay.py, where `best` comes from
    a stored greedy output instead of logits. Example: chain [7, 8], best [7, 9, 3] -> path [0], bonus 9.
    """
    tokens = draft.tokens.tolist()
    kids = children(draft.parents)
    path, row = [], 0          # row 0 = the root
    node = -1
    while True:
        match = next((c for c in kids.get(node, []) if tokens[c] == best[row]), None)
        if match is None:
            return Accepted(path, [tokens[i] for i in path], best[row])
        path.append(match)
        node, row = match, match + 1


def verify_greedy(draft: Draft, logits: torch.Tensor) -> Accepted:
    """logits [N + 1, V]. One device -> host copy: the argmax of every row, and with it the draft's
    tokens and parents when the proposer left them on the device (a draft built on the GPU)."""
    best = logits.argmax(-1)
    if draft.tokens.device.type == "cpu":
        return follow_greedy(draft, best.tolist())
    n = len(draft)
    host = torch.cat([best, draft.tokens.to(best.device), draft.parents.to(best.device)]).tolist()
    on_host = Draft(torch.tensor(host[n + 1:2 * n + 1], dtype=torch.long),
                    torch.tensor(host[2 * n + 1:], dtype=torch.long))
    return follow_greedy(on_host, host[:n + 1])


def accept_draft_token(p_x: float, q_x: float, generator: torch.Generator | None, device) -> bool:
    """True with probability min(1, p(x) / q(x)): draw u ~ U[0, 1), accept if u < p(x) / q(x).

    One of the verifier's two random draws (the other is `sample`); the exact tests replace both
    to enumerate every outcome of a verify step with its probability (tests/helpers.py).
    """
    u = torch.rand((), generator=generator, device=generator.device if generator is not None else device)
    return q_x > 0 and float(u) * q_x < p_x


def verify_sampling(draft: Draft, logits: torch.Tensor, params: SamplingParams,
                    generator: torch.Generator | None) -> Accepted:
    """Recursive rejection sampling over a chain or a tree; see the module docstring."""
    p_rows = probs_from_logits(logits, params)  # [N + 1, V]
    tokens = draft.tokens.tolist()
    kids = children(draft.parents)
    path, node, p = [], -1, p_rows[0]
    while True:
        rejected = []                      # tokens of this node's children tried so far
        for c in kids.get(node, []):
            x = tokens[c]
            if draft.q is None:
                q = torch.zeros_like(p)
                q[x] = 1.0
            else:
                q = draft.q[c].to(p)
                if draft.without_replacement and rejected:
                    # sibling drawn without replacement: its q cannot put mass on the earlier
                    # siblings' tokens (a no-op when the proposer already removed them)
                    q = q.clone()
                    q[rejected] = 0.0
                    q = q / q.sum()
            rejected.append(x)
            if accept_draft_token(float(p[x]), float(q[x]), generator, p.device):
                path.append(c)
                node, p = c, p_rows[c + 1]
                break
            residual = (p - q).clamp_min(0)
            total = residual.sum()
            # subtle: a zero residual means p == q, where acceptance was certain; keep p to be safe.
            p = residual / total if float(total) > 0 else p
        else:  # every child rejected (or a leaf): draw the bonus from what is left
            bonus = int(sample(p, generator))
            return Accepted(path, [tokens[i] for i in path], bonus)


def verify(draft: Draft, logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> Accepted:
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(f"need {len(draft) + 1} logit rows for a {len(draft)}-node draft, got {logits.shape[0]}")
    if params.greedy:
        return verify_greedy(draft, logits)
    return verify_sampling(draft, logits, params, generator)
