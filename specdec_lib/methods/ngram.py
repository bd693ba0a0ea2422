"""N-gram prompt lookup: propose what followed the last time the context's tail appeared.

No draft model at all. Look up the last n tokens of prompt + accepted output (n from max_n
down to min_n) among their earlier occurrences, and propose the up-to-g tokens that followed
(Saxena, 2023, "prompt lookup decoding"; Yang et al., 2023, "Inference with Reference").
When the output quotes, edits or summarises text in the prompt, those copies are accepted.

    tokens  ... the cat sat on the mat . the cat |        (| = now, n = 2: tail "the cat")
    earlier      the cat -> "sat on the mat"              draft = [sat, on, the, mat]

Two ways to find the earlier occurrence:
- `scan_*`: walk back over the whole context every step: O(L * n) per proposal.
- `NgramIndex`: a dict per n, n-gram -> where it last occurred and what followed it how often,
  updated only with the tokens appended since the last step. A proposal is then a few dict
  look-ups and a copy: O(n + g), whatever the context length.

Policies: `recent` copies the continuation of the most recent occurrence; `frequent` walks
token by token, each time taking the token that most often followed the current tail (ties:
the more recent). `adaptive` g grows by one after a fully accepted draft and shrinks by one
after a rejection. No match means an empty draft: the step is one ordinary decode step.

Back-off (cost_curve=...): a draft pays only if its expected tokens beat what its verify step
costs on this machine, E[tokens](g) / c(g + 1) > 1 / c(1). Each step the lookup finds its
candidate (up to draft_len tokens) and the match length n; a running tally per n estimates the
per-position acceptance a; the proposer sends the g in 0..len(candidate) that maximises
E / c(g + 1) (costmodel.choose_draft_len), possibly 0: an ordinary decode step. Evidence comes
from the only channel the loop has, the tokens it appended since the last call: the whole
candidate, also the tokens not sent, is checked against them, so a step that sent nothing still
teaches whether its first token would have been accepted (the lookup costs microseconds).
"""
from __future__ import annotations

from ..costmodel import AcceptanceTally, choose_draft_len, cost_list
from ..models import EOS_IDS
from ..tree import Draft

POLICIES = ("recent", "frequent")


def _copy(tokens: list[int], start: int, g: int, eos: frozenset) -> list[int]:
    """The g tokens from tokens[start], continuing into the draft itself when they run out.

    subtle: a match near the end overlaps its own continuation (a loop). [1, 2, 1, 2], tail (1, 2)
    last seen at 0..1, continuation from index 2: [1, 2] and then, past the end, the draft's own
    tokens again: g = 4 -> [1, 2, 1, 2]. Stops after an EOS: nothing after it can be emitted.
    """
    draft, L = [], len(tokens)
    for i in range(g):
        p = start + i
        t = tokens[p] if p < L else draft[p - L]
        draft.append(t)
        if t in eos:
            break
    return draft


def _best(counts: dict) -> int:
    """{next token: [count, last position]} -> the most frequent next token, the most recent on ties."""
    return max(counts.items(), key=lambda kv: (kv[1][0], kv[1][1]))[0]


# ------------------------------------------------------------------ the naive scan (reference)
def scan_recent(tokens: list[int], g: int, max_n: int, min_n: int = 1, eos=EOS_IDS) -> list[int]:
    """Rescan the context for the latest earlier occurrence of its tail. O(L * n) per call.

    [5, 6, 7, 8, 5, 6], g=3, max_n=2 -> tail (5, 6) seen at 0..1 -> [7, 8, 5].
    """
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        key = tokens[L - n:]
        for j in range(L - 1, n - 1, -1):          # j = position of the token after the occurrence
            if tokens[j - 1] == key[-1] and tokens[j - n:j] == key:
                return _copy(tokens, j, g, frozenset(eos))
    return []


def _scan_counts(tokens: list[int], key: list[int], L: int) -> dict:
    """{next token: [count, last position]} over occurrences of key whose next token is in tokens[:L]."""
    n, counts = len(key), {}
    for j in range(n, L):
        if tokens[j - n:j] == key:
            c = counts.setdefault(tokens[j], [0, 0])
            c[0], c[1] = c[0] + 1, j
    return counts


