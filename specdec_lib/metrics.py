"""Records: one per decode step, one per request, one summary per (method, setting) run.

Definitions used everywhere in the course:
- acceptance_rate = accepted draft tokens / proposed draft tokens (for a tree: / tree nodes).
  What papers report, but NOT the a of the speedup formula: a chain of g tokens stops at the
  first rejection, so later positions are often never tried. With independent acceptance 0.83
  and g = 8, accepted / proposed is only 0.47.
- position_acceptance (a) = accepted / tried: the chance that draft token i is accepted given
  that token i - 1 was. Position i is *tried* when tokens 1..i-1 were accepted and the draft
  reaches depth i, so a step with k accepted of a depth-d draft tries min(k + 1, d) positions.
  This is the a of E[tokens per step] = (1 - a^(g+1)) / (1 - a) (costmodel.py).
- mean_accepted_len (tau) = tokens emitted per target forward = accepted + 1 bonus, averaged
  over steps (the "mean accepted tokens" of Spec-Bench and EAGLE). The baseline has tau = 1.
- tokens_per_s = generated tokens / wall time of the decode loop (prefill included).
- speedup = baseline wall time / method wall time for the same prompts, measured in the same run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, asdict
from pathlib import Path


@dataclass
class StepRecord:
    proposed: int        # draft nodes proposed
    accepted: int        # draft tokens accepted
    emitted: int         # tokens appended this step (accepted + bonus, fewer at EOS / the limit)
    propose_s: float
    verify_s: float      # target forward + verification + cache compaction
    wall_s: float
    draft_depth: int | None = None   # deepest node of a tree draft; None = a chain (depth = proposed)

    @property
    def tried(self) -> int:
        """Positions whose acceptance was decided: min(accepted + 1, depth). Chain of 4, 1 accepted -> 2."""
        depth = self.proposed if self.draft_depth is None else self.draft_depth
        return min(self.accepted + 1, depth)


@dataclass
class RequestRecord:
    method: str
    prompt_id: str
    prompt_len: int
    new_tokens: int
    steps: int
    proposed: int
    accepted: int
    prefill_s: float
    propose_s: float
    verify_s: float
    wall_s: float
    tried: int = 0       # draft positions whose acceptance was decided (StepRecord.tried summed)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def position_acceptance(self) -> float:
        return self.accepted / self.tried if self.tried else 0.0

    @property
    def mean_accepted_len(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, position_acceptance=self.position_acceptance,
                 mean_accepted_len=self.mean_accepted_len, tokens_per_s=self.tokens_per_s)
        return d


def request_record(method: str, prompt_id, prompt_len: int, steps: list[StepRecord], prefill_s: float,
                   wall_s: float) -> RequestRecord:
    return RequestRecord(
        method=method, prompt_id=str(prompt_id), prompt_len=prompt_len,
        new_tokens=sum(s.emitted for s in steps), steps=len(steps),
        proposed=sum(s.proposed for s in steps), accepted=sum(s.accepted for s in steps),
        prefill_s=prefill_s, propose_s=sum(s.propose_s for s in steps),
        verify_s=sum(s.verify_s for s in steps), wall_s=wall_s, tried=sum(s.tried for s in steps))


# The fields every stored summary carries (chapters/results/<chapter>/*.json). Methods may add more.
SUMMARY_FIELDS = {
    "method": str, "profile": str, "model": str, "device": str, "dtype": str, "prompt_set": str,
    "n_prompts": int, "draft_len": (int, type(None)), "temperature": (int, float),
    "acceptance_rate": (int, float), "mean_accepted_len": (int, float), "tokens_per_s": (int, float),
    "baseline_tokens_per_s": (int, float, type(None)), "speedup": (int, float, type(None)),
}


def summarize(records: list[RequestRecord], **context) -> dict:
    """Aggregate request records into one summary (ratios of sums, not means of ratios)."""
    new = sum(r.new_tokens for r in records)
    steps = sum(r.steps for r in records)
    proposed = sum(r.proposed for r in records)
    tried = sum(r.tried for r in records)
    wall = sum(r.wall_s for r in records)
    out = {
        "n_prompts": len(records),
        "new_tokens": new,
        "steps": steps,
        "acceptance_rate": sum(r.accepted for r in records) / proposed if proposed else 0.0,
        "position_acceptance": sum(r.accepted for r in records) / tried if tried else 0.0,
        "mean_accepted_len": new / steps if steps else 0.0,
        "tokens_per_s": new / wall if wall else 0.0,
        "wall_s": wall,
        "propose_s": sum(r.propose_s for r in records),
        "verify_s": sum(r.verify_s for r in records),
    }
    out.update(context)
    return out


def _step_counts(step) -> tuple[int, int, int]:
    """(proposed, accepted, depth) of a StepRecord, a dict with those keys, or a (proposed, accepted) pair."""
    if isinstance(step, (tuple, list)):
        proposed, accepted = step
        return int(proposed), int(accepted), int(proposed)
    get = step.get if isinstance(step, dict) else (lambda k, d=None: getattr(step, k, d))
    depth = get("draft_depth", None)
    return int(get("proposed")), int(get("accepted")), int(get("proposed") if depth is None else depth)


def position_acceptance(steps) -> dict:
    """Per-position acceptance from step records (chains; trees when draft_depth is set).

    Position i is tried in a step when tokens 1..i-1 were accepted and the draft is at least i deep;
    a_i = (steps that accepted position i) / (steps that tried it). The pooled a = accepted / tried is
    the maximum-likelihood estimate when every position has the same independent chance.
    Example, chains of 4 with 4, 1 and 0 accepted: they try min(k + 1, 4) = 4, 2, 1 positions,
    so a = 5 / 7, accepted / proposed = 5 / 12, per_position = [2/3, 1/2, 1, 1].
    """
    counts = [_step_counts(s) for s in steps]
    depth = max((d for _, _, d in counts), default=0)
    tried, accepted = [0] * depth, [0] * depth
    for _, k, d in counts:
        for i in range(min(k + 1, d)):     # position i + 1 was tried ...
            tried[i] += 1
            accepted[i] += i < k           # ... and accepted when k > i
    n_tried, n_acc = sum(tried), sum(accepted)
    n_prop = sum(p for p, _, _ in counts)
    depth_counts: dict[int, int] = {}
    for _, _, d in counts:
        depth_counts[d] = depth_counts.get(d, 0) + 1
    return {"a": n_acc / n_tried if n_tried else 0.0,
            "accepted_over_proposed": n_acc / n_prop if n_prop else 0.0,
            "per_position": [a / t if t else None for a, t in zip(accepted, tried)],
            "tried": tried, "accepted": accepted, "steps": len(counts),
            "depth_counts": dict(sorted(depth_counts.items()))}   # {draft depth: steps}


def _wall_and_tokens(r) -> tuple[float, int]:
    if isinstance(r, (int, float)):
        return float(r), 1
    get = r.get if isinstance(r, dict) else (lambda k: getattr(r, k))
    return float(get("wall_s")), int(get("new_tokens"))


def speedup_spread(baseline, method, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Speedup with its spread over prompts, from paired per-prompt runs (same prompt order).

    baseline, method: request records (objects or dicts with wall_s and new_tokens), or plain wall
    times in seconds. speedup = method tokens/s / baseline tokens/s over all prompts (ratios of sums;
    = baseline time / method time when both emit the same tokens). The interval resamples prompts
    with replacement (bootstrap, n_boot draws); min / median / max are over per-prompt ratios.
    `inside_noise` is True when the interval contains 1: no measured difference.
    """
    import random
    if len(baseline) != len(method) or not baseline:
        raise ValueError(f"need paired runs of the same prompts, got {len(baseline)} baseline and "
                         f"{len(method)} method runs")
    b = [_wall_and_tokens(r) for r in baseline]
    m = [_wall_and_tokens(r) for r in method]

    def ratio(idx):
        bt, bn = sum(b[i][0] for i in idx), sum(b[i][1] for i in idx)
        mt, mn = sum(m[i][0] for i in idx), sum(m[i][1] for i in idx)
        return (mn / mt) / (bn / bt)

    n = len(b)
    rng = random.Random(seed)
    boots = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(n_boot))
    lo = boots[int((1 - level) / 2 * (n_boot - 1))]
    hi = boots[int(round((1 + level) / 2 * (n_boot - 1)))]
    per = sorted(ratio([i]) for i in range(n))
    mid = per[n // 2] if n % 2 else (per[n // 2 - 1] + per[n // 2]) / 2
    return {"speedup": ratio(range(n)), "ci_low": lo, "ci_high": hi, "level": level, "n_prompts": n,
            "min": per[0], "median": mid, "max": per[-1], "inside_noise": lo <= 1.0 <= hi}


def format_spread(s: dict) -> str:
    """'1.42x (95% CI 1.31-1.55, 8 prompts)' for prose and tables."""
    n = s["n_prompts"]
    return (f"{s['speedup']:.2f}x ({round(100 * s['level'])}% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}, "
            f"{n} prompt{'' if n == 1 else 's'})")


def check_summary(summary: dict) -> None:
    """Raise ValueError naming every missing or mistyped field."""
    problems = []
    for name, typ in SUMMARY_FIELDS.items():
        if name not in summary:
            problems.append(f"missing {name!r}")
        elif not isinstance(summary[name], typ) or isinstance(summary[name], bool):
            problems.append(f"{name!r} has type {type(summary[name]).__name__}")
    if problems:
        raise ValueError("summary does not match the schema: " + ", ".join(problems))


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def write_jsonl(path, rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r.to_dict() if hasattr(r, "to_dict") else r, sort_keys=True) + "\n")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_summaries(folder, pattern: str = "*.json") -> list[dict]:
    """Every summary under a results folder (a file may hold one summary or a list of them)."""
    out = []
    for p in sorted(Path(folder).glob(pattern)):
        obj = read_json(p)
        out.extend(obj if isinstance(obj, list) else [obj])
    return out
