"""Small helpers every chapter uses, so chapters stay short and behave alike.

- Under the `tiny` profile (CI), a chapter runs with small sizes and writes its results to a
  throwaway folder: the stored results of real runs are never overwritten by random models.
- `pick(profile, tiny=..., small=..., qwen7b=...)` chooses a size per profile in one line.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .models import profile_from_env

CHAPTERS_DIR = Path(__file__).resolve().parent.parent / "chapters"


def results_dir(chapter: str, profile: str | None = None) -> Path:
    """chapters/results/<chapter>/ for real profiles; a temporary folder under `tiny`."""
    profile = profile_from_env(profile)
    if profile == "tiny":
        return Path(tempfile.mkdtemp(prefix=f"specdec-{chapter}-"))
    out = CHAPTERS_DIR / "results" / chapter
    out.mkdir(parents=True, exist_ok=True)
    return out


def stored_results_dir(chapter: str) -> Path:
    """Where the committed results of real runs live (plots read these under every profile)."""
    return CHAPTERS_DIR / "results" / chapter


def pick(profile: str, **by_profile):
    """pick("tiny", tiny=2, small=8) -> 2. A profile not named falls back to `small`'s value."""
    return by_profile.get(profile, by_profile.get("small"))