def scan_frequent(tokens: list[int], g: int, max_n: int, min_n: int = 1, eos=EOS_IDS) -> list[int]:
    """Token by token: the most frequent successor of the longest tail seen before. O(g * L * n).

    [1, 2, 9, 1, 2, 9, 1, 2, 7, 1, 2], g=1, max_n=2 -> (1, 2) was followed by 9 twice, 7 once -> [9].
    """
    L, seq, eos = len(tokens), list(tokens), frozenset(eos)
    draft = []
    while len(draft) < g:
        counts = {}
        for n in range(min(max_n, L - 1), min_n - 1, -1):
            counts = _scan_counts(seq, seq[len(seq) - n:], L)
            if counts:
                break
        if not counts:
            break
        t = _best(counts)
        draft.append(t)
        seq.append(t)
        if t in eos:
            break
    return draft


# ------------------------------------------------------------------ the incremental index
class NgramIndex:
    """For each n in [min_n, max_n]: n-gram -> position of the token after its latest occurrence,
    and n-gram -> {next token: [count, last position]}.

    An n-gram is indexed once the token after it is known, so the context's own tail is never
    its own match. Example, tokens [1, 2, 1], n = 1..2:
        recent[1] = {(1,): 1, (2,): 2}      recent[2] = {(1, 2): 2}
    """

    def __init__(self, max_n: int, min_n: int = 1, eos=EOS_IDS):
        self.max_n, self.min_n, self.eos = max_n, min_n, frozenset(eos)
        self.tokens: list[int] = []
        self.recent = {n: {} for n in range(min_n, max_n + 1)}
        self.counts = {n: {} for n in range(min_n, max_n + 1)}

    def extend(self, new_tokens) -> None:
        """Append tokens; index every n-gram whose next token just became known. O(n) per token."""
        toks = self.tokens
        for t in new_tokens:
            j = len(toks)                 # t lands at position j: n-grams ending at j - 1 get a successor
            toks.append(t)
            for n in range(self.min_n, min(self.max_n, j) + 1):
                key = tuple(toks[j - n:j])
                self.recent[n][key] = j
                c = self.counts[n].setdefault(key, {}).setdefault(t, [0, 0])
                c[0], c[1] = c[0] + 1, j

    def _tail(self, seq: list[int], table: dict):
        """(n, entry) for the longest tail of seq found in table[n], or (0, None)."""
        for n in range(min(self.max_n, len(seq)), self.min_n - 1, -1):
            hit = table[n].get(tuple(seq[len(seq) - n:]))
            if hit is not None:
                return n, hit
        return 0, None

    def match_len(self) -> int:
        """n of the longest tail of the tokens seen before with a successor (0: no match)."""
        return self._tail(self.tokens, self.recent)[0]

    def propose(self, g: int, policy: str = "recent") -> list[int]:
        if policy == "recent":
            _, j = self._tail(self.tokens, self.recent)
            return [] if j is None else _copy(self.tokens, j, g, self.eos)
        draft = []
        while len(draft) < g:              # `frequent`: one look-up per drafted token
            _, counts = self._tail((self.tokens[-self.max_n:] + draft)[-self.max_n:], self.counts)
            if counts is None:
                break
            t = _best(counts)
            draft.append(t)
            if t in self.eos:
                break
        return draft


def prior_acceptance(n: int) -> float:
    """What to expect of a match of length n before any evidence: the per-position acceptance
    measured by exact replay of the real Qwen2.5-7B's greedy outputs (data/qwen25_7b_greedy,
    eval60: 60 ultrachat prompts, 128 tokens, draft_len 8, max_n 3): 0.27 for n = 1, 0.42 for
    n = 2, 0.82 for n = 3. Another model and other prompts than the Spec-Bench runs it is used on;
    rounded, since only its order of magnitude matters (evidence outweighs it within a few steps).
    A 1-token match is weak evidence: most words recur with another continuation."""
    return 0.25 if n <= 1 else 0.4 if n == 2 else 0.8


def check_candidate(candidate: list[int], appended: list[int]) -> tuple[int, int]:
    """(accepted, tried): how far the target's tokens since the proposal follow the candidate.

    appended = the accepted draft tokens + the bonus token (or only the target's token after an
    empty draft). Position i was *tried* if positions before it matched; the first mismatch ends
    the walk. [7, 8, 9] vs [7, 5] -> (1, 2); [7, 8, 9] vs [7, 8, 9, 4] -> (3, 3); vs [7] -> (1, 1).
    Under sampling, a token the target samples equals a one-token draft x with probability p(x),
    its acceptance probability, so the evidence is unbiased there too.
    """
    accepted = 0
    for want, got in zip(candidate, appended):
        if want != got:
            return accepted, accepted + 1
        accepted += 1
    return accepted, accepted


