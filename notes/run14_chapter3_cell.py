# Draft of chapter 3's cell for run 14 (tools/lease/methods_14.txt), written in session o and checked against a
# tiny dry run of D.sh; splice it after cell 40 once chapters/results/*/h*_live_14.json exist (pool _14b too).
# the same rule on a GPU, per prompt set: stored from one `bench_gpu live` run (run 14,
# tools/lease/methods_14.txt): every method as built and with backoff=measured, same prompts
RUN14 = {}
for ch in ("03_ngram", "04_suffix", "02_draft_model", "07_pard", "05_medusa", "06_eagle3"):
    for f in sorted(stored_results_dir(ch).glob("h*_live_14.json")):
        RUN14.update({(r["prompt_set"], r["method"]): r for r in metrics.read_json(f)})
g0 = RUN14[next(iter(RUN14))]
print(f"{g0['machine']} · {g0['model']} + {g0['draft_model']} · {g0['dtype']} · "
      f"profile {g0['profile']}; {g0['max_new_tokens']} new tokens, greedy; "
      f"prompts per set: {min(r['n_prompts'] for r in RUN14.values())}"
      f"-{max(r['n_prompts'] for r in RUN14.values())}")
G_SETS = list(dict.fromkeys(s for s, _ in RUN14))
G_BO = [m for m in dict.fromkeys(m for _, m in RUN14) if m.endswith(":backoff=measured")]
print(f"{'speedup':<22}" + "".join(f"{s.split(':')[-1][:9]:>10}" for s in G_SETS)
      + f"{'worst':>8}")
g_worst, g_below = {}, {}
for bo in G_BO:
    built = bo.removesuffix(":backoff=measured")
    for label, tag in ((built, "as built"), (bo, "back-off")):
        v = [RUN14[s, label]["speedup"] for s in G_SETS if (s, label) in RUN14]
        g_worst[label], g_below[label] = min(v), sum(x < 1.0 for x in v)
        name = f"{RUN14[G_SETS[0], label]['method_name']} {tag}"
        print(f"{name:<22}" + "".join(f"{x:>9.2f}x" for x in v) + f"{min(v):>7.2f}x")
print(f"\n{'steps that drafted':<22}" + "".join(f"{s.split(':')[-1][:9]:>10}" for s in G_SETS))
for bo in G_BO:
    share = [RUN14[s, bo]["drafted_share"] for s in G_SETS if (s, bo) in RUN14]
    print(f"{RUN14[G_SETS[0], bo]['method_name'] + ' back-off':<22}"
          + "".join(f"{x:>10.0%}" for x in share))
built_labels = [bo.removesuffix(":backoff=measured") for bo in G_BO]
glue("ch3_g14_machine", g0["machine"])
glue("ch3_g14_built_worst", f"{min(g_worst[m] for m in built_labels):.2f}")
glue("ch3_g14_bo_worst", f"{min(g_worst[m] for m in G_BO):.2f}")
glue("ch3_g14_built_below", sum(g_below[m] for m in built_labels))
glue("ch3_g14_bo_below", sum(g_below[m] for m in G_BO))
glue("ch3_g14_cells", len(G_BO) * len(G_SETS));
