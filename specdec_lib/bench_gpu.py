"""`python -m specdec_lib.bench_gpu`: chapter 1's GPU measurements (a benchmark, not a test).

On one GPU, batch 1, bf16, in one run:
1. the device-to-device copy bandwidth (bytes read + written per second): the memory ceiling;
2. for each model (a model of the exact Qwen2.5-7B shapes with random weights, timing only; and
   the real Qwen2.5-Coder-1.5B / 0.5B when their GGUF files are given with --gguf-dir):
   - the cost curve c(k) = t(k new tokens) / t(1) after a 1024-token prefix, each k its own CUDA graph;
   - our autoregressive loop (CUDA graphs) in tokens/s, against the bound
     copy bandwidth / (bytes of weights + KV cache read per token): `fraction_of_bandwidth_bound`;
   - transformers' `generate` on the same weights and prompt, same run;
   - the oracle proposer (the target's own greedy continuation) at g = 1..16 through the same loop.
Writes chapters/results/01_cost/h200_*.json (or --out) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from .cuda_graphs import BUCKETS, GraphRunner, GreedyChain, cuda_time
from .decoding import generate
from .methods import make_proposer
from .metrics import write_json
from .models import QWEN25_7B, machine_name
from .qwen2 import count_parameters, random_model
from .tree import chain_inputs

KS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
OUT = Path(__file__).resolve().parent.parent / "chapters" / "results" / "01_cost"


def copy_bandwidth(gib: float = 4.0) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), reps=20)
    del src, dst
    return 2 * n * 2 / t


def bytes_per_token(model, context_len: int) -> int:
    """Weights read by one decode step (the embedding table is only indexed) + the KV cache read."""
    c = model.config
    weights = count_parameters(model) * model.dtype.itemsize
    if not c.tie_word_embeddings:
        weights -= model.model.embed_tokens.weight.numel() * model.dtype.itemsize
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize * context_len
    return weights + kv


@torch.inference_mode()
def cost_curve(model, ks=KS, prefix_len: int = 1024, compile: bool = True, fused: bool = True) -> dict:
    """t(k) for one forward of k new tokens after prefix_len cached tokens, each k a CUDA graph
    (fused: for k <= 16 the faster of the Triton kernels and the compiled forward, see GraphRunner)."""
    runner = GraphRunner(model, prefix_len + max(ks) + 8, buckets=ks, compile=compile, fused=fused).capture()
    cache = runner.cache
    ids = torch.randint(0, 150000, (1, prefix_len), device="cuda")
    pos, slots, mask = chain_inputs(0, prefix_len, cache.max_len, "cuda")
    model(ids, pos, cache, mask, slots, logits=False)
    cache.length = prefix_len
    times = []
    for k in ks:
        pos, slots, mask = chain_inputs(prefix_len, k, cache.max_len, "cuda")
        new = ids[:, :k]
        runner(new, pos, cache, mask, slots)       # copies inputs into the graph's buffers
        times.append(cuda_time(runner.graphs[k].replay, reps=30))
    variant = [runner.variant[k] for k in ks]
    del runner
    torch.cuda.empty_cache()
    return {"k": list(ks), "time_s": times, "relative_time": [t / times[0] for t in times],
            "prefix_len": prefix_len, "variant": variant}


def _decode_rate(r) -> float:
    return r.record.new_tokens / (r.record.wall_s - r.record.prefill_s)


def _agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.inference_mode()
def decode_benchmarks(model, prompt_ids, new_tokens: int, gs=(1, 2, 4, 8, 12, 16), hf_tokens: int = 32) -> dict:
    """Tokens/s of the decode loop in its variants, the device-fed baseline, and the oracle."""
    max_len = len(prompt_ids) + new_tokens + max(BUCKETS) + 8
    base = make_proposer("baseline")
    out, runs = {}, {}
    # 1. the speculative loop (one host sync per step) proposing nothing, three ways:
    #    eager; graphs of the compiled forward (version 5 of the notes); graphs of the fused kernels
    e = generate(model, base, prompt_ids, 32, max_len=max_len)
    out["eager_tokens_per_s"] = _decode_rate(e)
    runners = {"compiled": GraphRunner(model, max_len, compile=True).capture(),
               "fused": GraphRunner(model, max_len, compile=True, fused=True).capture()}
    for name, runner in runners.items():
        run = dict(forward=runner, kv_len=max_len, cache=runner.cache)
        generate(model, base, prompt_ids, 16, **run)                             # warm-up
        runs[name] = generate(model, base, prompt_ids, new_tokens, **run)
        out[f"loop_{name}_tokens_per_s"] = _decode_rate(runs[name])
    out["fused_vs_compiled_same_tokens"] = _agreement(runs["fused"].tokens, runs["compiled"].tokens)
    best = max(runners, key=lambda k: out[f"loop_{k}_tokens_per_s"])
    runner, b = runners.pop(best), runs[best]
    runners.clear()                      # free the other runner's graphs and cache
    out["loop"] = best
    out["variant_per_bucket"] = {str(k): v for k, v in runner.variant.items()}
    # 2. the baseline with no host in the loop: one graph per token feeds the next (GreedyChain)
    chain = GreedyChain(runner.step_forward(1), runner.cache, "cuda").capture()
    chain.generate(model, prompt_ids, 16)
    d = chain.generate(model, prompt_ids, new_tokens)
    out["device_loop_tokens_per_s"] = _decode_rate(d)
    out["device_loop_same_tokens"] = _agreement(d.tokens, b.tokens)
    out.update(new_tokens=b.record.new_tokens, tokens_per_s=b.record.tokens_per_s,
               decode_tokens_per_s=max(out["device_loop_tokens_per_s"], out[f"loop_{best}_tokens_per_s"]))
    ctx = len(prompt_ids) + new_tokens // 2
    out["bytes_per_token"] = bytes_per_token(model, ctx)
    # 3. the oracle (full acceptance) through the speculative loop
    run = dict(forward=runner, kv_len=max_len, cache=runner.cache)
    oracle = {}
    for g in gs:
        prop = make_proposer("oracle", continuations={tuple(prompt_ids): b.tokens}, draft_len=g)
        generate(model, prop, prompt_ids, 16, **run)
        r = generate(model, prop, prompt_ids, new_tokens, **run)
        rec = r.record
        oracle[g] = {"tokens_per_s": rec.tokens_per_s, "speedup": rec.tokens_per_s / b.record.tokens_per_s,
                     "mean_accepted_len": rec.mean_accepted_len,
                     "decode_speedup": _decode_rate(r) / out[f"loop_{best}_tokens_per_s"],
                     "decode_speedup_vs_device_loop": _decode_rate(r) / out["device_loop_tokens_per_s"],
                     "same_tokens": _agreement(r.tokens, b.tokens)}
    out["oracle"] = oracle
    del runner, chain
    torch.cuda.empty_cache()
    if hf_tokens:
        from .bench import time_transformers, to_transformers
        hf = to_transformers(model)
        time_transformers(hf, prompt_ids, 4)
        toks, secs = time_transformers(hf, prompt_ids, hf_tokens, min_new_tokens=hf_tokens)
        out["transformers_tokens_per_s"] = len(toks) / secs
        out["transformers_new_tokens"] = len(toks)
        del hf
    return out


@torch.inference_mode()
def fused_logit_check(model, prompt_len: int = 300) -> dict:
    """bf16 logits of the fused kernels against the plain forward on the same cache, T = 1 and 8."""
    from .kernels import FusedQwen2
    fused, res = FusedQwen2(model), {}
    ids = torch.randint(0, 150000, (1, prompt_len + 8), device="cuda")
    for T in (1, 8):
        c1, c2 = model.new_cache(prompt_len + 16), model.new_cache(prompt_len + 16)
        pos, slots, mask = chain_inputs(0, prompt_len, None, "cuda")
        for c in (c1, c2):
            model(ids[:, :prompt_len], pos, c, mask, slots, logits=False)
            c.length = prompt_len
        pos, slots, mask = chain_inputs(prompt_len, T, None, "cuda")
        want, _ = model(ids[:, prompt_len:prompt_len + T], pos, c1, mask, slots)
        got, _ = fused(ids[:, prompt_len:prompt_len + T], pos, c2, mask, slots)
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        res[T] = {"relative_error": rel, "argmax_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
    return res


@torch.no_grad()
def timing_model(config=QWEN25_7B):
    """Random weights of the exact shapes of `config` (Qwen2.5-7B by default), with two changes so that token x strongly
    predicts x + 1: the LM head is the embedding shifted by one row (times 10), and the blocks'
    output projections are scaled down 100x so the residual stream stays close to the token's
    embedding. Plain random weights give near-tied logits whose argmax flips between a k-token and a
    1-token forward in bf16, and then an oracle's drafts stop matching; this model's greedy path is
    stable. Same shapes, same bytes read, same time per forward."""
    model = random_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.mul_(0.01)
        layer.mlp.down_proj.weight.mul_(0.01)
    if config.tie_word_embeddings:   # a tied head cannot be the shifted embedding: untie it
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.roll(1, dims=0) * 10)
    else:
        model.lm_head.weight.copy_(model.model.embed_tokens.weight.roll(1, dims=0) * 10)
    return model


# usable memory as nvidia-smi reports it (MiB), for "which GPUs does this fit"
GPUS_MIB = {"T4 (16 GB)": 15360, "A10G (24 GB)": 23028, "L4 (24 GB)": 23034, "RTX 4090 (24 GB)": 24564,
            "A100 40GB": 40960, "A100 80GB": 81920, "H100 80GB": 81559, "H200": 143771}
CONTEXT_GIB = 0.6   # the CUDA context and cuBLAS/Triton workspaces, not counted by the allocator


def fits(peak_bytes: int) -> list[str]:
    """The GPUs (GPUS_MIB) whose memory holds this peak plus the CUDA context."""
    need_mib = peak_bytes / 2**20 + CONTEXT_GIB * 1024
    return [name for name, mib in GPUS_MIB.items() if mib >= need_mib]


def profile_memory(models: dict) -> dict:
    """Peak memory of each profile's pair on the fast path: the sum of the two models' measured peaks
    (each with its own runner, cache of ~1k tokens, graphs; measured one at a time, so the sum is an
    upper bound on one process holding both). qwen7b's 0.5B draft has the real 0.5B's shapes."""
    out = {}
    pairs = {"small (1.5B + 0.5B)": ("small_target", "small_draft"),
             "qwen7b (7B + 0.5B)": ("7b_shapes", "small_draft")}
    for name, (t, d) in pairs.items():
        if t in models and d in models:
            peak = models[t]["peak_memory_bytes"] + models[d]["peak_memory_bytes"]
            out[name] = {"peak_memory_bytes": peak, "fits": fits(peak),
                         "parts": {t: models[t]["peak_memory_bytes"], d: models[d]["peak_memory_bytes"]}}
    return out


def load_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM
    from .qwen2 import from_transformers
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return from_transformers(hf, "cuda", torch.bfloat16)


STORED = {"7b": "h200_7b_shapes_target", "1.5b": "h200_small_target", "0.5b": "h200_small_draft"}


def curves_main(argv=None):
    """`python -m specdec_lib.bench_gpu curves`: only the fused cost curves (random weights of the real
    shapes: the time does not depend on the values), beside the stored curves of the last full run,
    with the tuner's picks (which projections chose swap-AB) and the peak memory. ~30-50 s per model."""
    from .models import QWEN25_0_5B, QWEN25_1_5B
    ap = argparse.ArgumentParser(prog="python -m specdec_lib.bench_gpu curves", description=curves_main.__doc__)
    ap.add_argument("--shapes", default="7b,1.5b,0.5b")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--tag", default="_curves", help="written as h200_<model><tag>.json (the stored files stay)")
    a = ap.parse_args(argv)
    configs = {"7b": QWEN25_7B, "1.5b": QWEN25_1_5B, "0.5b": QWEN25_0_5B}
    names = [n for n in a.shapes.split(",") if n]
    bad = [n for n in names if n not in configs]
    if bad:
        ap.error(f"unknown shapes {bad}: choose from {', '.join(configs)}")
    if not torch.cuda.is_available():
        ap.error("curves needs a CUDA GPU")
    from .kernels import tuned_configs
    prov = {"machine": machine_name("cuda"), "dtype": "bfloat16", "device": "cuda", "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    peaks = {}
    for n in names:
        t0 = time.time()
        model = timing_model(configs[n])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        curve = cost_curve(model)
        peak = torch.cuda.max_memory_allocated()
        peaks[{"7b": "7b_shapes", "1.5b": "small_target", "0.5b": "small_draft"}[n]] = {"peak_memory_bytes": peak}
        stored = OUT / f"{STORED[n]}.json"
        old = json.loads(stored.read_text())["time_s"] if stored.exists() else None
        curve.update(prov, model=f"Qwen2.5-{n.upper()} shapes, random weights (timing only)", profile="h200",
                     peak_memory_bytes=peak, kernel_configs=tuned_configs(), name=f"h200_{n}{a.tag}",
                     compared_with=STORED[n] if old else None)
        write_json(Path(a.out) / f"h200_{n.replace('.', 'p')}{a.tag}.json", curve)
        print(f"\n{n} shapes ({time.time() - t0:.0f} s; peak {peak / 2**30:.2f} GiB): t(k) ms now"
              + (f" (stored {STORED[n]})" if old else ""))
        print("  " + " ".join(f"{k}:{t * 1e3:.2f}" + (f"({o * 1e3:.2f})" if old else "")
                              for k, t, o in zip(curve["k"], curve["time_s"], old or curve["time_s"])))
        print("  c(k): " + " ".join(f"{k}:{c:.2f}" for k, c in zip(curve["k"], curve["relative_time"])))
        swapped = sorted({k for k, v in tuned_configs().items() if v["dot"] == "swap"})
        print(f"  projections that picked swap-AB: {len(swapped)} of {len(tuned_configs())}: {swapped}")
        del model
        torch.cuda.empty_cache()
    memory = profile_memory(peaks)
    for name, m in memory.items():
        print(f"{name}: peak {m['peak_memory_bytes'] / 2**30:.1f} GiB (+{CONTEXT_GIB} GiB CUDA context) fits: "
              f"{', '.join(m['fits']) or 'none of the listed GPUs'}")
    if memory:
        write_json(Path(a.out) / f"h200_memory{a.tag}.json", dict(prov, profiles=memory, note=profile_memory.__doc__))


def main(argv=None):
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    if argv[:1] == ["live"]:            # every method live on the real pair: bench_live.py
        from .bench_live import live_main
        return live_main(argv[1:])
    if argv[:1] == ["curves"]:
        return curves_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf-dir", default=None, help="folder with the two GGUF files of `make models`")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--shapes", default="",
                    help="also time models of these shapes with random weights, e.g. 1.5b,0.5b (no GGUF needed)")
    ap.add_argument("--no-transformers", action="store_true", help="skip transformers' generate")
    a = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench_gpu needs a CUDA GPU"
    out = Path(a.out)
    prov = {"machine": machine_name("cuda"), "dtype": "bfloat16", "device": "cuda", "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 150000, (512,), generator=g).tolist()

    models = []
    if not a.skip_7b:
        models.append(("7b_shapes", "Qwen2.5-7B shapes, random weights (timing only)", timing_model))
    from .models import QWEN25_0_5B, QWEN25_1_5B
    for name in filter(None, a.shapes.split(",")):
        config = {"1.5b": QWEN25_1_5B, "0.5b": QWEN25_0_5B}[name]
        models.append((f"{name.replace('.', 'p')}_shapes", f"Qwen2.5-{name.upper()} shapes, random weights (timing only)",
                       lambda config=config: timing_model(config)))
    if a.gguf_dir:
        from .models import GGUF_PAIR
        for role, key in (("target", "small_target"), ("draft", "small_draft")):
            path = Path(a.gguf_dir) / f"{GGUF_PAIR[role]['name']}-q4_k_m.gguf"
            if not path.exists():
                print(f"(no {path}: the real {role} is not measured)")
                continue
            models.append((key, f"{GGUF_PAIR[role]['hub_id']} (GGUF Q4_K_M, de-quantized)",
                           lambda path=path: load_gguf_model(path)))
    summary = {"copy_bandwidth_bytes_per_s": bw, **prov, "models": {}}
    for key, label, make in models:
        t0 = time.time()
        model = make()
        print(f"\n{label}: {count_parameters(model) / 1e9:.2f} B parameters, loaded in {time.time() - t0:.0f} s")
        check = fused_logit_check(model)
        print("  fused kernels vs plain forward (bf16): " + "; ".join(
            f"T={T}: rel. error {c['relative_error']:.1e}, argmax agree {c['argmax_agree']:.0%}" for T, c in check.items()))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        curve = cost_curve(model)      # the fast path: weights (fused in place) + cache + graphs + tuning
        peak = torch.cuda.max_memory_allocated()
        plain = cost_curve(model, fused=False)
        name = f"h200_{key}_target" if key == "7b_shapes" else f"h200_{key}"
        curve.update(prov, model=label, profile="h200", name=name,
                     compiled_time_s=plain["time_s"], compiled_relative_time=plain["relative_time"])
        write_json(out / f"{name}.json", curve)
        print("  t(k) ms fused:    " + " ".join(f"{k}:{t * 1e3:.2f}" for k, t in zip(curve["k"], curve["time_s"])))
        print("  t(k) ms compiled: " + " ".join(f"{k}:{t * 1e3:.2f}" for k, t in zip(plain["k"], plain["time_s"])))
        hf_tokens = 0 if key == "small_draft" or a.no_transformers else 32
        res = decode_benchmarks(model, prompt, a.new_tokens, hf_tokens=hf_tokens)
        res["fused_logit_check"] = check
        res["peak_memory_bytes"] = peak
        res["weights_bytes"] = count_parameters(model) * model.dtype.itemsize
        print(f"  peak GPU memory of the fast path (1k context): {peak / 2**30:.2f} GiB "
              f"(weights {res['weights_bytes'] / 2**30:.2f} GiB)")
        from .kernels import tuned_configs
        res["kernel_configs"] = tuned_configs()
        bound = bw / res["bytes_per_token"]
        res.update(model=label, bound_tokens_per_s=bound,
                   fraction_of_bandwidth_bound=res["decode_tokens_per_s"] / bound,
                   t1_s=curve["time_s"][0])
        summary["models"][key] = res
        print(f"  decode tok/s: device-fed loop {res['device_loop_tokens_per_s']:.0f} "
              f"(same tokens: {res['device_loop_same_tokens']}/{res['new_tokens']}); speculative loop: "
              f"fused {res['loop_fused_tokens_per_s']:.0f}, compiled {res['loop_compiled_tokens_per_s']:.0f} "
              f"(fused = compiled for {res['fused_vs_compiled_same_tokens']} tokens), eager "
              f"{res['eager_tokens_per_s']:.0f}; bound {bound:.0f} -> {res['fraction_of_bandwidth_bound']:.0%}")
        if "transformers_tokens_per_s" in res:
            print(f"  transformers generate: {res['transformers_tokens_per_s']:.1f} tok/s")
        print("  oracle decode speedup vs loop / vs device-fed loop: " + " ".join(
            f"g={g}:{o['decode_speedup']:.2f}/{o['decode_speedup_vs_device_loop']:.2f}x" for g, o in res["oracle"].items()))
        del model
        torch.cuda.empty_cache()
    summary["memory"] = profile_memory(summary["models"])
    for name, m in summary["memory"].items():
        print(f"{name}: peak {m['peak_memory_bytes'] / 2**30:.1f} GiB (+{CONTEXT_GIB} GiB CUDA context) fits: "
              f"{', '.join(m['fits']) or 'none of the listed GPUs'}")
    write_json(out / "h200_summary.json", summary)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "oracle"} for k, v in summary["models"].items()},
                     indent=1))


if __name__ == "__main__":
    main()
