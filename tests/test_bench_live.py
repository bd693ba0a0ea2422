"""`bench_gpu live` on the CPU (tiny models, float32): the GPU command's code path with eager forwards
in the runner's padded buckets. Every method's output equals our baseline's, and the files follow the schema."""
import pytest
import torch

from specdec_lib.bench_live import file_prefix, live, parse_methods, repeated_workload, write_results
from specdec_lib.cuda_graphs import GraphRunner
from specdec_lib.decoding import generate
from specdec_lib.methods import make_proposer
from specdec_lib.metrics import check_summary, read_json
from specdec_lib.models import load_profile


def test_parse_methods():
    assert parse_methods("ngram:max_n=3:draft_len=4,suffix") == [
        ("ngram:max_n=3:draft_len=4", "ngram", {"max_n": 3, "draft_len": 4}), ("suffix", "suffix", {})]
    with pytest.raises(ValueError, match="key=value"):
        parse_methods("ngram:3")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("ngram,ngram")


def test_runner_cpu_mode_buckets_and_padding(tiny_target):
    """GraphRunner on a CPU runs each step padded to its bucket from the static buffers: a noisy tree
    oracle through it gives the eager baseline's tokens (float32)."""
    prompt = list(range(1000, 1040))
    ref = generate(tiny_target, make_proposer("baseline"), prompt, 24).tokens
    runner = GraphRunner(tiny_target, 128, hidden_layers=(1, -1)).capture()
    run = dict(forward=runner, kv_len=128, cache=runner.cache)
    tree = make_proposer("oracle", continuations={tuple(prompt): ref}, draft_len=5, error_rate=0.3, branches=3, seed=1)
    assert generate(tiny_target, tree, prompt, 24, **run).tokens == ref
    assert generate(tiny_target, make_proposer("baseline"), prompt, 24, **run).tokens == ref
    # a subset of the runner's hidden layers comes back, equal to the eager forward's
    from specdec_lib.tree import chain_inputs
    runner.cache.rollback(0)
    pos, slots, mask = chain_inputs(0, 3, 128)
    ids = torch.tensor([[5, 6, 7]])
    _, h = runner(ids, pos, runner.cache, mask, slots, (-1,))
    cache = tiny_target.new_cache(128)
    _, want = tiny_target(ids, pos, cache, mask, slots, (-1,))
    assert set(h) == {-1}
    torch.testing.assert_close(h[-1], want[-1])


def test_live_tiny(tmp_path):
    models = load_profile("tiny", "cpu", torch.float32)
    sets = {"agentic:dataclass": repeated_workload(models.tokenizer, 2)}
    methods = parse_methods("draft_model:draft_len=3,ngram,suffix:cache_size=0,suffix,oracle:draft_len=4")
    out = live(models, methods, sets, new_tokens=10, peer_prompts=1, peer_tokens=4, oracle_prompts=1,
               buckets=(1, 2, 4, 8), progress=False)
    rows = {s["method"]: s for s in out["summaries"]}
    assert set(rows) >= {"baseline", "baseline_device_loop", "transformers_generate", "transformers_assisted",
                         "transformers_prompt_lookup", *(m[0] for m in methods)}
    for label, *_ in methods:
        assert rows[label]["greedy_match_rate"] == 1.0, label          # float32: lossless
        assert rows[label]["n_prompts"] == 2 and rows[label]["predicted_speedup"] > 0
        assert rows[label]["proposer_ms_first_step"] >= 0 and rows[label]["proposer_ms_later_steps"] >= 0
    assert rows["baseline_device_loop"]["greedy_match_rate"] == 1.0
    assert rows["transformers_generate"]["greedy_match_rate"] == 1.0
    assert rows["oracle:draft_len=4"]["acceptance_rate"] == 1.0
    assert out["run"]["rounds_done"] == 2 and set(out["run"]["oracle_real"]) == {"target", "draft_as_target"}
    paths = write_results(out, tmp_path)
    assert {p.parent.name for p in paths} == {"01_cost", "02_draft_model", "03_ngram", "04_suffix"}
    for s in read_json(tmp_path / "04_suffix" / "h200_live.json"):
        check_summary(s)
        assert s.get("chapter", "04_suffix") == "04_suffix"


