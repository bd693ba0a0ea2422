"""Small helpers every chapter uses, so chapters stay short and behave alike.

- Under the `tiny` profile (CI), a chapter runs with small sizes and writes its results to a
  throwaway folder: the stored results of real runs are never overwritten by random models.
- `pick(profile, tiny=..., small=..., qwen7b=...)` chooses a size per profile in one line.
- `glue(name, value, fmt)` stores a number for the prose (MyST-NB's glue): the text cites
  {glue:text}`name`, so a re-run can never leave a stale number in a sentence.
- `reuse_stored(chapter, files)`: heavy live runs are reused from stored results only when the
  reader asks (SPECDEC_REUSE=1), and the chapter then says whose machine measured them.
- `machine_description()` names the machine, with its CPU instruction set (AVX-512 or AVX2
  decides whether a k-token forward is nearly free on a CPU: chapter 1).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from .models import machine_name, profile_from_env

CHAPTERS_DIR = Path(__file__).resolve().parent.parent / "chapters"


def results_dir(chapter: str, profile: str | None = None) -> Path:
    """chapters/results/<chapter>/ for real profiles; under `tiny` a temporary folder, deleted when
    the process (the notebook's kernel) exits."""
    profile = profile_from_env(profile)
    if profile == "tiny":
        tmp = tempfile.mkdtemp(prefix=f"specdec-{chapter}-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)   # removed when the kernel exits
        return Path(tmp)
    out = CHAPTERS_DIR / "results" / chapter
    out.mkdir(parents=True, exist_ok=True)
    return out


def stored_results_dir(chapter: str) -> Path:
    """Where the committed results of real runs live (plots read these under every profile)."""
    return CHAPTERS_DIR / "results" / chapter


def pick(profile: str, **by_profile):
    """pick("tiny", tiny=2, small=8) -> 2. A profile not named falls back to `small`'s value."""
    return by_profile.get(profile, by_profile.get("small"))


def cpu_capability() -> str:
    """The vector instruction set PyTorch's CPU kernels use here: 'AVX512', 'AVX2', 'DEFAULT' (ARM)."""
    import torch
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:        # very old torch
        return "unknown"


def machine_description(device: str = "cpu") -> str:
    """'AMD EPYC 9B14, 2 cores, AVX512' on a CPU; the GPU's name on a GPU."""
    name = machine_name(device)
    return name if str(device).startswith("cuda") else f"{name}, {cpu_capability()}"


def provenance(models) -> dict:
    """models.provenance() plus the CPU's instruction set: what every stored result records."""
    prov = dict(models.provenance())
    if not str(prov.get("device", "cpu")).startswith("cuda"):
        prov["isa"] = cpu_capability()
    return prov


REUSE_ENV = "SPECDEC_REUSE"


def reuse_stored(chapter: str, files, profile: str | None = None) -> bool:
    """True when the reader asked for stored results (SPECDEC_REUSE=1, or a comma-separated list of
    the stored files to reuse) and they are all there.

    Never under `tiny` (CI runs everything live). When it returns True it prints which machine
    measured the stored files, so the chapter's output says whose numbers it shows.
    """
    profile = profile_from_env(profile)
    asked = os.environ.get(REUSE_ENV, "0").strip()
    if profile == "tiny" or asked in ("", "0"):
        return False
    if asked not in ("1", "all") and not set(files) <= {f.strip() for f in asked.split(",")}:
        return False          # SPECDEC_REUSE=a.json,b.json reuses only the sections whose files it names
    folder = stored_results_dir(chapter)
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        print(f"{REUSE_ENV}=1 but {', '.join(missing)} not stored: measuring live")
        return False
    machines = sorted({_machine_of(folder / f) for f in files} - {None})
    print(f"{REUSE_ENV}={asked}: reusing stored results from chapters/results/{chapter}/ "
          f"(measured on {'; '.join(machines) or 'an unnamed machine'}), not measuring live")
    return True


def _machine_of(path):
    import json
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    rows = obj if isinstance(obj, list) else [obj]
    for r in rows:
        if isinstance(r, dict) and r.get("machine"):
            return r["machine"] + (f", {r['isa']}" if r.get("isa") else "")
    return None


def glue(name: str, value, fmt: str | None = None) -> str:
    """Store `value` under `name` for the prose and return its text.

    The markdown cites it as {glue:text}`name`; the book is built from stored outputs, so the
    sentence always shows what the last run computed. fmt: a format spec ('.2f', '.0%', ',d').
    Without myst_nb (Colab) the same output is written by hand, so the notebook stays valid.
    """
    text = format(value, fmt) if fmt else str(value)
    try:
        from myst_nb import glue as _glue
        _glue(name, text, display=False)
    except ImportError:
        from IPython.display import display
        display({"application/papermill.record/text/plain": repr(text)}, raw=True,
                metadata={"scrapbook": {"name": name, "mime_prefix": "application/papermill.record/"}})
    return text


def curve_name(profile: str, role: str = "target", device: str = "cpu") -> str:
    """Chapter 1 stores this machine's cost curve as cpu_<profile>_<role> (gpu_... on a GPU)."""
    return f"{'gpu' if str(device).startswith('cuda') else 'cpu'}_{profile}_{role}"


def local_cost_curve(profile: str | None = None, role: str = "target", device: str | None = None):
    """(name, curve): the cost curve chapter 1 measured for this profile and kind of machine.

    Chapters 2-4 predict speedups from it (on a GPU the gpu_* curve, on a CPU the cpu_* one). If
    chapter 1 ran here, it is this machine's own curve;
    otherwise the stored one, and the message says whose machine that was. Under `tiny` the
    random models' curve says nothing, so the stored `small` curve stands in.
    """
    from .costmodel import CURVES_DIR, load_cost_curve
    from .models import default_device
    device = device or default_device()      # where load_profile puts the models by default
    profile = profile_from_env(profile)
    profile = "small" if profile == "tiny" else profile
    names = [curve_name(profile, role, device)]                 # this kind of machine's own curve
    if str(device).startswith("cuda"):
        # no curve of this GPU yet: the stored H200 curve of the same shapes is closer than a CPU's
        # (qwen7b's target: the 7B shapes; every profile's draft is a 0.5B, stored for `small`)
        names += [f"h200_{'7b_shapes' if profile == 'qwen7b' else profile}_{role}", f"h200_small_{role}"]
    names.append(curve_name("small", role, "cpu"))
    name = next((n for n in names[:-1] if (CURVES_DIR / f"{n}.json").exists()), names[-1])
    curve = load_cost_curve(name)
    here = machine_description(device)
    there = curve.get("machine", "?") + (f", {curve['isa']}" if curve.get("isa") else "")
    whose = "this machine" if there == here else f"another machine ({there}); run chapter 1 to measure yours"
    print(f"cost curve {name}: measured on {whose}")
    return name, curve
