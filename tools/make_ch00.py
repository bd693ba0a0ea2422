"""Writes chapters/00_setup.ipynb (cells only; execute it to store outputs)."""
import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md("""# 0. Setup: one loop, one verifier

This chapter loads a model profile, generates text with the autoregressive baseline through the
course's one decode loop, looks at the per-step records every method produces, and draws the
first acceptance-and-throughput figure. Every later chapter only adds a *proposer*."""),
code("""import os
from specdec_lib.models import load_profile, profile_from_env, EOS_IDS
from specdec_lib.notebook import pick, results_dir, stored_results_dir

PROFILE = profile_from_env()          # SPECDEC_PROFILE: tiny | small | qwen7b
models = load_profile(PROFILE)
print(models.provenance())"""),
md("""## The loop
`specdec_lib.decoding.generate` is the whole algorithm. The target's KV cache holds every token
but the newest one (the *root*). Each step a proposer suggests a draft (a chain or a tree of
tokens), the target runs **one** forward over the root and the draft, the verifier keeps the
longest prefix the target agrees with plus one *bonus* token from the target itself, and the
cache keeps only the accepted rows:"""),
code("""import specdec_lib.decoding as decoding
print(decoding.__doc__)"""),
md("""The autoregressive baseline is the same loop with a proposer that proposes nothing, so each
step is an ordinary one-token decode step:"""),
code("""import inspect
from specdec_lib.methods import make_proposer, baseline
print(inspect.getsource(baseline.Baseline))"""),
md("""## Generating with the baseline
A Spec-Bench prompt, rendered with the Qwen2.5 chat template, greedy decoding:"""),
code("""from specdec_lib.data import load_prompt_set
from specdec_lib.decoding import generate

prompt = load_prompt_set("spec_bench:coding", models.tokenizer, limit=1)[0]
print(prompt.text[:300])
MAX_NEW = pick(PROFILE, tiny=24, small=48)
base = generate(models.target, make_proposer("baseline"), prompt.prompt_ids, MAX_NEW, eos_ids=EOS_IDS)
print("---")
print(models.tokenizer.decode(base.tokens))"""),
md("""Under the `tiny` profile the models are random, so the text is noise: that profile only checks
that everything runs. Each step leaves a record; the request record sums them:"""),
code("""print(f"{'step':>4} {'proposed':>8} {'accepted':>8} {'emitted':>7} {'verify ms':>9}")
for i, s in enumerate(base.steps[:6]):
    print(f"{i:>4} {s.proposed:>8} {s.accepted:>8} {s.emitted:>7} {s.verify_s * 1e3:>9.1f}")
r = base.record
print(f"\\n{r.new_tokens} tokens in {r.wall_s:.2f} s (prefill {r.prefill_s:.2f} s): "
      f"{r.tokens_per_s:.2f} tokens/s, tau = {r.mean_accepted_len:.2f}")"""),
md("""## The verifier on a case small enough to check by hand
A toy target that always predicts `x + 1`: after the root 5 it wants 6, 7, 8, ... A draft
`[6, 9, 10]` gets 6 accepted, 9 rejected, and the target's own choice 7 is emitted as the
bonus token, so one forward yields two tokens:"""),
code("""# NBVAL_CHECK_OUTPUT
import torch
from specdec_lib.tree import Draft
from specdec_lib.verify import verify
from specdec_lib.sampling import SamplingParams

V = 16
def toy_logits(rows):  # row i's argmax is rows[i] + 1
    return torch.nn.functional.one_hot((torch.tensor(rows) + 1) % V, V).float()

acc = verify(Draft.chain([6, 9, 10]), toy_logits([5, 6, 9, 10]), SamplingParams(0.0))
print("accepted", acc.tokens, "bonus", acc.bonus, "emitted", acc.emitted)"""),
md("""## Lossless by construction
An *oracle* proposer that already knows the baseline's output gets every draft accepted; a
*random* proposer gets almost none. Both must reproduce the baseline's greedy output token for
token, because only the target decides what is emitted:"""),
code("""# NBVAL_CHECK_OUTPUT
continuations = {tuple(prompt.prompt_ids): base.tokens}
for proposer in [make_proposer("oracle", models, continuations=continuations, draft_len=4),
                 make_proposer("random", models, draft_len=4)]:
    out = generate(models.target, proposer, prompt.prompt_ids, MAX_NEW, eos_ids=EOS_IDS)
    print(f"{proposer.name:<14} same tokens as the baseline: {out.tokens == base.tokens}")"""),
code("""for proposer in [make_proposer("oracle", models, continuations=continuations, draft_len=4),
                 make_proposer("random", models, draft_len=4)]:
    r = generate(models.target, proposer, prompt.prompt_ids, MAX_NEW, eos_ids=EOS_IDS).record
    print(f"{proposer.name:<14} acceptance {r.acceptance_rate:.2f}  tau {r.mean_accepted_len:.2f}  "
          f"steps {r.steps:>3}  speedup {r.tokens_per_s / base.record.tokens_per_s:.2f}x")"""),
md("""With the oracle, 4 drafted tokens plus the bonus come out of each forward, so there are five
times fewer steps; how much faster that is depends on what a 5-token forward costs compared with
a 1-token one (chapter 1). The random proposer pays for 5-token forwards and gains nothing.

## The first acceptance-and-throughput figure
`specdec_lib.bench.run_benchmark` runs a method and the baseline on the same prompts in the same
process and returns summaries; every chapter stores them as JSON and plots from those files. Here:
random drafts of length 1, 2 and 4 against the baseline, the worst case a proposer can be."""),
code("""from specdec_lib.bench import run_benchmark
from specdec_lib.metrics import write_json, load_summaries

CHAPTER = "00_setup"
prompts = load_prompt_set("spec_bench:coding", models.tokenizer, limit=pick(PROFILE, tiny=1, small=2))
summaries = []
for g in (1, 2, 4):
    res = run_benchmark(models, "random", "spec_bench:coding", prompts, MAX_NEW, options={"draft_len": g})
    summaries += res["summaries"][1:] if summaries else res["summaries"]
for s in summaries:
    if s["method"] == "baseline":
        s["draft_len"] = 0   # plot the baseline at g = 0
write_json(results_dir(CHAPTER) / "random_vs_baseline.json", summaries)
for s in summaries:
    print(f"{s['method']:<9} g={s['draft_len']}  acceptance {s['acceptance_rate']:.2f}  "
          f"tokens/s {s['tokens_per_s']:.2f}  speedup {s['speedup']:.2f}")"""),
code("""from specdec_lib.plots import plot_sweep, explore
stored = load_summaries(stored_results_dir(CHAPTER)) or summaries
for s in stored:
    s["method"] = "random drafts" if s["method"] == "random" else s["method"]
plot_sweep(stored, x="draft_len", group=("method",), title="random drafts: nothing accepted, every step costlier");"""),
md("""Acceptance is zero and every step feeds more tokens, so throughput can only fall below the
baseline's. Speculation pays only when proposals are accepted *and* a k-token forward costs little
more than a 1-token one. Chapter 1 measures that cost; the following chapters build proposers that
get accepted.

In JupyterLab or Colab the same figure can be explored interactively:"""),
code("""explore(stored, sweeps=("draft_len",));"""),
]
nb = nbf.v4.new_notebook(cells=cells)
nbf.write(nb, "chapters/00_setup.ipynb")
