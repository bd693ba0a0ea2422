"""Prompt sets: Spec-Bench by category, and the real Qwen2.5-7B greedy outputs (see data/README.md).

A prompt set is named by a string, so a benchmark command line and a results file can say which
prompts were used: "spec_bench:summarization", "spec_bench:mt_bench", "spec_bench" (all),
"qwen7b_greedy:eval60", "qwen7b_greedy:train300".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# Spec-Bench's leaderboard columns, in its order.
SPEC_BENCH_TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass
class Prompt:
    prompt_id: str
    category: str
    prompt_ids: list[int]
    text: str = ""
    reference_ids: list[int] = field(default_factory=list)   # a known continuation, if any


def chat_ids(tokenizer, user_text: str, system: str = SYSTEM) -> list[int]:
    """The Qwen2.5 chat format, ending where the assistant starts to answer:
    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n
    """
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_text}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):   # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spec_bench(tokenizer, category: str | None = None, limit: int | None = None) -> list[Prompt]:
    """Spec-Bench questions (first turn), optionally one category or 'mt_bench'."""
    check_limit(limit)
    rows = _jsonl(DATA_DIR / "spec_bench" / "question.jsonl")
    cats = {r["category"] for r in rows} | {"mt_bench"}
    if category is not None and category not in cats:
        raise ValueError(f"unknown Spec-Bench category {category!r}: choose from {', '.join(sorted(cats))}")
    out = []
    for r in rows:
        task = "mt_bench" if r["category"] in MT_BENCH else r["category"]
        if category in (None, task, r["category"]):
            text = r["turns"][0]
            out.append(Prompt(f"sb{r['question_id']}", task, chat_ids(tokenizer, text), text))
    return out[:limit]


def spec_bench_turns() -> list[str]:
    """Every user turn of every Spec-Bench question (the chapters prompt with the first; a training set
    must avoid all of them)."""
    return [t for r in _jsonl(DATA_DIR / "spec_bench" / "question.jsonl") for t in r["turns"]]


def qwen7b_greedy(split: str = "eval60", limit: int | None = None) -> list[Prompt]:
    """The real Qwen2.5-7B-Instruct greedy outputs: prompt ids and the 7B's continuation."""
    check_limit(limit)
    files = {"eval60": "ultrachat_eval60_greedy128.jsonl", "train300": "ultrachat_train300_greedy16.jsonl"}
    if split not in files:
        raise ValueError(f"unknown split {split!r}: choose from {', '.join(files)}")
    rows = _jsonl(DATA_DIR / "qwen25_7b_greedy" / files[split])
    return [Prompt(r["prompt_id"][:12], "ultrachat", r["prompt_ids"], r["prompt"], r["completion_ids"])
            for r in rows][:limit]


def check_limit(limit) -> None:
    """limit: None (all prompts) or an int >= 1; slicing with 0 or a negative number would silently
    return no prompts or drop some."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (all prompts) or an int >= 1, got {limit!r}")


def load_prompt_set(name: str, tokenizer, limit: int | None = None) -> list[Prompt]:
    check_limit(limit)
    kind, _, arg = name.partition(":")
    if kind == "spec_bench":
        return spec_bench(tokenizer, arg or None, limit)
    if kind == "qwen7b_greedy":
        return qwen7b_greedy(arg or "eval60", limit)
    raise ValueError(f"unknown prompt set {name!r}: use spec_bench[:category] or qwen7b_greedy[:eval60|train300]")


def grounded(tokenizer, limit: int | None = None) -> list[Prompt]:
    """Input-grounded prompts (data/grounded/, chapter 3): edit a code file or quote a document
    given in the prompt, so the answer mostly copies the prompt. Prompt set name: "grounded"."""
    check_limit(limit)
    folder = DATA_DIR / "grounded"
    out = []
    for r in _jsonl(folder / "prompts.jsonl"):
        text = r["instruction"].replace("{document}", (folder / r["file"]).read_text())
        out.append(Prompt(r["prompt_id"], r["category"], chat_ids(tokenizer, text), text))
    return out[:limit]
