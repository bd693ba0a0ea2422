"""The install cell every chapter starts with, tested as a Colab reader meets it.

A clean environment: a fresh venv in which `import specdec_lib` fails (the course's dependencies
are visible, the course is not), Colab's environment variable faked, the repository cloned from
this checkout instead of GitHub, and nothing downloaded or installed (SPECDEC_SETUP_DRY_RUN=1
prints the commands instead).
"""
import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from specdec_lib import setup_env

ROOT = Path(__file__).resolve().parent.parent


def test_plan_install_never_touches_torch():
    lines = ["torch==2.13.0", "triton; platform_system == \"Linux\"", "transformers==5.24.0", "tqdm==4.70.1",
             "matplotlib==3.11.2", "jupyter-book==1.0.4.post1", "scipy", "# a comment", ""]
    colab_like = {"torch": "2.8.0+cu126", "transformers": "4.57.1", "tqdm": "4.70.1", "matplotlib": "3.10.0"}
    assert setup_env.plan_install(lines, colab_like) == ["transformers==5.24.0", "scipy"]
    assert setup_env.plan_install(lines, dict(colab_like, transformers="5.24.0", scipy="1.16")) == []


@pytest.mark.parametrize("env, gib, want", [
    ({}, None, "small"), ({}, 15.0, "small"), ({}, 39.5, "small"), ({}, 40.0, "qwen7b"), ({}, 80.0, "qwen7b"),
    ({"SPECDEC_PROFILE": "tiny"}, 80.0, "tiny")])
def test_pick_profile(env, gib, want):
    profile, reason = setup_env.pick_profile(env, gib)
    assert profile == want and reason


def test_repository_url_comes_from_config(tmp_path):
    cfg = tmp_path / "_config.yml"
    cfg.write_text("title: x\nrepository:\n  url: https://example.org/fork  # the publisher's\n  branch: dev\n")
    assert setup_env.repository_from_config(cfg) == ("https://example.org/fork", "dev")
    cfg.write_text("title: x\n")
    with pytest.raises(ValueError, match="repository.url"):
        setup_env.repository_from_config(cfg)


def _first_code_cell(path: Path) -> str:
    nb = json.loads(path.read_text())
    src = next(c["source"] for c in nb["cells"] if c["cell_type"] == "code")
    return "".join(src) if isinstance(src, list) else src


def test_every_chapter_starts_with_the_install_cell():
    cell = setup_env.bootstrap_cell(*setup_env.repository_from_config())
    for nb in sorted((ROOT / "chapters").glob("[0-9]*.ipynb")):
        assert _first_code_cell(nb) == cell, f"{nb.name}: run tools/clean_notebooks.py on it"


def test_install_cell_in_a_clean_colab_like_environment(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("needs the repository's git history (the cell clones it)")
    # a fresh interpreter that sees the dependencies of this environment but not the course
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # paths in a .pth file join sys.path, but .pth files inside them (our editable install) do not run
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "content"
    work.mkdir()
    url, branch = setup_env.repository_from_config()
    current = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--abbrev-ref", "HEAD"],
                             capture_output=True, text=True).stdout.strip() or branch
    cell = setup_env.bootstrap_cell(url, branch).replace(url, ROOT.as_uri()).replace(
        f'"-b", "{branch}"', f'"-b", "{current}"')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECDEC_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(COLAB_RELEASE_TAG="release-colab-fake", SPECDEC_SETUP_DRY_RUN="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([py, "-c", "import specdec_lib"], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode != 0, "the course must not be importable before the cell runs"
    out = subprocess.run([py, "-c", cell + "\nprint('PROFILE=' + PROFILE)"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (work / "course" / "specdec_lib" / "setup_env.py").exists()
    assert "PROFILE=small" in out.stdout and "on Colab" in out.stdout
    assert "fetching Qwen/Qwen2.5-Coder-1.5B-Instruct" in out.stdout
    assert "torch==" not in out.stdout, "the install step must keep Colab's torch"
    # a second run (a restarted runtime) reuses the clone
    again = subprocess.run([py, "-c", cell], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
