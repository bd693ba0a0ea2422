"""The figure every chapter ends with: acceptance and throughput together, from stored summaries.

Plots read only result dicts (chapters/results/<chapter>/*.json), so a chapter can draw GPU
results on a laptop. Every figure carries a footer saying where its numbers were measured.

In a live kernel `explore(...)` adds ipywidgets controls; in the static book the cell before it
has already drawn a complete figure with `plot_sweep(...)` (a slider alone would show nothing).
"""
from __future__ import annotations

from collections import defaultdict

import matplotlib.pyplot as plt


def provenance(summaries: list[dict]) -> str:
    """'machine · model · dtype · profile' of the runs behind a figure (several lines if mixed)."""
    seen = []
    for s in summaries:
        line = " · ".join(str(s.get(k, "?")) for k in ("machine", "model", "dtype"))
        line += f" · profile {s.get('profile', '?')}"
        if s.get("note"):
            line += f" · {s['note']}"
        if line not in seen:
            seen.append(line)
    return "\n".join("measured on: " + line for line in seen[:3])


def _footer(fig, summaries):
    fig.text(0.01, 0.005, provenance(summaries), fontsize=7, color="0.35", va="bottom")


def _series(summaries, x, group):
    lines = defaultdict(list)
    for s in summaries:
        if s.get(x) is None:
            continue
        lines[tuple(s.get(g) for g in group)].append(s)
    return {k: sorted(v, key=lambda s: s[x]) for k, v in lines.items()}


def plot_sweep(summaries: list[dict], x: str = "draft_len", category: str | None = None,
               group: tuple[str, ...] = ("method", "category"), title: str | None = None,
               throughput: str = "speedup"):
    """Top: acceptance rate (solid) and tau (dashed, right axis). Bottom: speedup (or tokens/s).

    One line per `group` value (e.g. method x category), across the swept field `x`.
    The two panels share x, so a reader sees where acceptance keeps rising but speed does not.
    """
    rows = [s for s in summaries if category in (None, "all", s.get("category"))]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.2), sharex=True)
    tau_ax = top.twinx()
    for i, (key, pts) in enumerate(_series(rows, x, group).items()):
        color = f"C{i % 10}"
        label = " / ".join(str(k) for k in key if k is not None)
        xs = [p[x] for p in pts]
        top.plot(xs, [p["acceptance_rate"] for p in pts], "o-", color=color, label=label)
        tau_ax.plot(xs, [p["mean_accepted_len"] for p in pts], "s--", color=color, alpha=0.6)
        bottom.plot(xs, [p.get(throughput) or 0 for p in pts], "o-", color=color, label=label)
    top.set_ylabel("acceptance rate (solid)")
    top.set_ylim(0, 1.05)
    tau_ax.set_ylabel("tokens per step, tau (dashed)")
    bottom.set_ylabel("speedup vs our baseline" if throughput == "speedup" else throughput)
    if throughput == "speedup":
        bottom.axhline(1.0, color="0.5", lw=0.8, ls=":")
    bottom.set_xlabel(x)
    if rows:
        top.legend(fontsize=8, loc="lower left")
    top.set_title(title or f"acceptance and throughput vs {x}" + (f" ({category})" if category else ""))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _footer(fig, rows)
    return fig