def test_runner_picks_the_fastest_bucket_that_holds_the_step(tiny_target):
    """A larger bucket serves a step when its graph replayed faster (replay times set by hand: a CPU
    captures none), unless the cache has no room for it; without replay times, the smallest that holds it."""
    runner = GraphRunner(tiny_target, 64, buckets=(1, 2, 4, 8)).capture()
    assert [runner.bucket(T) for T in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, None]
    runner.replay_s = {1: 1.0, 2: 1.3, 4: 1.4, 8: 1.25}
    assert [runner.bucket(T) for T in (1, 2, 3, 4, 5)] == [1, 8, 8, 8, 8]
    assert runner.bucket(3, room=7) == 4 and runner.bucket(3, room=2) is None


def test_catchup_buckets_serve_only_the_steps_no_bucket_holds(tiny_target):
    """A prompt fed at once runs padded in the smallest catch-up bucket that holds it (cache room
    permitting) and fills the cache as the eager forward does; a prefill that asks for no logits gets
    None from the runner too."""
    from specdec_lib.decoding import prefill
    runner = GraphRunner(tiny_target, 256, buckets=(1, 2, 4), catchup=(16, 64)).capture()
    assert [runner.bucket(T) for T in (3, 5, 40, 65)] == [4, 16, 64, None]
    assert runner.bucket(40, room=50) is None and runner.all_buckets == (1, 2, 4, 16, 64)
    ids = torch.arange(100, 110)[None]
    logits, _ = prefill(tiny_target, ids, runner.cache, kv_len=256, forward=runner, logits=False)
    cache = tiny_target.new_cache(256)
    prefill(tiny_target, ids, cache, logits=False)
    assert logits is None and runner.cache.length == 10
    torch.testing.assert_close(runner.cache.k[..., :10, :], cache.k[..., :10, :])
    torch.testing.assert_close(runner.cache.v[..., :10, :], cache.v[..., :10, :])


def test_result_files_name_the_card():
    assert file_prefix("NVIDIA H200") == "h200_live" and file_prefix("NVIDIA H100 80GB HBM3") == "h100_live"
    assert file_prefix("NVIDIA A100-SXM4-80GB") == "gpu_live"
    assert file_prefix("AMD EPYC 7B13", "cpu") == "cpu_live_run"


def test_fast_forward_on_cpu_is_the_plain_path(tiny_target):
    from specdec_lib.cuda_graphs import fast_forward
    forward, cache, kv_len = fast_forward(tiny_target, 64)
    assert kv_len is None and cache.max_len == 64
    prompt = list(range(10, 20))
    ref = generate(tiny_target, make_proposer("baseline"), prompt, 8).tokens
    assert generate(tiny_target, make_proposer("baseline"), prompt, 8, forward=forward, cache=cache,
                    kv_len=kv_len).tokens == ref


def test_live_backoff_on_this_runs_curve():
    """cost_curve=runner: n-gram and suffix back off on the curve measured in the same run (built after the
    target's graphs), and stay lossless."""
    models = load_profile("tiny", "cpu", torch.float32)
    sets = {"agentic:dataclass": repeated_workload(models.tokenizer, 2)}
    methods = parse_methods("ngram:draft_len=4:cost_curve=runner,suffix:cost_curve=runner")
    out = live(models, methods, sets, new_tokens=10, peer_prompts=0, oracle_prompts=0, buckets=(1, 2, 4, 8),
               progress=False, trace_labels=["baseline", "ngram:draft_len=4:cost_curve=runner", "absent"])
    rows = {s["method"]: s for s in out["summaries"]}
    for label, *_ in methods:
        assert rows[label]["greedy_match_rate"] == 1.0 and rows[label]["n_prompts"] == 2, label
    assert not out["run"].get("errors")
    # --trace: one profiled request per named method (min(64, new_tokens) tokens; no GPU here, so no busy time)
    traces = out["run"]["traces"]
    assert set(traces) == {"baseline", "ngram:draft_len=4:cost_curve=runner"}
    assert traces["baseline"]["steps"] == 10 and traces["baseline"]["gpu_busy_s"] is None
    assert "aten::" in traces["baseline"]["host_ops"]


