"""Which draft tree should PARD propose? Exact greedy replay on the target's own held-out answers.

Under greedy verification a node is accepted iff its path spells the target's next greedy tokens
(specdec_lib.replay). The target's greedy answers to held-out prompts are stored in the self-distilled
data, so PARD's tau for any tree shape follows from the drafter alone: no target forward. And PARD's
proposal at a position depends only on the text before it, so ONE forward of the drafter over an answer
in the full training layout (every anchor, every depth: pard.parallel_layout) gives the k rows it would
compute at every step (tests/test_pard.py checks that training rows equal inference rows). Each
tree shape is then a cheap replay over those stored rows.

    SPECDEC_PROFILE=small python tools/pard_tree_replay.py [--answers 24] [--tokens 128]
    SPECDEC_PROFILE=small python tools/pard_tree_replay.py --spec-bench 4     # 4 prompts per category

Writes chapters/results/07_pard/tree_replay.json (one row per shape: k, nodes, width, tau) and prints a
table. With --spec-bench N the answers are the target's own greedy answers to the first N Spec-Bench
prompts of each category, generated here first (our baseline loop, so ~10 min on the course CPU
for 24 x 128 tokens), and the rows go to tree_replay_spec_bench.json: the prompts the live runs
measure, where the held-out answers of the self-distilled data are the drafter's own training
distribution. Replayed tau is not live tau (other prompts; bf16 near-ties make the live target leave its
stored answer), but shapes compare fairly: same answers, same drafter rows.
"""
import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root
from specdec_lib import metrics  # noqa: E402
from specdec_lib.data import SPEC_BENCH_TASKS, load_prompt_set  # noqa: E402
from specdec_lib.decoding import generate  # noqa: E402
from specdec_lib.methods import make_proposer  # noqa: E402
from specdec_lib.methods import pard  # noqa: E402
from specdec_lib.models import EOS_IDS, load_profile, profile_from_env  # noqa: E402
from specdec_lib.notebook import provenance, results_dir  # noqa: E402
from specdec_lib.replay import replay_greedy  # noqa: E402
from specdec_lib.selfdistill import load_data  # noqa: E402
from specdec_lib.tree import Draft  # noqa: E402

WIDTH = 8      # tokens kept per (position, depth): the widest tree shape below


@torch.inference_mode()
def drafter_rows(draft, adapter, prompt: list[int], answer: list[int], K: int):
    """PARD's top-WIDTH tokens and probabilities at every step of a replay of `answer`.

    draft: the merged drafter (pard.merged_model); adapter: for its mask ids.
    -> probs, ids [n, K, WIDTH]: row i = the proposal after prompt + answer[:i] (its anchor is the
    last token of that context), depth d = 1..K (depths past the end of the text are left zero)."""
    ids = prompt + answer
    T, first = len(ids), len(prompt) - 1                   # anchor of the first step: the prompt's last
    anchors = [[j for j in range(first, T - d)] for d in range(2, K + 1)]
    lay = pard.parallel_layout(T, anchors)
    h = pard.layout_forward(draft, adapter, torch.tensor([ids]), lay)[0]      # [R, H]
    n = len(answer)
    probs = torch.zeros(n, K, WIDTH)
    top_ids = torch.zeros(n, K, WIDTH, dtype=torch.long)
    rows = torch.arange(lay.anchor.numel())
    for d in range(1, K + 1):
        sel = rows[(lay.depth == d) & (lay.anchor >= first)]
        if d == 1:
            sel = sel[:n]                                  # real rows first .. first + n - 1
        logits = draft.lm_head(h[sel])[:, :pard.MASK_ID0].float()
        top = logits.softmax(-1).topk(WIDTH, dim=-1)
        i = lay.anchor[sel] - first
        probs[i, d - 1], top_ids[i, d - 1] = top.values, top.indices
    return probs, top_ids


def spec_bench_answers(models, per_category: int, tokens: int) -> list[tuple[list[int], list[int]]]:
    """The target's greedy answers (our baseline loop, the profile's dtype) to the first
    `per_category` prompts of each Spec-Bench category: [(prompt ids, answer ids)]."""
    from tqdm.auto import tqdm
    prompts = [p for c in SPEC_BENCH_TASKS
               for p in load_prompt_set(f"spec_bench:{c}", models.tokenizer, per_category)]
    out = []
    for p in tqdm(prompts, desc="target's greedy answers"):
        ans = generate(models.target, make_proposer("baseline"), p.prompt_ids, tokens,
                       eos_ids=EOS_IDS).tokens
        if len(ans) >= 2:                                  # an answer of one token replays nothing
            out.append((p.prompt_ids, ans))
    return out


