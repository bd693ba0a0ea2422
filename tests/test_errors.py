"""Bad input gets a clear error, never a silent wrong answer."""
import pytest
import torch

from specdec_lib.decoding import generate
from specdec_lib.methods import make_proposer
from specdec_lib.models import load_profile, profile_from_env
from specdec_lib.sampling import SamplingParams


def test_empty_prompt(tiny_target):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny_target, make_proposer("baseline"), [], 4)


def test_prompt_longer_than_cache(tiny_target):
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        generate(tiny_target, make_proposer("baseline"), list(range(100)), 10, max_len=64)


def test_max_new_tokens(tiny_target):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny_target, make_proposer("baseline"), [1, 2], 0)


@pytest.mark.parametrize("method,options", [("random", {}), ("oracle", {"continuations": {}})])
def test_draft_len_below_one(method, options):
    with pytest.raises(ValueError, match="draft_len"):
        make_proposer(method, draft_len=0, **options)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'medusa-9'"):
        make_proposer("medusa-9")


def test_unknown_profile(monkeypatch):
    monkeypatch.setenv("SPECDEC_PROFILE", "huge")
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        profile_from_env()


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(1.0, 0.0)


def test_missing_weights_name_the_command(monkeypatch, tmp_path):
    import specdec_lib.models as m
    monkeypatch.setattr(m, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(m, "_hub_snapshot", lambda repo_id: None)
    with pytest.raises(m.ModelNotFound, match="make models"):
        load_profile("small", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(m.ModelNotFound, match="huggingface-cli download Qwen/Qwen2.5-7B-Instruct"):
        load_profile("qwen7b", "cpu")


# ---------------------------------------------------------------- generate(): one input check
GOOD = dict(prompt_ids=[1, 2, 3], max_new_tokens=4)
BAD_INPUTS = [   # (what, arguments changed, the message must contain)
    ("[2, T] batch", dict(prompt_ids=torch.ones(2, 3, dtype=torch.long)), "one prompt"),
    ("float tensor", dict(prompt_ids=torch.ones(3)), "integers"),
    ("text", dict(prompt_ids="def f(x):"), "encode text with the tokenizer"),
    ("eos_ids='x'", dict(eos_ids="x"), "eos_ids"),
    ("temperature=nan", dict(temperature=float("nan")), "finite"),
    ("temperature=inf", dict(temperature=float("inf")), "finite"),
    ("top_p=nan", dict(top_p=float("nan")), "top_p"),
    ("out-of-vocabulary id", dict(prompt_ids=[1, 200_000]), "outside the target's vocabulary"),
    ("negative id", dict(prompt_ids=[1, -1]), "outside the target's vocabulary"),
    ("kv_len too small", dict(kv_len=5), "kv_len=5"),
    ("kv_len past the cache", dict(kv_len=10 ** 6), "kv_len"),
    ("max_len besides a cache", dict(max_len=10, cache="cache64"), "max_len=10 but the cache"),
    ("max_new_tokens=2.5", dict(max_new_tokens=2.5), "max_new_tokens"),
    ("seed=1.5", dict(seed=1.5), "seed"),
]


@pytest.mark.parametrize("what,changes,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_generate_rejects_bad_input(tiny_target, what, changes, message):
    args = dict(GOOD, **changes)
    if args.get("cache") == "cache64":
        args["cache"] = tiny_target.new_cache(64)
    with pytest.raises(ValueError, match=message):
        generate(tiny_target, make_proposer("baseline"), **args)


def test_generate_accepts_what_a_tokenizer_returns(tiny_target):
    """[1, T] tensors (tokenizer(..., return_tensors='pt')), numpy ints and a single int EOS are fine."""
    import numpy as np
    base = make_proposer("baseline")
    ref = generate(tiny_target, base, [1, 2, 3], 4).tokens
    assert generate(tiny_target, base, torch.tensor([[1, 2, 3]]), 4).tokens == ref
    assert generate(tiny_target, base, np.array([1, 2, 3]), np.int64(4), temperature=np.float32(0.0)).tokens == ref
    assert generate(tiny_target, base, [1, 2, 3], 4, eos_ids=ref[1]).tokens == ref[:2]


def test_unknown_options_are_one_error_type():
    for method, options in [("ngram", {"maxn": 3}), ("suffix", {"max_spec": 2}), ("random", {"g": 2}),
                            ("baseline", {"draft_len": 2}), ("oracle", {"continuations": {}, "noise": 1})]:
        with pytest.raises(ValueError, match=f"unknown {method} option"):
            make_proposer(method, **options)


def test_prompt_limit():
    from specdec_lib.data import load_prompt_set
    for limit in (0, -1, 1.5):             # checked before the tokenizer is needed
        with pytest.raises(ValueError, match="limit"):
            load_prompt_set("spec_bench:qa", None, limit)


# ---------------------------------------------------------------- the command line: checked before loading
@pytest.mark.parametrize("argv,message", [
    (["--method", "medusa-9"], "unknown --method 'medusa-9'"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"),
    (["--temperature", "nan"], "--temperature must be a finite"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--draft-len", "0", "--method", "ngram"], "--draft-len must be >= 1"),
    (["--method", "ngram", "--option", "maxn=3"], "unknown ngram option"),
    (["--method", "ngram", "--option", "max_n"], "KEY=VALUE"),
    (["--profile", "huge"], "unknown --profile"),
])
def test_bench_cli_checks_before_loading(monkeypatch, capsys, argv, message):
    import specdec_lib.bench as bench

    def no_loading(*a, **k):
        raise AssertionError("models were loaded before the arguments were checked")
    monkeypatch.setattr(bench, "load_profile", no_loading)
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
