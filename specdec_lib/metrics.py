"""Records: one per decode step, one per request, one summary per (method, setting) run.

Definitions used everywhere in the course:
- acceptance_rate = accepted draft tokens / proposed draft tokens (for a tree: / tree nodes).
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

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_len(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, mean_accepted_len=self.mean_accepted_len,
                 tokens_per_s=self.tokens_per_s)
        return d


def request_record(method: str, prompt_id, prompt_len: int, steps: list[StepRecord], prefill_s: float,
                   wall_s: float) -> RequestRecord:
    return RequestRecord(
        method=method, prompt_id=str(prompt_id), prompt_len=prompt_len,
        new_tokens=sum(s.emitted for s in steps), steps=len(steps),
        proposed=sum(s.proposed for s in steps), accepted=sum(s.accepted for s in steps),
        prefill_s=prefill_s, propose_s=sum(s.propose_s for s in steps),
        verify_s=sum(s.verify_s for s in steps), wall_s=wall_s)


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
    wall = sum(r.wall_s for r in records)
    out = {
        "n_prompts": len(records),
        "new_tokens": new,
        "steps": steps,
        "acceptance_rate": sum(r.accepted for r in records) / proposed if proposed else 0.0,
        "mean_accepted_len": new / steps if steps else 0.0,
        "tokens_per_s": new / wall if wall else 0.0,
        "wall_s": wall,
        "propose_s": sum(r.propose_s for r in records),
        "verify_s": sum(r.verify_s for r in records),
    }
    out.update(context)
    return out


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
