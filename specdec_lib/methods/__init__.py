"""One file per method. Each module exposes `build(models, **options) -> Proposer`.

`make_proposer("ngram", models, max_n=3)` imports `specdec_lib.methods.ngram` and calls its build.
"""
from __future__ import annotations

import importlib

# method name -> module in this package (modules for later chapters are added as they land)
METHODS = {
    "baseline": "baseline",
    "oracle": "oracle",
    "random": "random_draft",
    "draft_model": "draft_model",
    "ngram": "ngram",
    "suffix": "suffix",
}


def make_proposer(name: str, models=None, **options):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    try:
        module = importlib.import_module(f"{__name__}.{METHODS[name]}")
    except ModuleNotFoundError as e:
        raise ValueError(f"method {name!r} is planned but not written yet ({e.name})") from e
    return module.build(models, **options)
