"""Bad input gets a clear error, never a silent wrong answer."""
import pytest

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