class NgramProposer:
    """Prompt lookup with an incremental index (or the naive scan, lookup="scan", for comparison).

    cost_curve: None (send every candidate token, the default) or the target's c(k) (a stored
    curve's name, a curve dict, or a list of c(k) for k = 1..draft_len + 1): back off, as above.
    """
    hidden_layers = ()

    def __init__(self, draft_len: int = 4, max_n: int = 3, min_n: int = 1, policy: str = "recent",
                 adaptive: bool = False, max_draft_len: int | None = None, lookup: str = "index",
                 eos_ids=EOS_IDS, cost_curve=None):
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        if min_n < 1 or max_n < min_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
        if lookup not in ("index", "scan"):
            raise ValueError(f"lookup must be 'index' or 'scan', got {lookup!r}")
        max_draft_len = max_draft_len or (2 * draft_len if adaptive else draft_len)
        if max_draft_len < draft_len:
            raise ValueError(f"max_draft_len ({max_draft_len}) must be >= draft_len ({draft_len})")
        self.draft_len, self.max_n, self.min_n, self.policy = draft_len, max_n, min_n, policy
        self.adaptive, self.max_draft_len, self.lookup = adaptive, max_draft_len, lookup
        if cost_curve is not None and (adaptive or lookup != "index"):
            raise ValueError("cost_curve picks the draft length from evidence: use it with adaptive=False and "
                             "lookup='index' (the match length it learns from comes from the index)")
        self.eos = tuple(eos_ids)
        # [c(1), ..., c(draft_len + 1)] or None; a name is kept for the label
        self.costs = None if cost_curve is None else cost_list(cost_curve, draft_len + 1)
        backoff = "" if cost_curve is None else \
            f", backoff={cost_curve if isinstance(cost_curve, str) else 'curve'}"
        self.name = (f"ngram(n={min_n}..{max_n}, g={draft_len}{'+' if adaptive else ''}"
                     f"{', frequent' if policy == 'frequent' else ''}{', scan' if lookup == 'scan' else ''}"
                     f"{backoff})")
        self.reset([])

    def reset(self, prompt_ids) -> None:
        self.index = NgramIndex(self.max_n, self.min_n, self.eos)
        self.g = self.draft_len              # the current draft length (changes only when adaptive)
        self.last_draft: list[int] = []
        self.last_len = 0                    # context length when last_draft was proposed
        # back-off state, per request: acceptance per match length n, and the last candidate
        self.tally = AcceptanceTally()
        self.candidate: list[int] = []       # the whole lookup result of the last step (sent or not)
        self.candidate_n = 0                 # its match length
        self.last: dict = {}                 # what the last back-off choice was (for the chapter)

    def _adapt(self, tokens: list[int]) -> None:
        """Grow g after a fully accepted draft, shrink it after a rejection (no draft: no change)."""
        if not self.last_draft:
            return
        accepted, _ = check_candidate(self.last_draft, tokens[self.last_len:])
        if accepted == len(self.last_draft):
            self.g = min(self.g + 1, self.max_draft_len)
        else:
            self.g = max(1, self.g - 1)

    def _back_off(self, tokens: list[int], candidate: list[int]) -> list[int]:
        """Learn from the last candidate, then send the part of this one that pays (maybe none)."""
        if self.candidate:
            self.tally.add(self.candidate_n, *check_candidate(self.candidate, tokens[self.last_len:]))
        n = self.index.match_len() if candidate else 0
        a = self.tally.estimate(n, prior_acceptance(n))
        g = choose_draft_len(a, len(candidate), self.costs)
        self.candidate, self.candidate_n = candidate, n
        self.last = dict(match_len=n, a=a, candidate=len(candidate), draft_len=g)
        return candidate[:g]

    def propose(self, ctx) -> Draft:
        tokens = ctx.tokens
        if self.adaptive:
            self._adapt(tokens)
        g = min(self.g, ctx.max_draft)
        if self.lookup == "index":
            self.index.extend(tokens[len(self.index.tokens):])
            draft = self.index.propose(g, self.policy) if g > 0 else []
        else:
            scan = scan_recent if self.policy == "recent" else scan_frequent
            draft = scan(tokens, g, self.max_n, self.min_n, self.eos) if g > 0 else []
        if self.costs is not None:
            draft = self._back_off(tokens, draft)
        self.last_draft, self.last_len = draft, len(tokens)
        return Draft.chain(draft)


def build(models=None, draft_len: int = 4, max_n: int = 3, min_n: int = 1, policy: str = "recent",
          adaptive: bool = False, max_draft_len: int | None = None, lookup: str = "index", eos_ids=EOS_IDS,
          cost_curve=None):
    return NgramProposer(draft_len, max_n, min_n, policy, adaptive, max_draft_len, lookup, eos_ids, cost_curve)
