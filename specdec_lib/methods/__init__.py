"""One file per method. Each module exposes `build(models, **options) -> Proposer`.

`make_proposer("ngram", models, max_n=3)` imports `specdec_lib.methods.ngram` and calls its build.
Every method also takes `backoff="measured"`: the proposer wrapped so that it drafts only while
drafting is measured to be faster than plain decoding on this machine (specdec_lib/backoff.py).
"""
from __future__ import annotations

import importlib
import inspect

from ..backoff import wrap

# method name -> module in this package (modules for later chapters are added as they land)
METHODS = {
    "baseline": "baseline",
    "oracle": "oracle",
    "random": "random_draft",
    "draft_model": "draft_model",
    "ngram": "ngram",
    "suffix": "suffix",
    "medusa": "medusa",
    "eagle3": "eagle3",
    "pard": "pard",
}


def _module(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}")
    try:
        return importlib.import_module(f"{__name__}.{METHODS[name]}")
    except ModuleNotFoundError as e:
        raise ValueError(f"method {name!r} is planned but not written yet ({e.name})") from e


def option_names(name: str) -> set[str] | None:
    """The options build() accepts: its named parameters, plus the module's OPTIONS when build
    takes **options. None when that cannot be known (build takes **options, no OPTIONS)."""
    module = _module(name)
    params = inspect.signature(module.build).parameters
    names = {k for k, p in params.items() if k != "models" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        if not hasattr(module, "OPTIONS"):
            return None
        names |= set(module.OPTIONS)
    return names


def check_options(name: str, options: dict) -> None:
    """ValueError naming the valid options when one is unknown (no model needed: run it before loading)."""
    names = option_names(name)
    unknown = set(options) - names - {"backoff"} if names is not None else set()
    if unknown:
        raise ValueError(f"unknown {name} option(s) {', '.join(sorted(unknown))}: "
                         f"{name} takes {', '.join(sorted(names)) or 'no options'}")


def make_proposer(name: str, models=None, backoff: str | None = None, **options):
    check_options(name, options)
    return wrap(_module(name).build(models, **options), backoff)