class Replayed:
    """A proposer that reads PARD's stored rows: a chain (nodes None) or the tree that
    pard.ParallelDraft.tree builds from the same rows (pard.tree_from_top)."""
    hidden_layers = ()

    def __init__(self, probs, ids, prompt_len: int, k: int, nodes: int | None, width: int):
        self.probs, self.ids, self.prompt_len = probs, ids, prompt_len
        self.k, self.nodes, self.width = k, nodes, width

    def reset(self, prompt_ids):
        pass

    def propose(self, ctx):
        i = len(ctx.tokens) - self.prompt_len
        k = min(self.k, ctx.max_draft)
        if k < 1:
            return Draft.empty()
        p, t = self.probs[i, :k, :self.width], self.ids[i, :k, :self.width]
        if self.nodes is None:
            return Draft.chain(t[:, 0])
        return pard.tree_from_top(p, t, min(self.nodes, ctx.max_draft))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", type=int, default=24, help="held-out greedy answers replayed")
    ap.add_argument("--tokens", type=int, default=128, help="tokens of each answer")
    ap.add_argument("--spec-bench", type=int, default=0, metavar="N",
                    help="replay the target's greedy answers to N Spec-Bench prompts per category, "
                         "generated here, instead of the held-out answers")
    a = ap.parse_args()
    models = load_profile(profile_from_env())
    adapter, header = pard.load_adapter(models)
    merged = pard.merged_model(models.draft, adapter)     # the drafter as it proposes (adapter folded in)
    K = adapter.max_depth
    if a.spec_bench:
        answers, source = spec_bench_answers(models, a.spec_bench, a.tokens), "Spec-Bench"
    else:
        data = load_data(models).only([0.0])
        answers = [(s.prompt_ids, s.response_ids[:a.tokens]) for s in data.split("heldout")
                   if len(s.response_ids) >= 16][:a.answers]
        source = "held-out"
    t0 = time.time()
    stored = [(prompt, ans, *drafter_rows(merged, adapter, prompt, ans, K)) for prompt, ans in answers]
    print(f"{len(answers)} {source} greedy answers x <= {a.tokens} tokens; drafter rows in "
          f"{time.time() - t0:.0f} s ({models.provenance()['machine']})")
    shapes = [(k, None, 1) for k in (2, 3, 4, 5, 6, 8)]
    shapes += [(k, n, w) for n in (3, 5, 7, 11, 15) for k in (2, 3, 4, 5, 6, 8) for w in (2, 4, 8)
               if n > k or w > 1]
    rows = []
    for k, n, w in shapes:
        steps = []
        for prompt, ans, probs, ids in stored:
            steps += replay_greedy(Replayed(probs, ids, len(prompt), k, n, w), prompt, ans, EOS_IDS)
        proposed, accepted, emitted = (sum(s[i] for s in steps) for i in range(3))
        rows.append(dict(method="pard", draft_len=k, tree_nodes=n, tree_width=w, steps=len(steps),
                         new_tokens=emitted, mean_accepted_len=emitted / len(steps),
                         acceptance_rate=accepted / max(proposed, 1), n_prompts=len(answers),
                         max_new_tokens=a.tokens, target=f"the target's {source} greedy answers (replay)",
                         checkpoint_steps=header.get("steps")))
    print(f"{'k':>3}{'nodes':>7}{'width':>7}{'verify rows':>13}{'tau':>7}")
    for r in sorted(rows, key=lambda r: (r["tree_nodes"] or r["draft_len"], -r["mean_accepted_len"])):
        n = r["tree_nodes"] or r["draft_len"]
        print(f"{r['draft_len']:>3}{str(r['tree_nodes'] or '-'):>7}{r['tree_width']:>7}{n + 1:>13}"
              f"{r['mean_accepted_len']:>7.3f}")
    prov = provenance(models)
    name = "tree_replay_spec_bench.json" if a.spec_bench else "tree_replay.json"
    out = results_dir("07_pard") / name                    # a temporary folder under tiny
    metrics.write_json(out, [dict(r, **prov) for r in rows])
    print("wrote", out)


if __name__ == "__main__":
    main()