def test_busy_time_counts_overlaps_once():
    from specdec_lib.timing import busy_time
    assert busy_time([]) == 0
    assert busy_time([(5, 6), (0, 2), (1, 3)]) == 4          # [0, 3] and [5, 6]
    assert busy_time([(0, 10), (2, 3), (4, 5)]) == 10        # nested intervals


def test_decode_pooled_hand_made():
    """Two prompts; the baseline takes 1 ms per token, the method 4 steps of 1 ms for 8 tokens each."""
    from specdec_lib.bench_live import decode_pooled
    run = {"curves": {"target": {"time_s": [0.001]}}}
    base = [dict(method="baseline", prompt_set=s, propose_s=0.0, verify_s=0.008, steps=8, new_tokens=8)
            for s in ("a", "b")]
    meth = [dict(method="m", prompt_set=s, propose_s=0.002, verify_s=0.002, steps=4, new_tokens=8,
                 predicted_speedup=1.0) for s in ("a", "b")]
    d = decode_pooled(base + meth, run, ["a", "b"], "m")
    assert d["measured"] == pytest.approx(2.0) and d["tau"] == pytest.approx(2.0)
    assert d["base_step"] == pytest.approx(1.0)
    # predicted 1.0 -> cost 8 t(1) per prompt: proposer 0.5 t(1) per step, c = 1.5, eff = 2 / 1
    assert d["predicted"] == pytest.approx(1.0) and d["proposer"] == pytest.approx(0.5)
    assert d["c"] == pytest.approx(1.5) and d["eff"] == pytest.approx(2.0)
    assert "predicted" not in decode_pooled(base + [dict(meth[0], predicted_speedup=None)], run, ["a"], "m")
    with pytest.raises(ValueError, match="no rows"):
        decode_pooled(base, run, ["a"], "m")


def test_cost_curve_through_a_runner(tiny_target):
    """measure_cost_curve(run=) times the forward the chapters' loop runs: every k-token step goes
    through the runner's bucket (on a CPU its padded eager forward), on the runner's own cache
    prefilled to the prefix; run={} (fast_path on a CPU) is the eager curve as before."""
    from specdec_lib.costmodel import measure_cost_curve
    runner = GraphRunner(tiny_target, 48, buckets=(1, 2, 4)).capture()
    run = dict(forward=runner, cache=runner.cache, kv_len=48)
    seen, step = [], runner._forward
    runner._forward = lambda b, variant: seen.append(b) or step(b, variant)
    c = measure_cost_curve(tiny_target, ks=(1, 2, 4), prefix_len=16, repeats=2, progress=False, run=run)
    assert seen == [1] * 3 + [2] * 3 + [4] * 3          # a warm-up and 2 timed steps per k, none eager
    assert runner.cache.length == 16 and c["forward"] == "GraphRunner" and c["k"] == [1, 2, 4]
    assert c["relative_time"][0] == 1.0 and all(t > 0 for t in c["time_s"])
    eager = measure_cost_curve(tiny_target, ks=(1, 2), prefix_len=16, repeats=1, progress=False, run={})
    assert set(eager) == {"k", "time_s", "relative_time", "prefix_len"}
    with pytest.raises(ValueError, match="larger max_len"):         # 16 + 64 slots > 48
        measure_cost_curve(tiny_target, ks=(1, 64), prefix_len=16, repeats=1, progress=False, run=run)


