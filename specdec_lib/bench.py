"""`python -m specdec_lib.bench`: a method against our autoregressive baseline, in the same process.

For each prompt the baseline runs, then the method (interleaved, so drift in machine speed hits
both alike), after one warm-up generation. Optionally transformers' `generate` runs on the same
weights and prompts: what a reader would otherwise use. Output: per-request records (JSONL) and
one summary per method (JSON, the fields of metrics.SUMMARY_FIELDS plus provenance).

  python -m specdec_lib.bench --method baseline --profile small --prompts spec_bench:summarization --limit 3
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import load_prompt_set
from .decoding import generate
from .methods import make_proposer
from .metrics import check_summary, summarize, write_json, write_jsonl
from .models import EOS_IDS, load_profile


def to_transformers(model, copy: bool = False, attn_implementation: str | None = None):
    """transformers' Qwen2ForCausalLM with our weights: shared (no copy) for side-by-side timing, or
    copied (copy=True; the tests use attn_implementation="eager" as the exact reference)."""
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM
    c = model.config
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    cfg = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                   num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                   num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                   tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings,
                   **extra)
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()} if copy else model.state_dict()
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    # buffers are not in the state_dict: rebuild the rotary embedding's inv_freq off the meta device
    with torch.device(model.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    if c.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(model.dtype).eval()


@torch.inference_mode()
def time_transformers(hf_model, prompt_ids, max_new_tokens, assistant=None, **kw) -> tuple[list[int], float]:
    """Greedy `generate` (optionally assisted, or with prompt lookup via kw); returns tokens, seconds."""
    device = next(hf_model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=list(EOS_IDS), pad_token_id=EOS_IDS[0],
                            assistant_model=assistant, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out[0, len(prompt_ids):].tolist(), time.perf_counter() - t0


def run_benchmark(models, method: str, prompt_set: str, prompts, max_new_tokens: int = 64,
                  temperature: float = 0.0, options: dict | None = None, transformers_generate: bool = False,
                  seed: int = 0, progress: bool = True) -> dict:
    """Baseline and `method` on the same prompts; returns {'summaries': [...], 'records': [...]}.

    speedup = method tokens/s / baseline tokens/s (= baseline time / method time when, as with greedy
    decoding, both produce the same tokens). Greedy runs also report `greedy_match_rate`: the
    fraction of prompts whose output equals the baseline's token for token (1.0 in float32; in bf16
    a k-token forward rounds differently from k one-token forwards, so rare divergence is possible).
    """
    options = dict(options or {})
    base = make_proposer("baseline")
    # Warm-up: first calls pay for allocation and kernel selection.
    generate(models.target, base, prompts[0].prompt_ids, 4, eos_ids=EOS_IDS)

    base_recs, meth_recs, hf_times, hf_tokens, matches = [], [], [], [], []
    proposer = None
    if method not in ("baseline", "oracle"):
        proposer = make_proposer(method, models, **options)
    hf = to_transformers(models.target) if transformers_generate else None
    for i, p in enumerate(tqdm(prompts, desc=f"{method} vs baseline", disable=not progress)):
        b = generate(models.target, base, p.prompt_ids, max_new_tokens, temperature, seed=seed + i,
                     eos_ids=EOS_IDS, prompt_id=p.prompt_id)
        base_recs.append(b.record)
        if method != "baseline":
            if method == "oracle":   # the oracle is handed the baseline's own greedy output
                proposer = make_proposer("oracle", models, continuations={tuple(p.prompt_ids): b.tokens}, **options)
            m = generate(models.target, proposer, p.prompt_ids, max_new_tokens, temperature, seed=seed + i,
                         eos_ids=EOS_IDS, prompt_id=p.prompt_id)
            meth_recs.append(m.record)
            matches.append(m.tokens == b.tokens)
        if hf is not None:
            toks, secs = time_transformers(hf, p.prompt_ids, max_new_tokens)
            hf_times.append(secs)
            hf_tokens.append(len(toks))
            if temperature == 0 and method == "baseline":
                matches.append(toks == b.tokens)

    prov = models.provenance()
    category = prompt_set.partition(":")[2] or "all"
    common = dict(prov, prompt_set=prompt_set, category=category, temperature=float(temperature),
                  max_new_tokens=max_new_tokens)
    base_sum = summarize(base_recs, method="baseline", draft_len=None, **common)
    base_tps = base_sum["tokens_per_s"]
    base_sum.update(baseline_tokens_per_s=base_tps, speedup=1.0)
    summaries = [base_sum]
    if hf is not None:
        tps = sum(hf_tokens) / sum(hf_times)
        base_sum.update(transformers_tokens_per_s=tps, transformers_speedup=tps / base_tps)
        if method == "baseline" and temperature == 0:
            base_sum["transformers_match_rate"] = sum(matches) / len(matches)
    if meth_recs:
        s = summarize(meth_recs, method=method, draft_len=options.get("draft_len"), **common,
                      **{k: v for k, v in options.items() if isinstance(v, (int, float, str, bool)) and k != "draft_len"})
        s.update(baseline_tokens_per_s=base_tps, speedup=s["tokens_per_s"] / base_tps if base_tps else None)
        if temperature == 0:
            s["greedy_match_rate"] = sum(matches) / len(matches)
        summaries.append(s)
    for s in summaries:
        check_summary(s)
    return {"summaries": summaries, "records": [r.to_dict() for r in base_recs + meth_recs]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="baseline")
    ap.add_argument("--profile", default=None, help="tiny | small | qwen7b (default: $SPECDEC_PROFILE)")
    ap.add_argument("--prompts", default="spec_bench:summarization")
    ap.add_argument("--limit", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-len", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra proposer option, e.g. --option max_n=3 (value parsed as JSON when possible)")
    ap.add_argument("--no-transformers", action="store_true", help="skip timing transformers' generate")
    ap.add_argument("--out", default=None, help="folder for summary.json and records.jsonl")
    a = ap.parse_args(argv)

    options = {}
    for kv in a.option:
        k, _, v = kv.partition("=")
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    if a.draft_len is not None:
        if a.draft_len < 1:
            ap.error(f"--draft-len must be >= 1, got {a.draft_len}")
        options["draft_len"] = a.draft_len
    dtype = getattr(torch, a.dtype) if a.dtype else None
    models = load_profile(a.profile, a.device, dtype)
    prompts = load_prompt_set(a.prompts, models.tokenizer, a.limit)
    result = run_benchmark(models, a.method, a.prompts, prompts, a.max_new_tokens, a.temperature, options,
                           transformers_generate=not a.no_transformers)
    print(f"\n{models.provenance()}")
    print(f"{'method':<14}{'tok/s':>9}{'speedup':>9}{'accept':>8}{'tau':>6}")
    for s in result["summaries"]:
        print(f"{s['method']:<14}{s['tokens_per_s']:>9.2f}{s['speedup']:>9.2f}{s['acceptance_rate']:>8.2f}"
              f"{s['mean_accepted_len']:>6.2f}")
        if "transformers_tokens_per_s" in s:
            print(f"{'transformers':<14}{s['transformers_tokens_per_s']:>9.2f}{s['transformers_speedup']:>9.2f}"
                  f"   (generate, same weights; greedy outputs equal ours: "
                  f"{s.get('transformers_match_rate', float('nan')):.0%})")
    if a.out:
        write_json(Path(a.out) / "summary.json", result["summaries"])
        write_jsonl(Path(a.out) / "records.jsonl", result["records"])
    return result


if __name__ == "__main__":
    main()