def plot_categories(summaries: list[dict], method: str | None = None, title: str | None = None):
    """Per task category: acceptance rate and tau (left) beside speedup (right), as bars."""
    rows = [s for s in summaries if method in (None, s.get("method"))]
    cats = list(dict.fromkeys(s.get("category", "?") for s in rows))
    methods = list(dict.fromkeys(s.get("method") for s in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        by_cat = {s.get("category", "?"): s for s in rows if s.get("method") == m}
        xs = [i + j * width for i in range(len(cats))]
        left.bar(xs, [by_cat.get(c, {}).get("acceptance_rate", 0) for c in cats], width, label=m, color=f"C{j}")
        right.bar(xs, [by_cat.get(c, {}).get("speedup") or 0 for c in cats], width, label=m, color=f"C{j}")
    for ax, name in ((left, "acceptance rate"), (right, "speedup vs our baseline")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(name)
    right.axhline(1.0, color="0.5", lw=0.8, ls=":")
    left.legend(fontsize=8)
    fig.suptitle(title or "acceptance and throughput by task")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _footer(fig, rows)
    return fig


def explore(summaries: list[dict], sweeps: tuple[str, ...] = ("draft_len",)):
    """ipywidgets controls (swept field, category) over plot_sweep. Needs a live kernel."""
    import ipywidgets as widgets

    cats = ["all"] + sorted({str(s.get("category")) for s in summaries if s.get("category")})

    def show(x, category):
        fig = plot_sweep(summaries, x=x, category=None if category == "all" else category)
        plt.show(fig)

    return widgets.interact(show, x=widgets.Dropdown(options=list(sweeps), description="sweep"),
                            category=widgets.Dropdown(options=cats, description="category"))


# ---------------------------------------------------------------- chapter 1: costs and the speedup model
def plot_cost_curves(curves: list[dict], title: str = "what a k-token forward costs"):
    """c(k) = t(k) / t(1) for each stored cost curve (dict with k, relative_time, model, machine...)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, c in enumerate(curves):
        label = f"{c.get('model', '?')} · {c.get('machine', '?')}"
        ax.plot(c["k"], c["relative_time"], "o-", color=f"C{i}", label=label, ms=3)
    ax.plot([1, 64], [1, 64], ":", color="0.6", lw=0.8, label="c(k) = k (compute-bound)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("new tokens in one forward, k")
    ax.set_ylabel("time relative to k = 1")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _footer(fig, curves)
    return fig


def plot_roofline(machines: list[dict], ks=(1, 4, 16, 64)):
    """Attainable FLOP/s = min(peak, bandwidth x intensity); a k-token step of a bf16 model has an
    arithmetic intensity of about k FLOP per byte (2 FLOP per weight per token, 2 bytes per weight).

    machines: [{'name', 'peak_flops', 'bandwidth'}] (FLOP/s and bytes/s).
    """
    import numpy as np
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x = np.logspace(-1, 3.5, 200)
    for i, m in enumerate(machines):
        y = np.minimum(m["peak_flops"], m["bandwidth"] * x)
        ax.plot(x, y, color=f"C{i}", label=f"{m['name']} (ridge at {m['peak_flops'] / m['bandwidth']:.0f} FLOP/B)")
        for k in ks:
            ax.plot(k, min(m["peak_flops"], m["bandwidth"] * k), "o", color=f"C{i}", ms=4)
            ax.annotate(f"k={k}", (k, min(m["peak_flops"], m["bandwidth"] * k)), fontsize=7,
                        xytext=(3, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte read)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title("roofline: a k-token step sits at intensity ≈ k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_speedup_model(curve: dict, acceptances=(0.6, 0.8, 0.9), g_max: int = 16, draft_cost: float = 0.0,
                       ax=None, title: str | None = None):
    """Predicted speedup vs draft length g for several acceptance rates, best g marked."""
    from .costmodel import expected_tokens_per_step, predicted_speedup
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7, 4))
    gs = list(range(1, g_max + 1))
    for i, a in enumerate(acceptances):
        s = [predicted_speedup(a, g, curve, draft_cost) for g in gs]
        best = max(range(len(gs)), key=lambda j: s[j])
        ax.plot(gs, s, "o-", ms=3, color=f"C{i}", label=f"a = {a:.2f}: best g = {gs[best]} ({s[best]:.2f}x)")
        ax.plot(gs[best], s[best], "*", ms=12, color=f"C{i}")
        ax.plot(gs, [expected_tokens_per_step(a, g) for g in gs], ":", color=f"C{i}", alpha=0.5)
    ax.axhline(1, color="0.5", lw=0.8)
    ax.set_xlabel("draft length g")
    ax.set_ylabel("predicted speedup (solid); tokens per step (dotted)")
    ax.set_title(title or f"{curve.get('model', '?')} · {curve.get('machine', '?')} · draft cost {draft_cost:g}")
    ax.legend(fontsize=8)
    if own:
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        _footer(fig, [curve])
        return fig
