"""The benchmark runner and the cost model on exact, tiny cases (no timing is asserted)."""
import pytest

from specdec_lib import experiments
from specdec_lib.experiments import run_benchmark
from specdec_lib.costmodel import expected_tokens_per_step, predicted_speedup, relative_cost, replay_speedup
from specdec_lib.data import load_prompt_set
from specdec_lib.metrics import check_summary
from specdec_lib.models import load_profile


@pytest.fixture(scope="module")
def tiny_models():
    return load_profile("tiny")


def test_run_benchmark_oracle_on_tiny(tiny_models):
    prompts = load_prompt_set("spec_bench:qa", tiny_models.tokenizer, limit=2)
    res = run_benchmark(tiny_models, "oracle", "spec_bench:qa", prompts, max_new_tokens=8,
                        options={"draft_len": 3}, progress=False)
    base, oracle = res["summaries"]
    for s in (base, oracle):
        check_summary(s)
        assert s["profile"] == "tiny" and s["category"] == "qa" and s["n_prompts"] == 2
    assert oracle["acceptance_rate"] == 1.0 and oracle["greedy_match_rate"] == 1.0
    assert base["mean_accepted_len"] == 1.0 and len(res["records"]) == 4


def test_transformers_generate_matches_our_baseline(tiny_models):
    prompts = load_prompt_set("spec_bench:rag", tiny_models.tokenizer, limit=1)
    res = run_benchmark(tiny_models, "baseline", "spec_bench:rag", prompts, max_new_tokens=6,
                        transformers_generate=True, progress=False)
    assert res["summaries"][0]["transformers_match_rate"] == 1.0


def test_cost_model_exact_values():
    curve = {"k": [1, 2, 4, 8], "relative_time": [1.0, 1.1, 1.2, 2.0]}
    assert expected_tokens_per_step(0.8, 4) == pytest.approx(3.3616)
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert relative_cost(curve, 3) == pytest.approx(1.15)
    assert relative_cost(curve, 16) == pytest.approx(3.6)     # extrapolated from the last two points
    assert predicted_speedup(1.0, 3, curve) == pytest.approx(4 / 1.2)
    assert predicted_speedup(0.0, 1, curve, draft_cost=0.5) == pytest.approx(1 / 1.6)
    # two steps: 4 tokens fed (3 emitted), then 1 token fed (1 emitted): 4 tokens for 1.2 + 1.0
    assert replay_speedup([(4, 3), (1, 1)], curve) == pytest.approx(4 / 2.2)


def test_sampled_runs_time_transformers_sampling_too(tiny_models):
    prompts = load_prompt_set("spec_bench:rag", tiny_models.tokenizer, limit=1)
    res = run_benchmark(tiny_models, "baseline", "spec_bench:rag", prompts, max_new_tokens=4, temperature=0.8,
                        transformers_generate=True, progress=False)
    base = res["summaries"][0]
    assert base["transformers_sampling"] is True and base["transformers_tokens_per_s"] > 0
    assert "transformers_match_rate" not in base          # sampled outputs are not compared token by token


def test_sweep_and_workload_share_one_harness(tiny_models):
    """experiments.sweep (one baseline, several g) and run_workload (a learning proposer over a request
    sequence): summaries against the same run's baseline, outputs equal to it in float32."""
    from specdec_lib.experiments import replay_summary, run_workload, sweep
    from specdec_lib.methods import make_proposer
    prompts = load_prompt_set("spec_bench:qa", tiny_models.tokenizer, limit=1)
    res = sweep(tiny_models, {"spec_bench:qa": prompts}, (1, 2), max_new_tokens=4, progress=False)
    assert [(s["method"], s["draft_len"]) for s in res["summaries"]] == \
        [("baseline", None), ("draft_model", 1), ("draft_model", 2)]
    assert all(s["greedy_match_rate"] == 1.0 for s in res["summaries"][1:]) and len(res["records"]) == 3
    work = run_workload(tiny_models, {"suffix": make_proposer("suffix")}, prompts * 2, 6, "spec_bench:qa", "qa",
                        progress=False)
    assert [s["method"] for s in work["summaries"]] == ["baseline", "suffix"]
    assert work["summaries"][1]["greedy_match_rate"] == 1.0 and len(work["per_request"]) == 2
    # the second request repeats the first: its output is in the suffix cache, so it is replayed exactly
    rep = replay_summary(make_proposer("suffix"), prompts * 2, work["outputs"], {"k": [1, 2], "relative_time": [1, 1]})
    assert rep["n_prompts"] == 2 and rep["new_tokens"] == 12 and rep["acceptance_rate"] > 0


def test_compare_repeats_keep_the_fastest_run_of_the_same_tokens(tiny_models):
    from specdec_lib import data
    from specdec_lib.methods import make_proposer
    prompts = data.spec_bench(tiny_models.tokenizer, "qa", limit=2)
    arms = [experiments.Arm("ngram", experiments.fixed(make_proposer("ngram", tiny_models)))]
    once = experiments.compare(tiny_models, arms, prompts, 8, progress=False)
    thrice = experiments.compare(tiny_models, arms, prompts, 8, progress=False, repeats=3)
    for label in ("baseline", "ngram"):
        assert [o.tokens for o in once[label]] == [o.tokens for o in thrice[label]]
    with pytest.raises(ValueError, match="repeats"):
        experiments.compare(tiny_models, arms, prompts, 8, progress=False, repeats=0)