def test_prefill_time_fills_a_fresh_cache(tiny_target, monkeypatch):
    """measure_prefill_time: each repeat one prefill of n tokens into a cache of its own (a draft
    model's catch-up); no timing is asserted."""
    from specdec_lib import costmodel, decoding
    seen, real = [], decoding.prefill
    monkeypatch.setattr(decoding, "prefill", lambda m, ids, cache, **kw: seen.append(
        (ids.shape[1], cache.length, cache.max_len)) or real(m, ids, cache, **kw))
    assert costmodel.measure_prefill_time(tiny_target, 20, repeats=2) > 0
    assert seen == [(20, 0, 20)] * 2


def test_harness_through_a_runner_equals_the_plain_path():
    """experiments.compare with run= (a GraphRunner's forward, cache and static width; on a CPU it
    runs the padded buckets eagerly) gives the plain path's tokens for every arm (float32)."""
    from specdec_lib.data import Prompt
    from specdec_lib.experiments import compare, fast_path, method_arm
    models = load_profile("tiny")
    assert fast_path(models, 256) == {}                       # a CPU: the plain forward
    assert fast_path(models, 256, model=models.draft) == {}   # the draft too
    prompts = [Prompt("a", "toy", list(range(1000, 1030))), Prompt("b", "toy", [7, 8, 9] * 8)]
    arms = [method_arm(models, "ngram", dict(draft_len=3)), method_arm(models, "oracle", dict(draft_len=4))]
    runner = GraphRunner(models.target, 128).capture()
    fast = compare(models, arms, prompts, 20, progress=False,
                   run=dict(forward=runner, cache=runner.cache, kv_len=128))
    assert runner.cache.length > 0                            # the runner's cache did the work
    plain = compare(models, arms, prompts, 20, progress=False)
    for label in plain:
        assert [o.tokens for o in fast[label]] == [o.tokens for o in plain[label]], label
    assert all(s.accepted > 0 for o in fast["oracle"] for s in o.steps[:-1])


def test_fast_model_drafters_keep_greedy_output():
    """experiments.fast_model: a CPU keeps the model itself; forced through its GraphRunner (the CPU mode
    of a GPU's graphs, catch-up buckets for the prompt), the draft model and PARD's drafter propose what
    the plain models do, so greedy output equals the baseline's (float32)."""
    from specdec_lib.experiments import fast_model
    from specdec_lib.methods.pard import build as pard_build, load_drafter
    models = load_profile("tiny", "cpu", torch.float32)
    assert fast_model(models.draft, 256) is models.draft
    prompt = list(range(1000, 1100))
    ref = generate(models.target, make_proposer("baseline"), prompt, 20).tokens
    dm = make_proposer("draft_model", models, draft=fast_model(models.draft, 200, graphs=True), draft_len=3)
    assert dm.target_vocab == models.target.config.vocab_size
    out = generate(models.target, dm, prompt, 20)
    assert out.tokens == ref
    merged, masks, _ = load_drafter(models)
    pard = pard_build(models, drafter=(fast_model(merged, 200, graphs=True), masks), draft_len=4)
    assert generate(models.target, pard, prompt, 20).tokens == ref


