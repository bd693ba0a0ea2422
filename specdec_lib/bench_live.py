"""`python -m specdec_lib.bench_gpu live`: every method live through the graph runner, with the peers.

One run, one machine, batch 1, greedy:
- the target (and the draft) captured once in a GraphRunner each (CUDA graphs, fused kernels for
  steps of <= 16 tokens); the draft model proposes through its own graphs (cuda_graphs.GraphDraft);
- our autoregressive baseline through the same loop (one host sync per step), and the device-fed
  baseline (GreedyChain), on every prompt;
- each method of --methods (name[:key=value[:key=value...]], comma-separated, e.g.
  `draft_model:draft_len=4,ngram,suffix:cache_size=0,suffix,medusa:budget=32`), built with
  make_proposer(name, models, **options); the target's graphs return the hidden layers the methods need;
  n-gram and suffix back off on this run's own measured curve with `cost_curve=runner`
  (e.g. `ngram:draft_len=4:max_n=3:cost_curve=runner`), or on a stored one by name;
- transformers' `generate`, assisted generation (the draft) and prompt lookup on the same weights
  (--peer-prompts per set, --peer-tokens each) against our baseline on the same prompts and length;
- the cost curves of both runners in the same run, so each method's measured speedup is set
  against its prediction: sum(emitted) / sum over steps of (proposer time / t(1) + c(bucket(nodes + 1)));
- the oracle (the model's own greedy continuation of real prompts) for the target and for the draft model.
- with --trace LABEL,... (method labels, or baseline): one request of each under torch.profiler after the
  warm-up (`trace_request`): the wall time per step, the share of it the GPU ran kernels, the host ops.

Prompt sets: Spec-Bench's six categories (--per-category each), the grounded set (data.grounded), and
chapter 4's repeated workload (six similar dataclass requests, in order). Prompts run round-robin over
the sets (prompt 1 of every set, then prompt 2, ...) and the results files are rewritten after every
round, so a run stopped by --budget-s (or killed) still leaves complete, consistent files.

Writes, per chapter, <out>/<chapter>/<card>_live<tag>.json, <card> naming the GPU (`file_prefix`:
h200_live, h100_live), with metrics.SUMMARY_FIELDS + provenance: one row per prompt set and method, with
the baseline and peer rows; and beside it <card>_live<tag>_run.json (curves, oracle, per-request rows,
timings). On a CPU (`--profile tiny`) the same code runs with eager
forwards in place of graphs (GraphRunner's CPU mode), so it is tested in CI.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .bench import parse_options
from .cuda_graphs import BUCKETS, CATCHUP, GraphDraft, GraphRunner, GreedyChain, draft_runner
from .data import SPEC_BENCH_TASKS, Prompt, chat_ids, grounded, spec_bench
from .decoding import generate
from .methods import make_proposer
from .metrics import check_summary, summarize, write_json
from .models import EOS_IDS, Models, load_profile
from .timing import cuda_time, phase_printer, trace

RESULTS = Path(__file__).resolve().parent.parent / "chapters" / "results"
# where each method's rows go (a method not listed here: "live_<name>")
CHAPTERS = {"draft_model": "02_draft_model", "ngram": "03_ngram", "suffix": "04_suffix", "medusa": "05_medusa",
            "eagle3": "06_eagle3", "pard": "07_pard", "oracle": "01_cost"}
PEERS = {"draft_model": "transformers_assisted", "ngram": "transformers_prompt_lookup",
         "suffix": "transformers_prompt_lookup", "pard": "transformers_assisted"}

# chapter 4's repeated workload: similar requests in a row (the global suffix cache learns from each)
ENTITIES = [("Book", "title, author, year, isbn"), ("Movie", "title, director, year, rating"),
            ("Employee", "name, department, salary, start_date"), ("Product", "name, price, sku, stock"),
            ("Song", "title, artist, album, duration_s"), ("Invoice", "number, customer, total, due_date")]
TASK = ("Write a Python dataclass named {} with the fields {}, plus a to_dict method and a "
        "from_dict classmethod. Reply with code only.")


def repeated_workload(tokenizer, n: int = 6) -> list[Prompt]:
    return [Prompt(f"dataclass-{name}", "agentic", chat_ids(tokenizer, TASK.format(name, fields)))
            for name, fields in ENTITIES[:n]]


def parse_methods(spec: str) -> list[tuple[str, str, dict]]:
    """'ngram:max_n=3:draft_len=4,suffix' -> [(label, name, options)]; values parsed as JSON when they can be."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, *kvs = item.split(":")
        try:
            options = parse_options(kvs)
        except ValueError:
            raise ValueError(f"bad option in {item!r}: write name:key=value[:key=value]") from None
        out.append((item, name, options))
    labels = [label for label, _, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a method appears twice in {spec!r}")
    return out


def prompt_sets(tokenizer, names, per_category: int, repeated: int) -> dict[str, list[Prompt]]:
    sets = {}
    for name in names:
        if name == "spec_bench":
            for cat in SPEC_BENCH_TASKS:
                sets[f"spec_bench:{cat}"] = spec_bench(tokenizer, cat, per_category)
        elif name.startswith("spec_bench:"):
            sets[name] = spec_bench(tokenizer, name.split(":", 1)[1], per_category)
        elif name == "grounded":
            sets["grounded"] = grounded(tokenizer)
        elif name == "repeated":
            sets["agentic:dataclass"] = repeated_workload(tokenizer, repeated)
        else:
            raise ValueError(f"unknown prompt set {name!r}: use spec_bench, spec_bench:<category>, grounded, repeated")
    return sets


# ---------------------------------------------------------------- the cost curve of a runner
@torch.inference_mode()
def runner_curve(runner: GraphRunner, reps: int = 30) -> dict:
    """t(b) for one step of each bucket b, as the runner runs it (graph replay on a GPU, the padded
    eager forward on a CPU). The mask always spans max_len slots, so t(b) does not depend on how full
    the cache is. c(T) for a T-token step = t(bucket(T)) / t(1)."""
    times = []
    for b in runner.buckets:
        if runner.on_gpu:
            times.append(cuda_time(runner.graphs[b].replay, reps=reps, warmup=2))
        else:
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                runner._forward(b, runner.variant[b])
                ts.append(time.perf_counter() - t0)
            times.append(sorted(ts)[1])
    return {"k": list(runner.buckets), "time_s": times, "relative_time": [t / times[0] for t in times],
            "variant": [runner.variant[b] for b in runner.buckets], "max_len": runner.max_len}


def step_cost(curve: dict, runner: GraphRunner, T: int) -> float:
    """c(T): the relative time of the bucket a T-token step is padded to (beyond the last bucket: the last)."""
    b = runner.bucket(T)
    if b not in curve["k"]:       # eager (None), or a catch-up bucket, which the curve leaves out
        b = curve["k"][-1]
    return curve["relative_time"][curve["k"].index(b)]


def predicted_speedup(steps, curve: dict, runner: GraphRunner) -> float:
    """Emitted tokens / (sum over steps of proposer time in t(1) units + c(nodes + 1)): what the
    speedup would be if the loop itself cost nothing beyond the measured forwards and proposer."""
    t1 = curve["time_s"][0]
    cost = sum(s.propose_s / t1 + step_cost(curve, runner, s.proposed + 1) for s in steps)
    return sum(s.emitted for s in steps) / cost if cost else 0.0


def _decode_s(results) -> float:
    return sum(r.record.wall_s - r.record.prefill_s for r in results)


# ---------------------------------------------------------------- the oracle on real text
@torch.inference_mode()
def oracle_real(model, runner, chain, prompts, new_tokens: int, gs=(1, 2, 4, 8, 16)) -> dict:
    """The model's own greedy continuation of real prompts, proposed back g tokens at a time.

    Every draft is accepted (when the k-token forward's argmax agrees with the 1-token one's; bf16
    may flip a near-tie, `same_tokens` says how often), so this is the ceiling for draft length g."""
    run = dict(forward=runner, kv_len=runner.max_len, cache=runner.cache)
    base = make_proposer("baseline")
    out = {"n_prompts": len(prompts), "new_tokens": new_tokens, "g": {}}
    refs, loop_s, chain_s, n_tok = [], 0.0, 0.0, 0
    for p in prompts:
        b = generate(model, base, p.prompt_ids, new_tokens, prompt_id=p.prompt_id, **run)
        d = chain.generate(model, p.prompt_ids, new_tokens, prompt_id=p.prompt_id)
        refs.append(b.tokens)
        loop_s += _decode_s([b])
        chain_s += _decode_s([d])
        n_tok += len(b.tokens)
    for g in gs:
        res = []
        for p, ref in zip(prompts, refs):
            prop = make_proposer("oracle", continuations={tuple(p.prompt_ids): ref}, draft_len=g)
            res.append(generate(model, prop, p.prompt_ids, new_tokens, prompt_id=p.prompt_id, **run))
        steps = sum(r.record.steps for r in res)
        out["g"][str(g)] = {
            "mean_accepted_len": sum(len(r.tokens) for r in res) / steps,
            "decode_speedup": loop_s / _decode_s(res),
            "decode_speedup_vs_device_loop": chain_s / _decode_s(res),
            "same_tokens": sum(r.tokens == ref for r, ref in zip(res, refs)) / len(res)}
    out["loop_tokens_per_s"] = n_tok / loop_s
    out["device_loop_tokens_per_s"] = n_tok / chain_s
    return out


# ---------------------------------------------------------------- the run
def _peer_rows(hf, hf_draft, target, base, run, p, tokens: int, lookup: int) -> dict:
    """One prompt through our baseline and the three transformers peers, same length."""
    from .experiments import time_transformers
    ours = generate(target, base, p.prompt_ids, tokens, eos_ids=EOS_IDS, prompt_id=p.prompt_id, **run)
    rows = {"baseline": (ours.tokens, ours.record.wall_s)}
    rows["transformers_generate"] = time_transformers(hf, p.prompt_ids, tokens)
    rows["transformers_assisted"] = time_transformers(hf, p.prompt_ids, tokens, assistant=hf_draft)
    rows["transformers_prompt_lookup"] = time_transformers(hf, p.prompt_ids, tokens, prompt_lookup_num_tokens=lookup)
    return rows


@torch.inference_mode()
def live(models: Models, methods, sets: dict, new_tokens: int = 256, peer_prompts: int = 1, peer_tokens: int = 64,
         prompt_lookup: int = 10, oracle_prompts: int = 2, deadline: float | None = None, on_round=None,
         buckets=BUCKETS, progress: bool = True, trace_labels=()) -> dict:
    """Run everything; returns {'summaries': [...], 'run': {...}}. on_round(result) after every round.
    deadline (time.time() value): no round starts that would, at the longest round's pace, end after it.
    trace_labels: methods (labels, or "baseline") whose one request on the first prompt runs under the
    profiler after the warm-up (`trace_request`): the run records where their steps' time goes."""
    t_setup = time.time()
    # setup phases printed as they end: compiling and capturing graphs takes minutes on a fresh GPU machine
    stamp = phase_printer("setup ", enabled=progress)
    target, draft = models.target, models.draft
    on_gpu = target.device.type == "cuda"
    longest = max(len(p.prompt_ids) for ps in sets.values() for p in ps)
    max_len = longest + max(new_tokens, peer_tokens) + max(buckets) + 8   # padded rows stay inside the cache
    # 1. the draft model's runner (buckets: 1-2 tokens fed per draft step, up to 17 for the oracle on it).
    # Every runner here gets the catch-up buckets (cuda_graphs.CATCHUP) for a prompt fed at once: a draft
    # model's or PARD's first proposal, the target's prefill
    draft_run = draft_runner(draft, max_len, buckets)
    draft_chain = GreedyChain(draft_run.step_forward(1), draft_run.cache, draft.device)
    if on_gpu:
        draft_chain.capture()
    stamp("draft model's graphs captured")
    # 2. proposers first: their hidden layers decide what the target's graphs return
    drafters = {}      # PARD: one merged drafter (adapter folded into the 0.5B) in its own graphs, shared by every k

    run_costs = []     # filled once the target's graphs exist: c(T) of a T-token step, as this run pays it

    def build(name, options):
        if options.get("cost_curve") == "runner":
            # back-off (n-gram, suffix) on the cost curve measured in this very run, bucket padding included
            if not run_costs:
                raise ValueError("cost_curve=runner is only known once the target's graphs are captured")
            options = dict(options, cost_curve=run_costs)
        if name == "draft_model":
            return make_proposer(name, models, draft=GraphDraft(draft_run),
                                 target_vocab=target.config.vocab_size, **options)
        if name == "pard" and "checkpoint" not in options:
            if "pard" not in drafters:
                from .methods.pard import load_drafter
                merged, mask_ids, _ = load_drafter(models)
                drafters["pard"] = (GraphDraft(draft_runner(merged, max_len, buckets)), mask_ids)
            return make_proposer(name, models, drafter=drafters["pard"], **options)
        return make_proposer(name, models, **options)

    errors = {}        # label -> the error that dropped it (one failing method must not sink the lease)

    def attempt(label, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Exception as e:   # noqa: BLE001  (recorded in the results and printed, never hidden)
            import traceback
            errors[label] = "".join(traceback.format_exception(e)[-3:])
            print(f"!! {label} failed and is dropped from the rest of the run: {e!r}")
            return None

    # proposers on the run's own curve are built after the target's graphs: they read no hidden layers
    later = [m for m in methods if m[2].get("cost_curve") == "runner"]
    proposers = {label: attempt(label, build, name, opts) for label, name, opts in methods
                 if name != "oracle" and (label, name, opts) not in later}
    proposers = {k: v for k, v in proposers.items() if v is not None}
    stamp(f"{len(proposers)} proposers built")
    layers = sorted({h for p in proposers.values() for h in getattr(p, "hidden_layers", ())})
    runner = GraphRunner(target, max_len, buckets, hidden_layers=layers, compile=on_gpu, fused=on_gpu,
                         catchup=CATCHUP).capture()
    chain = GreedyChain(runner.step_forward(1), runner.cache, target.device)
    if on_gpu:
        chain.capture()
    stamp("target's graphs captured")
    run = dict(forward=runner, kv_len=max_len, cache=runner.cache)
    curves = {"target": runner_curve(runner), "draft": runner_curve(draft_run)}
    run_costs += [step_cost(curves["target"], runner, T) for T in range(1, 66)]   # drafts up to 64 tokens
    for label, name, opts in later:
        prop = attempt(label, build, name, opts)
        if prop is not None:
            proposers[label] = prop
    if later:
        stamp(f"{len(later)} proposers on this run's cost curve built")
    # a method keeping state across requests (suffix's global cache) gets a fresh instance per prompt set
    per_set = {label: {} for label, p in proposers.items() if hasattr(p, "observe")}
    base = make_proposer("baseline")
    # 3. warm-up (allocation, lazy init): every path once, on a short prompt
    warm = min((p for ps in sets.values() for p in ps), key=lambda p: len(p.prompt_ids)).prompt_ids
    generate(target, base, warm, 8, **run)
    chain.generate(target, warm, 8)
    # subtle: long enough for every proposer's full draft. A step drafts at most (tokens left - 1), and a
    # proposer that records its proposal at its first full-size draft (EAGLE-3's ProposeGraph, which may also
    # compile it) would otherwise do so inside the first timed request (live run 8b: 5 s on one prompt)
    for label, prop in list(proposers.items()):
        if attempt(label, generate, target, prop, warm, max(buckets) + 8, **run) is None:
            del proposers[label]
    setup_s = time.time() - t_setup
    stamp("warm-up done")
    traced = {}
    first = next(ps[0] for ps in sets.values() if ps)
    for label in trace_labels:
        prop = base if label == "baseline" else proposers.get(label)
        if prop is not None:
            traced[label] = attempt(f"trace {label}", trace_request, target, prop, first.prompt_ids, run,
                                    min(64, new_tokens))
        else:
            print(f"(trace: no method {label!r} in this run)")
    # 4. the oracle on real text, for both models
    t0 = time.time()
    left = lambda: float("inf") if deadline is None else deadline - time.time()  # noqa: E731
    real = [ps[0] for ps in sets.values() if ps][:oracle_prompts]
    if real and left() < 150:
        print(f"(oracle skipped: {left():.0f} s left of the budget)")
        real = []
    oracle = {}
    if real:
        oracle["target"] = attempt("oracle_real(target)", oracle_real, target, runner, chain, real, new_tokens)
        oracle["draft_as_target"] = attempt("oracle_real(draft)", oracle_real, draft, draft_run, draft_chain,
                                            real, new_tokens)
        oracle = {k: v for k, v in oracle.items() if v is not None}
    oracle_s = time.time() - t0
    # 5. the peers' models share our weights
    hf = hf_draft = None
    if peer_prompts and left() < 150:
        print(f"(transformers peers skipped: {left():.0f} s left of the budget)")
    elif peer_prompts:
        from .experiments import time_transformers, to_transformers
        hf, hf_draft = to_transformers(target), to_transformers(draft)

        def warm_peers():
            time_transformers(hf, warm, 4)
            time_transformers(hf, warm, 4, assistant=hf_draft)
            time_transformers(hf, warm, 4, prompt_lookup_num_tokens=prompt_lookup)
            return True

        if attempt("transformers peers", warm_peers) is None:
            hf = None

    results = {name: {label: [] for label in ["baseline", "baseline_device_loop", *proposers]} for name in sets}
    peers = {name: [] for name in sets}
    rounds = max(len(ps) for ps in sets.values())
    round_s, done, stopped = [], 0, None
    out = {}
    for r in range(rounds):
        if r and deadline is not None and time.time() + max(round_s) > deadline:
            stopped = f"stopped after {r} of {rounds} rounds: the next would pass the time budget"
            print(stopped)
            out["run"]["stopped"] = stopped
            if on_round is not None:
                on_round(out)
            break
        t_round = time.time()
        todo = [(name, ps[r]) for name, ps in sets.items() if r < len(ps)]
        for name, p in tqdm(todo, desc=f"round {r + 1}/{rounds}", disable=not progress):
            res = results[name]
            kw = dict(eos_ids=EOS_IDS, prompt_id=p.prompt_id)
            # untimed first pass: whatever runs first on a new prompt length may pay one-off costs (shape-keyed
            # kernel choices, allocator growth); the timed baseline, which runs first, must not carry them
            generate(target, base, p.prompt_ids, new_tokens, **kw, **run)
            b = generate(target, base, p.prompt_ids, new_tokens, **kw, **run)
            res["baseline"].append(b)
            res["baseline_device_loop"].append(chain.generate(target, p.prompt_ids, new_tokens, **kw))
            for label, prop in list(proposers.items()):
                if label in per_set:
                    if name not in per_set[label]:
                        method = next(m for m in methods if m[0] == label)
                        per_set[label][name] = build(method[1], method[2])
                    prop = per_set[label][name]
                m = attempt(label, generate, target, prop, p.prompt_ids, new_tokens, **kw, **run)
                if m is None:
                    del proposers[label]
                    continue
                if hasattr(prop, "observe"):
                    prop.observe(m.tokens)
                res[label].append(m)
            for label, name_, opts in methods:
                if name_ == "oracle" and label not in errors:   # the target's own greedy output, proposed back
                    prop = make_proposer("oracle", continuations={tuple(p.prompt_ids): b.tokens}, **opts)
                    m = attempt(label, generate, target, prop, p.prompt_ids, new_tokens, **kw, **run)
                    if m is not None:
                        res.setdefault(label, []).append(m)
            if r < peer_prompts and hf is not None:
                row = attempt("transformers peers", _peer_rows, hf, hf_draft, target, base, run, p, peer_tokens,
                              prompt_lookup)
                if row is None:
                    hf = None
                else:
                    peers[name].append(row)
        round_s.append(time.time() - t_round)
        done = r + 1
        out = _collect(models, methods, sets, results, peers, curves, runner, new_tokens, peer_tokens)
        out["run"].update(oracle_real=oracle, setup_s=setup_s, oracle_s=oracle_s, round_s=round_s,
                          rounds_done=done, rounds_planned=rounds, stopped=stopped, hidden_layers=layers, errors=errors,
                          traces=traced,
                          max_len=max_len, variant_target=dict(runner.variant), variant_draft=dict(draft_run.variant))
        if on_gpu:
            out["run"]["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        if on_round is not None:
            on_round(out)
    return out


def trace_request(target, proposer, prompt_ids, run: dict, new_tokens: int = 64) -> dict:
    """One request under the profiler (timing.trace), after one untraced pass on the same prompt: the
    wall time per step, the share of it the GPU was busy, and the host ops that took the rest. A step
    whose GPU is idle half the time is bound by the host (launches, copies, syncs), not by its graphs."""
    generate(target, proposer, prompt_ids, new_tokens, **run)
    box = []
    info = trace(lambda: box.append(generate(target, proposer, prompt_ids, new_tokens, **run)))
    steps = len(box[0].steps)
    info.update(steps=steps, tokens=len(box[0].tokens), wall_ms_per_step=info["wall_s"] / steps * 1e3,
                gpu_busy_share=None if info["gpu_busy_s"] is None else info["gpu_busy_s"] / info["wall_s"])
    busy = "no GPU" if info["gpu_busy_s"] is None else f"GPU busy {info['gpu_busy_share']:.0%} of it"
    print(f"trace: {steps} steps, {info['tokens']} tokens, {info['wall_ms_per_step']:.2f} ms a step (traced), "
          f"{busy}, {info['gpu_kernels']} kernels\n{info['host_ops']}")
    return info


def _collect(models, methods, sets, results, peers, curves, runner, new_tokens, peer_tokens) -> dict:
    """Summaries (one per prompt set and method, the baseline's and the peers' included) and per-request rows."""
    prov = dict(models.provenance(), torch=torch.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"), run="live", measured=True, loop="graph runner" if runner.on_gpu
                else "eager (CPU: no graphs)")
    spec = {label: (name, opts) for label, name, opts in methods}
    summaries, rows = [], []
    for set_name, res in results.items():
        base = res["baseline"]
        if not base:
            continue
        common = dict(prov, prompt_set=set_name, category=set_name.split(":")[-1], temperature=0.0,
                      max_new_tokens=new_tokens)
        base_sum = summarize([b.record for b in base], method="baseline", draft_len=None, **common)
        base_tps = base_sum["tokens_per_s"]
        base_sum.update(baseline_tokens_per_s=base_tps, speedup=1.0, decode_speedup=1.0, method_name="baseline")
        summaries.append(base_sum)
        peer_sums = {}
        if peers[set_name]:
            ps = peers[set_name]
            ours_tps = sum(len(x["baseline"][0]) for x in ps) / sum(x["baseline"][1] for x in ps)
            for peer in ("transformers_generate", "transformers_assisted", "transformers_prompt_lookup"):
                toks = sum(len(x[peer][0]) for x in ps)
                tps = toks / sum(x[peer][1] for x in ps)
                same = sum(x[peer][0] == x["baseline"][0] for x in ps) / len(ps)
                tau = 1.0 if peer == "transformers_generate" else float("nan")   # not exposed by generate
                s = dict(common, method=peer, method_name=peer, n_prompts=len(ps), new_tokens=toks,
                         max_new_tokens=peer_tokens, draft_len=None, acceptance_rate=0.0 if tau == 1.0 else float("nan"),
                         mean_accepted_len=tau, tokens_per_s=tps, baseline_tokens_per_s=ours_tps,
                         speedup=tps / ours_tps, greedy_match_rate=same,
                         note=f"transformers on the same weights, first {len(ps)} prompt(s) of the set, "
                              f"{peer_tokens} new tokens; baseline = ours on the same prompts and length")
                peer_sums[peer] = s
                summaries.append(s)
        for label, outs in res.items():
            if label == "baseline" or not outs:
                continue
            n = len(outs)
            name, opts = spec.get(label, ("baseline_device_loop", {}))
            recs = [o.record for o in outs]
            same = [o.tokens == b.tokens for o, b in zip(outs, base)]
            steps = [s for o in outs for s in o.steps]
            draft_len = opts.get("draft_len")
            s = summarize(recs, method=label, draft_len=draft_len if isinstance(draft_len, int) else None, **common)
            s.update(method_name=name, options=opts, baseline_tokens_per_s=base_tps,
                     speedup=s["tokens_per_s"] / base_tps if base_tps else None,
                     decode_speedup=_decode_s(base[:n]) / _decode_s(outs), greedy_match_rate=sum(same) / n,
                     divergence_rate=1 - sum(same) / n)
            if name != "baseline_device_loop":
                s["chapter"] = CHAPTERS.get(name, f"live_{name}")
                pred = predicted_speedup(steps, curves["target"], runner)
                # the first step of a request also catches the proposer up on the prompt (a draft model
                # feeds it all): reported apart, so a one-off cost is not mistaken for a per-step one
                later = [st.propose_s for o in outs for st in o.steps[1:]]
                s.update(proposer_ms_first_step=1e3 * sum(o.steps[0].propose_s for o in outs if o.steps) / n,
                         proposer_ms_later_steps=1e3 * sum(later) / max(len(later), 1))
                s.update(proposer_ms_per_step=1e3 * s["propose_s"] / max(s["steps"], 1),
                         nodes_per_step=s.get("proposed", sum(st.proposed for st in steps)) / max(len(steps), 1),
                         # the steps that sent a draft at all (a back-off, or an n-gram without a match, sends none)
                         drafted_share=sum(st.proposed > 0 for st in steps) / max(len(steps), 1),
                         predicted_speedup=pred, loop_efficiency=s["decode_speedup"] / pred if pred else None)
                peer = PEERS.get(name)
                if peer in peer_sums:
                    s.update(peer=peer, speedup_over_peer=s["speedup"] / peer_sums[peer]["speedup"])
            summaries.append(s)
            for o, b in zip(outs, base):
                rows.append(dict(prompt_set=set_name, prompt_id=o.record.prompt_id, method=label,
                                 tau=o.record.mean_accepted_len, acceptance_rate=o.record.acceptance_rate,
                                 speedup=b.record.wall_s / o.record.wall_s, greedy_match=o.tokens == b.tokens))
    for s in summaries:
        check_summary(s)
    return {"summaries": summaries, "run": dict(prov, curves=curves, per_request=rows)}


def file_prefix(machine: str, device: str = "cuda") -> str:
    """The results' file name says what ran them: "h200_live" on an H200, "h100_live" on an H100, else
    "gpu_live" or "cpu_live_run" (a dry run; chapter 5's own "cpu_live.json" is another file)."""
    if torch.device(device).type != "cuda":
        return "cpu_live_run"
    for card in ("H200", "H100"):
        if card in machine.upper():
            return f"{card.lower()}_live"
    return "gpu_live"


def write_results(out: dict, root: Path, tag: str = "", prefix: str = "h200_live") -> list[Path]:
    """Each chapter's rows (baseline, device loop, peers and that chapter's methods) to
    <root>/<chapter>/<prefix><tag>.json, and the run's curves, oracle and per-request rows beside
    them, <root>/<chapter>/<prefix><tag>_run.json (so two runs with different methods never collide)."""
    by_chapter = {}
    for s in out["summaries"]:
        if "chapter" in s:
            by_chapter.setdefault(s["chapter"], [])
    shared = [s for s in out["summaries"] if "chapter" not in s]
    written = []
    for chapter in by_chapter:
        rows = shared + [s for s in out["summaries"] if s.get("chapter") == chapter]
        path = root / chapter / f"{prefix}{tag}.json"
        write_json(path, rows)
        write_json(path.with_name(f"{prefix}{tag}_run.json"), out["run"])
        written += [path, path.with_name(f"{prefix}{tag}_run.json")]
    return written


def live_table(summaries, methods=None, sets=None) -> str:
    """The per-set table of a live run (what the CLI prints), optionally only methods whose label starts
    with one of `methods` (the baselines always) and only the prompt sets in `sets`."""
    keep = lambda s: ((sets is None or s["prompt_set"] in sets) and (  # noqa: E731
        methods is None or s["method"].startswith(("baseline", *methods))))
    lines = [f"{'set':<26}{'method':<34}{'tok/s':>9}{'speedup':>8}{'pred.':>7}{'eff.':>6}{'tau':>6}"
             f"{'acc':>6}{'match':>6}{'prop ms':>8}{'1st ms':>8}"]
    for s in filter(keep, summaries):
        f = lambda k, fmt: format(s[k], fmt) if isinstance(s.get(k), (int, float)) else "-"  # noqa: E731
        lines.append(f"{s['prompt_set']:<26}{s['method'][:33]:<34}{f('tokens_per_s', '9.1f'):>9}{f('speedup', '8.2f'):>8}"
                     f"{f('predicted_speedup', '7.2f'):>7}{f('loop_efficiency', '6.2f'):>6}"
                     f"{f('mean_accepted_len', '6.2f'):>6}{f('acceptance_rate', '6.2f'):>6}"
                     f"{f('greedy_match_rate', '6.2f'):>6}{f('proposer_ms_per_step', '8.2f'):>8}"
                     f"{f('proposer_ms_first_step', '8.1f'):>8}")
    return "\n".join(lines)


def pooled(summaries, sets) -> dict[str, dict]:
    """Per method, pooled over the prompts of `sets` (one live run): speedup = its tokens per second over
    all those prompts / the baseline's over the same prompts, tau = tokens per target step, the share
    of prompts whose output equals the baseline's token for token, proposer ms per step. Pooling is
    what makes a run of one prompt per set readable: a single prompt's tok/s is dominated by its
    length (a 20-token answer is mostly prefill)."""
    acc: dict[str, dict] = {}
    seen = set()
    for s in summaries:
        if s["prompt_set"] not in sets or s["method"].startswith("transformers_") or (s["prompt_set"], s["method"]) in seen:
            continue                 # (the baseline's rows are in every chapter's file: count them once)
        seen.add((s["prompt_set"], s["method"]))
        a = acc.setdefault(s["method"], dict(tokens=0, wall=0.0, steps=0, prompts=0, match=0.0, propose=0.0))
        a["tokens"] += s["new_tokens"]
        a["wall"] += s["wall_s"]
        a["steps"] += s.get("steps") or s["new_tokens"]
        a["prompts"] += s["n_prompts"]
        a["match"] += s.get("greedy_match_rate", 1.0) * s["n_prompts"]
        a["propose"] += s.get("propose_s") or 0.0
    if "baseline" not in acc:
        raise ValueError(f"no baseline rows for {sets}: is this a live run's h200_live.json?")
    base_tps = acc["baseline"]["tokens"] / acc["baseline"]["wall"]
    return {m: dict(prompts=a["prompts"], tokens_per_s=a["tokens"] / a["wall"],
                    speedup=a["tokens"] / a["wall"] / base_tps, tau=a["tokens"] / a["steps"],
                    match=a["match"] / a["prompts"], proposer_ms=1e3 * a["propose"] / a["steps"])
            for m, a in acc.items()}


def decode_pooled(summaries, run: dict, sets, method: str) -> dict:
    """`method` against the baseline over the prompts of `sets`, decode steps only (no prefill, no
    set-up), in units of the run's one-token target step t(1) = run["curves"]["target"]["time_s"][0].

    measured: the baseline's decode seconds / the method's; tau: tokens per target step; base_step: the
    baseline's seconds per step / t(1) (1 = the loop adds nothing to a forward). With the rows'
    predicted_speedup (tau / (proposer + c(nodes + 1)) from the run's own curves), also: proposer and c
    (t(1) units per step, c = everything but the proposer), predicted, and eff = measured / predicted
    (1 = the loop costs nothing beyond the cost model; below 1 = overhead the model does not see).
    """
    t1 = run["curves"]["target"]["time_s"][0]
    rows, base = ([s for s in summaries if s["method"] == m and s["prompt_set"] in sets]
                  for m in (method, "baseline"))
    if not rows or not base:
        raise ValueError(f"no rows for {method!r} or the baseline in {sets}")
    dec_s = lambda ss: sum(s["propose_s"] + s["verify_s"] for s in ss)  # noqa: E731
    steps, toks = sum(s["steps"] for s in rows), sum(s["new_tokens"] for s in rows)
    out = dict(measured=dec_s(base) / dec_s(rows), tau=toks / steps,
               base_step=dec_s(base) / sum(s["steps"] for s in base) / t1)
    if all(s.get("predicted_speedup") for s in rows):
        cost = sum(s["new_tokens"] / s["predicted_speedup"] for s in rows)   # in t(1)
        prop = sum(s["propose_s"] for s in rows) / t1
        out.update(proposer=prop / steps, c=(cost - prop) / steps, predicted=toks / cost,
                   eff=out["measured"] * cost / toks)
    return out


def pooled_table(summaries, groups: dict, methods=None) -> str:
    """pooled() for each group of prompt sets ({'Spec-Bench (6 categories)': [...], ...}) as one table."""
    lines = [f"{'prompts':<28}{'method':<34}{'n':>3}{'tok/s':>8}{'speedup':>8}{'tau':>6}{'same':>6}{'prop ms':>8}"]
    for title, sets in groups.items():
        for m, r in pooled(summaries, sets).items():
            if methods is not None and not m.startswith(("baseline", *methods)):
                continue
            lines.append(f"{title[:27]:<28}{m[:33]:<34}{r['prompts']:>3}{r['tokens_per_s']:8.0f}{r['speedup']:8.2f}"
                         f"{r['tau']:6.2f}{r['match']:6.2f}{r['proposer_ms']:8.2f}")
    return "\n".join(lines)


def load_models(a) -> Models:
    dtype = getattr(torch, a.dtype) if a.dtype else None
    if a.gguf_dir:
        from .bench_gpu import load_gguf_model
        from .models import GGUF_PAIR, load_tokenizer
        models = {}
        for role in ("target", "draft"):
            path = Path(a.gguf_dir) / f"{GGUF_PAIR[role]['name']}-q4_k_m.gguf"
            if not path.exists():
                raise FileNotFoundError(f"no {path}: give --gguf-dir the folder of `make models`")
            models[role] = load_gguf_model(path)
            if dtype is not None:
                models[role] = models[role].to(dtype)
        label = lambda role: f"{GGUF_PAIR[role]['hub_id']} (GGUF Q4_K_M, de-quantized)"  # noqa: E731
        return Models("small", models["target"], models["draft"], load_tokenizer(), label("target"), label("draft"))
    return load_profile(a.profile, a.device, dtype)


def live_main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m specdec_lib.bench_gpu live", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="draft_model:draft_len=4,ngram:draft_len=4:max_n=3,suffix:cache_size=0,suffix")
    ap.add_argument("--prompts", default="spec_bench,grounded,repeated",
                    help="comma-separated: spec_bench (six categories), spec_bench:<category>, grounded, repeated")
    ap.add_argument("--per-category", type=int, default=5)
    ap.add_argument("--repeated", type=int, default=6, help="requests in the repeated workload (at most 6)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--peer-prompts", type=int, default=1, help="prompts per set timed with transformers (0: none)")
    ap.add_argument("--peer-tokens", type=int, default=64)
    ap.add_argument("--oracle-prompts", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="wall-time budget of the whole command (loading included): no round starts that would end past it")
    ap.add_argument("--profile", default=None, help="tiny | small (default $SPECDEC_PROFILE); ignored with --gguf-dir")
    ap.add_argument("--gguf-dir", default=None, help="load the real pair from the GGUF files of `make models`")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--out", default=str(RESULTS), help="results root (chapter folders inside)")
    ap.add_argument("--tag", default="", help="suffix for the file names, e.g. _fp32")
    ap.add_argument("--trace", default="", help="comma-separated method labels (or baseline): one request each "
                    "under the profiler after the warm-up, recorded in the run file (where a step's time goes)")
    a = ap.parse_args(argv)
    methods = parse_methods(a.methods)          # checked before any model loads
    from .methods import METHODS
    unknown = [name for _, name, _ in methods if name not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}: choose from {', '.join(sorted(METHODS))}")
    from .methods import check_options
    for label, name, options in methods:
        try:
            check_options(name, options)
        except ValueError as e:
            ap.error(f"{label}: {e}")
    for flag in ("per_category", "new_tokens", "peer_tokens"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    t0 = time.time()
    if a.gguf_dir is None and (a.profile or __import__("os").environ.get("SPECDEC_PROFILE")) is None:
        ap.error("say which models: --gguf-dir DIR, or --profile tiny|small (or SPECDEC_PROFILE)")
    models = load_models(a)
    t_load = time.time() - t0
    print(f"{models.provenance()}: loaded in {t_load:.0f} s")
    sets = prompt_sets(models.tokenizer, [s for s in a.prompts.split(",") if s], a.per_category, a.repeated)
    print("prompt sets: " + ", ".join(f"{k} ({len(v)})" for k, v in sets.items()))
    root = Path(a.out)
    written = []

    def save(out):
        written[:] = write_results(out, root, a.tag, file_prefix(models.provenance()["machine"],
                                                                      str(models.device)))

    out = live(models, methods, sets, a.new_tokens, a.peer_prompts, a.peer_tokens, oracle_prompts=a.oracle_prompts,
               deadline=t0 + a.budget_s, on_round=save, trace_labels=[x for x in a.trace.split(",") if x])
    print("\n" + live_table(out["summaries"]))
    run = out["run"]
    print(f"\nloading {t_load:.0f} s, setup {run['setup_s']:.0f} s, oracle {run['oracle_s']:.0f} s, rounds {run['rounds_done']}/"
          f"{run['rounds_planned']} in {sum(run['round_s']):.0f} s; {run['stopped'] or 'complete'}")
    for who, o in run["oracle_real"].items():
        print(f"oracle on real text ({who}): " + " ".join(
            f"g={g}: {v['decode_speedup']:.2f}x (tau {v['mean_accepted_len']:.2f}, same {v['same_tokens']:.0%})"
            for g, v in o["g"].items()))
    for label, err in run.get("errors", {}).items():
        print(f"ERROR ({label} dropped): {err.strip()}")
    if "peak_memory_bytes" in run:
        print(f"peak GPU memory: {run['peak_memory_bytes'] / 2**30:.1f} GiB")
    print("wrote " + ", ".join(str(p) for p in written))
    return out
