"""Make a chapter run wherever it is opened: this repository, a fresh JupyterLab, Google Colab.

Every chapter's first code cell is the same few lines (`tools/clean_notebooks.py --check` keeps
them identical, with the repository URL of `_config.yml`):

    try:
        import specdec_lib
    except ImportError:                      # Colab or a fresh kernel: fetch the course first
        ...git clone the repository, put it on sys.path...
    from specdec_lib.setup_env import setup_course
    PROFILE = setup_course()

`setup_course()` then
1. on Colab (or with SPECDEC_INSTALL=1) installs the course's runtime requirements that are
   missing, never replacing Colab's own torch, matplotlib or ipywidgets;
2. picks a profile that fits the machine: the one in SPECDEC_PROFILE if set; `qwen7b` (from the
   Hugging Face hub) on a GPU with 40 GB or more; the real 1.5B + 0.5B pair (`small`) on a smaller
   GPU (a 16 GB T4) or on a CPU;
3. on Colab fetches that profile's weights from the hub (elsewhere `make models` does it once);
4. sets SPECDEC_PROFILE for the rest of the chapter and prints what it picked and why.

Only the standard library is imported at module level: on Colab this runs before the
course's requirements are installed. SPECDEC_SETUP_DRY_RUN=1 prints the commands instead of
running them (the tests use it, with Colab's environment variable faked).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
# Installed elsewhere or kept as they are: the CUDA build a GPU runtime ships (torch, triton), the
# plotting and widget versions Colab's front end expects, and what only builds or tests the book.
NEVER_INSTALL = {"torch", "triton", "jupyter-book", "nbval", "pytest", "nbconvert", "nbformat", "ipykernel"}
KEEP_IF_PRESENT = {"matplotlib", "ipywidgets", "numpy", "scipy"}
QWEN7B_MIN_GIB = 40      # Qwen2.5-7B + 0.5B in bf16 with caches and CUDA graphs
SMALL_HUB_IDS = ("Qwen/Qwen2.5-Coder-1.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct")
QWEN7B_HUB_IDS = ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")


def on_colab(environ=None) -> bool:
    """Colab sets COLAB_RELEASE_TAG in every runtime (the tests fake it)."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("COLAB_RELEASE_TAG"))


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def plan_install(requirement_lines, installed: dict[str, str]) -> list[str]:
    """The requirement strings still to install, given {distribution name: version} installed.

    >>> plan_install(["torch==2.13.0", "tqdm==4.70.1", "scipy", "gguf==0.19.0"], {"tqdm": "4.70.1", "scipy": "1.14"})
    ['gguf==0.19.0']
    """
    installed = {_dist_name(k): v for k, v in installed.items()}
    todo = []
    for line in requirement_lines:
        req = line.split("#", 1)[0].strip()
        if not req:
            continue
        spec = req.split(";", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:==\s*([^\s,]+))?", spec)
        if not m:
            continue
        name, pinned = _dist_name(m.group(1)), m.group(2)
        if name in NEVER_INSTALL:
            continue
        have = installed.get(name)
        if have is not None and (pinned is None or name in KEEP_IF_PRESENT or have == pinned):
            continue
        todo.append(spec)
    return todo


def installed_versions() -> dict[str, str]:
    from importlib import metadata
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out[_dist_name(name)] = dist.version
    return out


def pick_profile(environ=None, gpu_memory_gib: float | None = None) -> tuple[str, str]:
    """(profile, reason). gpu_memory_gib: total memory of GPU 0, None without a GPU."""
    environ = os.environ if environ is None else environ
    chosen = environ.get("SPECDEC_PROFILE")
    if chosen:
        return chosen, "SPECDEC_PROFILE is set"
    if gpu_memory_gib is None:
        return "small", "no GPU: the real Qwen2.5-Coder-1.5B + 0.5B pair on the CPU"
    if gpu_memory_gib >= QWEN7B_MIN_GIB:
        return "qwen7b", f"a GPU with {gpu_memory_gib:.0f} GiB: Qwen2.5-7B + 0.5B from the Hugging Face hub"
    return "small", (f"a GPU with {gpu_memory_gib:.0f} GiB (under {QWEN7B_MIN_GIB} GiB, too small for the 7B pair): "
                     "the real Qwen2.5-Coder-1.5B + 0.5B pair on the GPU")


def gpu_memory_gib() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def _run(cmd: list[str], dry_run: bool) -> None:
    print("$", " ".join(cmd))
    if not dry_run:
        subprocess.run(cmd, check=True)


def install_requirements(dry_run: bool = False) -> list[str]:
    """pip install what the course needs and this environment lacks (never torch)."""
    lines = (REPO_DIR / "requirements.txt").read_text().splitlines()
    todo = plan_install(lines, installed_versions())
    if todo:
        _run([sys.executable, "-m", "pip", "install", "-q", *todo], dry_run)
    return todo


def fetch_weights(profile: str, dry_run: bool = False) -> None:
    """On Colab: the profile's two models from the hub into the Hugging Face cache (once)."""
    ids = {"small": SMALL_HUB_IDS, "qwen7b": QWEN7B_HUB_IDS}.get(profile, ())
    for repo_id in ids:
        print(f"fetching {repo_id} from the Hugging Face hub (once per runtime)")
        if not dry_run:
            from huggingface_hub import snapshot_download
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])


def setup_course(install: bool | None = None, verbose: bool = True) -> str:
    """Install what is missing (on Colab), pick a profile for this machine, export it; returns it."""
    dry_run = os.environ.get("SPECDEC_SETUP_DRY_RUN") == "1"
    colab = on_colab()
    if install is None:
        install = colab or os.environ.get("SPECDEC_INSTALL") == "1"
    if install:
        install_requirements(dry_run)
    profile, reason = pick_profile(gpu_memory_gib=gpu_memory_gib())
    if colab:
        fetch_weights(profile, dry_run)
    os.environ["SPECDEC_PROFILE"] = profile
    if verbose:
        where = "Colab" if colab else "this machine"
        print(f"profile {profile!r} on {where}: {reason}")
    return profile


# The first code cell of every chapter. {url} and {branch} come from _config.yml's `repository`
# (tools/clean_notebooks.py writes them in and --check rejects a cell that differs).
BOOTSTRAP_CELL = """\
# Runs anywhere: on Colab or in a fresh kernel it first fetches the course
import os, subprocess, sys
COURSE = "{url}"
try:
    import specdec_lib
except ImportError:
    if not os.path.isdir("course"):
        subprocess.run(["git", "clone", "-q", "--depth=1", "-b", "{branch}", COURSE, "course"],
                       check=True)
    sys.path.insert(0, os.path.abspath("course"))
from specdec_lib.setup_env import setup_course
PROFILE = setup_course()   # installs what is missing on Colab, picks a profile, says which"""


def bootstrap_cell(url: str, branch: str = "main") -> str:
    return BOOTSTRAP_CELL.format(url=url, branch=branch)


def repository_from_config(config_path: Path = REPO_DIR / "_config.yml") -> tuple[str, str]:
    """(url, branch) of _config.yml's `repository` section: the one place the URL is written."""
    url = branch = None
    section = None
    for line in Path(config_path).read_text().splitlines():
        if line and not line[0].isspace():
            section = line.split(":", 1)[0].strip()
            continue
        if section == "repository":
            key, _, value = line.strip().partition(":")
            value = value.split(" #", 1)[0].strip().strip('"').strip("'")
            if key == "url":
                url = value
            elif key == "branch":
                branch = value
    if not url:
        raise ValueError(f"{config_path} has no repository.url: set it to the course's public repository")
    return url, branch or "main"