def test_routed_and_catchup_buckets_keep_greedy_output(tiny_target):
    """float32: with 3- and 4-row steps routed to the 8-row bucket (replay times set by hand) and the
    prompt fed to the draft model and to a PARD drafter through a catch-up bucket, both give the eager
    baseline's tokens."""
    from specdec_lib.cuda_graphs import GraphDraft
    from specdec_lib.models import load_profile
    from specdec_lib.methods.pard import load_drafter
    models = load_profile("tiny", "cpu", torch.float32)
    target = models.target
    prompt = list(range(1000, 1100))
    ref = generate(target, make_proposer("baseline"), prompt, 20).tokens
    runner = GraphRunner(target, 256, buckets=(1, 2, 4, 8)).capture()
    runner.replay_s = {1: 1.0, 2: 1.2, 4: 1.5, 8: 1.3}
    run = dict(forward=runner, kv_len=256, cache=runner.cache)
    draft_runner = GraphRunner(models.draft, 300, buckets=(1, 2, 4, 8), catchup=(128,)).capture()
    dm = make_proposer("draft_model", draft=GraphDraft(draft_runner), draft_len=3,
                       target_vocab=target.config.vocab_size)
    assert generate(target, dm, prompt, 20, **run).tokens == ref
    merged, mask_ids, _ = load_drafter(models)
    pard_runner = GraphRunner(merged, 300, buckets=(1, 2, 4, 8), catchup=(128,)).capture()
    pard = make_proposer("pard", models, drafter=(GraphDraft(pard_runner), mask_ids), draft_len=4)
    assert generate(target, pard, prompt, 20, **run).tokens == ref
    assert runner.bucket(3) == 8 and draft_runner.bucket(99) == 128


@pytest.mark.parametrize("method,options", [("medusa", {"draft_len": 7}),
                                            ("eagle3", {"total_tokens": 7, "depth": 3})])
def test_target_prefill_in_a_catchup_bucket_keeps_greedy_output(method, options):
    """float32: the target's prefill replayed in a catch-up bucket (as the live bench runs it) gives a
    learned proposer the prompt's hidden states it reads, and the output stays the eager baseline's."""
    from specdec_lib.models import load_profile
    models = load_profile("tiny", "cpu", torch.float32)
    target = models.target
    prompt = list(range(1000, 1100))
    ref = generate(target, make_proposer("baseline"), prompt, 20).tokens
    prop = make_proposer(method, models, **options)
    runner = GraphRunner(target, 256, buckets=(1, 2, 4, 8), hidden_layers=prop.hidden_layers,
                         catchup=(128, 512)).capture()
    assert runner.catchup == (128,) and runner.bucket(len(prompt) - 1) == 128   # 512 > the cache
    eager = generate(target, make_proposer(method, models, **options), prompt, 20)
    out = generate(target, prop, prompt, 20, forward=runner, kv_len=256, cache=runner.cache)
    assert out.tokens == ref == eager.tokens
    assert [s.accepted for s in out.steps] == [s.accepted for s in eager.steps]


def test_sampling_through_the_runners_equals_the_plain_path():
    """T = 1: the target through a GraphRunner and the draft model through a GraphDraft (both in their
    CPU mode, float32, padded buckets) sample the same tokens as the plain models with the same seeds:
    the fast path changes where the logits are computed, not which token the verifier draws."""
    from specdec_lib.data import Prompt
    from specdec_lib.experiments import Arm, compare, fast_model, fixed
    models = load_profile("tiny", "cpu", torch.float32)
    prompts = [Prompt("a", "toy", list(range(1000, 1030))), Prompt("b", "toy", [7, 8, 9] * 8)]

    def arms(draft):
        return [Arm("draft_model", fixed(make_proposer("draft_model", models, draft=draft, draft_len=3)),
                    {"draft_len": 3}), Arm("ngram", fixed(make_proposer("ngram", draft_len=3)), {"draft_len": 3})]

    runner = GraphRunner(models.target, 128).capture()
    fast = compare(models, arms(fast_model(models.draft, 100, graphs=True)), prompts, 16, temperature=1.0,
                   seed=5, progress=False, run=dict(forward=runner, cache=runner.cache, kv_len=128))
    plain = compare(models, arms(models.draft), prompts, 16, temperature=1.0, seed=5, progress=False)
    for label in plain:
        assert [o.tokens for o in fast[label]] == [o.tokens for o in plain[label]], label
