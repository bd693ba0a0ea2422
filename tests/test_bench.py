"""The benchmark runner and the cost model on exact, tiny cases (no timing is asserted)."""
import pytest

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
