"""The course's figures: acceptance and throughput together, read from stored summaries.

Plots read only result dicts (chapters/results/<chapter>/*.json), so a chapter can draw GPU
results on a laptop. Conventions (book/CONVENTIONS in BOOK_CONVENTIONS.md):
- one width, the book's text width (7.8 in at 100 dpi = 780 px), at most two panels side by side,
  labels in words with units, legends outside the data (below the axes);
- measured lines solid, predicted lines dashed and labelled "predicted";
- a speedup with a spread (`speedup_spread`, from metrics.speedup_spread) gets an error bar;
- where the numbers came from goes into the caption, not into the figure: `show(fig, text, rows)`
  displays the figure and a caption naming the machine, model, dtype and profile of `rows`.

In a live kernel `explore(...)` adds ipywidgets controls; in the static book the cell before it
has already drawn a complete figure (a slider alone would show nothing).
"""
from __future__ import annotations

from collections import defaultdict

import matplotlib.pyplot as plt

BOOK_WIDTH = 7.8          # inches: 780 px at 100 dpi, the width of the book's text column
STYLE = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 10.5, "axes.titlesize": 11,
         "axes.labelsize": 10.5, "legend.fontsize": 9.5, "xtick.labelsize": 9.5, "ytick.labelsize": 9.5,
         "axes.grid": True, "grid.alpha": 0.3}
LIVE_NOTE = ("Live controls: they need a running kernel (JupyterLab or Colab). "
             "The static figure above shows the same plot at its default setting.")
plt.rcParams.update(STYLE)


def provenance(summaries: list[dict]) -> str:
    """'machine · model · dtype · profile' of the runs behind a figure ('; ' between mixed ones).

    Rows that differ only in whether they name the CPU's instruction set (`isa`) are one source:
    it is named once, with the instruction set."""
    seen, isa = [], {}
    for s in summaries:
        rest = " · ".join(str(s.get(k, "?")) for k in ("model", "dtype"))
        rest += f" · profile {s.get('profile', '?')}" + (f" ({s['note']})" if s.get("note") else "")
        key = (str(s.get("machine", "?")), rest)
        if key not in seen:
            seen.append(key)
        if s.get("isa"):
            isa.setdefault(key, s["isa"])
    lines = [m + (f", {isa[(m, r)]}" if (m, r) in isa else "") + " · " + r for m, r in seen]
    return "; ".join(lines[:4])


def caption_text(text: str, sources=()) -> str:
    prov = provenance(list(sources))
    return f"*Figure.* {text.rstrip('.')}." + (f" Data: {prov}." if prov else "")


def show(fig, text: str, sources=()) -> None:
    """Display `fig`, then its caption with the provenance of `sources` (summaries or curves)."""
    from IPython.display import Markdown, display
    display(fig)
    plt.close(fig)
    display(Markdown(caption_text(text, sources)))


def live_note() -> None:
    print(LIVE_NOTE)


def _legend_below(fig, axes, ncol: int = 2):
    handles, labels = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels and not l.startswith("_"):
                handles.append(h)
                labels.append(l)
    if not labels:
        fig.tight_layout()
        return
    rows = (len(labels) + ncol - 1) // ncol
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
    bottom = min(0.4, (0.2 * rows + 0.12) / fig.get_figheight())
    fig.tight_layout(rect=(0, bottom, 1, 1))


def _series(summaries, x, group):
    lines = defaultdict(list)
    for s in summaries:
        if s.get(x) is None:
            continue
        lines[tuple(s.get(g) for g in group)].append(s)
    return {k: sorted(v, key=lambda s: s[x]) for k, v in lines.items()}


def _is_predicted(rows) -> bool:
    return any(r.get("predicted_from") or "replay" in str(r.get("machine", "")) for r in rows)


def _spread(row, field="speedup"):
    sp = row.get(f"{field}_spread")
    if isinstance(sp, dict) and sp.get("ci_low") is not None:
        return sp["ci_low"], sp["ci_high"]
    return None


LABELS = {"draft_len": "draft length g (tokens)", "max_n": "longest n-gram matched, n (tokens)",
          "max_spec_factor": "tree budget factor (nodes per matched token)",
          "cache_size": "global cache size (tokens)", "request": "request number",
          "acceptance_rate": "acceptance rate\n(accepted / proposed)",
          "position_acceptance": "per-position acceptance a",
          "mean_accepted_len": "tokens per target\nforward, tau",
          "speedup": "speedup over our\nbaseline (x)", "tokens_per_s": "tokens per second"}


def plot_sweep(summaries: list[dict], x: str = "draft_len", category: str | None = None,
               group: tuple[str, ...] = ("method", "category"), title: str | None = None,
               throughput: str = "speedup", predicted: bool | None = None, tau: bool = True,
               xlabel: str | None = None):
    """Acceptance (top), tokens per forward tau (middle), speedup or tokens/s (bottom) against `x`.

    One line per `group` value (e.g. method x category). The panels share x, so a reader sees where
    acceptance keeps falling while tau keeps rising and speed does not. `predicted` (default: rows
    from a replay or a cost model) draws the throughput dashed and labels it "predicted". xlabel
    replaces the field's default label (e.g. "draft length k (tokens)" where a chapter calls it k).
    """
    xlabel = xlabel or LABELS.get(x, x)
    rows = [s for s in summaries if category in (None, "all", s.get("category"))]
    predicted = _is_predicted(rows) if predicted is None else predicted
    n = 3 if tau and throughput != "mean_accepted_len" else 2
    fig, axes = plt.subplots(n, 1, figsize=(BOOK_WIDTH, 2.3 * n + 0.6), sharex=True)
    top, bottom = axes[0], axes[-1]
    for i, (key, pts) in enumerate(_series(rows, x, group).items()):
        color = f"C{i % 10}"
        label = " / ".join(str(k) for k in key if k is not None)
        xs = [p[x] for p in pts]
        top.plot(xs, [p["acceptance_rate"] for p in pts], "o-", color=color, label=label)
        if any(p.get("position_acceptance") for p in pts):
            top.plot(xs, [p.get("position_acceptance") for p in pts], "^:", color=color, alpha=0.7, ms=4)
        if n == 3:
            axes[1].plot(xs, [p["mean_accepted_len"] for p in pts], "s-", color=color)
        ys = [p.get(throughput) or 0 for p in pts]
        style = "o--" if predicted and throughput != "mean_accepted_len" else "o-"
        bottom.plot(xs, ys, style, color=color)
        spreads = [_spread(p, throughput) for p in pts]
        if any(spreads):
            lo = [y - s[0] if s else 0 for y, s in zip(ys, spreads)]
            hi = [s[1] - y if s else 0 for y, s in zip(ys, spreads)]
            bottom.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=color, capsize=3, lw=1)
    top.set_ylabel(LABELS["acceptance_rate"] + ("\n(triangles: per-position a)" if any(
        r.get("position_acceptance") for r in rows) else ""))
    top.set_ylim(0, 1.05)
    if n == 3:
        axes[1].set_ylabel(LABELS["mean_accepted_len"])
    ylabel = LABELS.get(throughput, throughput)
    bottom.set_ylabel(("predicted " if predicted and throughput == "speedup" else "") + ylabel)
    if throughput == "speedup":
        bottom.axhline(1.0, color="0.4", lw=0.8, ls=":")
    bottom.set_xlabel(xlabel)
    if all(isinstance(r.get(x), int) for r in rows if r.get(x) is not None):
        from matplotlib.ticker import MaxNLocator
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title(title or f"acceptance and throughput against {xlabel}")
    _legend_below(fig, [top])
    return fig


def plot_categories(summaries: list[dict], method: str | None = None, title: str | None = None,
                    predicted: bool = False):
    """Per task category: acceptance rate (left) beside speedup (right), as bars with spreads."""
    rows = [s for s in summaries if method in (None, s.get("method"))]
    cats = list(dict.fromkeys(s.get("category", "?") for s in rows))
    methods = list(dict.fromkeys(s.get("method") for s in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(BOOK_WIDTH, 3.9))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        by_cat = {s.get("category", "?"): s for s in rows if s.get("method") == m}
        xs = [i + j * width for i in range(len(cats))]
        left.bar(xs, [by_cat.get(c, {}).get("acceptance_rate", 0) for c in cats], width, label=m, color=f"C{j}")
        ys = [by_cat.get(c, {}).get("speedup") or 0 for c in cats]
        right.bar(xs, ys, width, color=f"C{j}", hatch="//" if predicted else None,
                  edgecolor="white" if predicted else None)
        spreads = [_spread(by_cat.get(c, {})) for c in cats]
        if any(spreads):
            lo = [y - s[0] if s else 0 for y, s in zip(ys, spreads)]
            hi = [s[1] - y if s else 0 for y, s in zip(ys, spreads)]
            right.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="0.2", capsize=3, lw=1)
    for ax, name in ((left, LABELS["acceptance_rate"]),
                     (right, ("predicted " if predicted else "") + LABELS["speedup"])):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
        ax.set_ylabel(name)
    right.axhline(1.0, color="0.4", lw=0.8, ls=":")
    left.set_ylim(0, 1.05)          # a rate: the same scale on every figure (and no +-0.04 axis when all are 0)
    fig.suptitle(title or "acceptance and throughput by task")
    _legend_below(fig, [left], ncol=min(3, len(methods)) or 1)
    return fig


def explore(summaries: list[dict], sweeps: tuple[str, ...] = ("draft_len",), **plot_options):
    """ipywidgets controls (swept field, category) over plot_sweep. Needs a live kernel."""
    import ipywidgets as widgets

    live_note()
    cats = ["all"] + sorted({str(s.get("category")) for s in summaries if s.get("category")})

    def draw(x, category):
        fig = plot_sweep(summaries, x=x, category=None if category == "all" else category, **plot_options)
        plt.show(fig)

    return widgets.interact(draw, x=widgets.Dropdown(options=list(sweeps), description="sweep"),
                            category=widgets.Dropdown(options=cats, description="category"))


# ---------------------------------------------------------------- chapter 1: costs and the speedup model
def plot_cost_curves(curves: list[dict], title: str = "what a forward over k new tokens costs"):
    """c(k) = t(k) / t(1) for each stored cost curve (dict with k, relative_time, model, machine...)."""
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH, 4.6))
    for i, c in enumerate(curves):
        label = c.get("label") or f"{str(c.get('model', '?'))[:40]} · {c.get('machine', '?')}"
        ax.plot(c["k"], c["relative_time"], "o-", color=f"C{i}", label=label, ms=4)
    ax.plot([1, 64], [1, 64], ":", color="0.5", lw=1, label="c(k) = k: k forwards of one token")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("new tokens in one forward, k")
    ax.set_ylabel("time relative to a\none-token forward, c(k)")
    ax.set_title(title)
    _legend_below(fig, [ax], ncol=1)
    return fig


def plot_roofline(machines: list[dict], ks=(1, 4, 16, 64)):
    """Attainable FLOP/s = min(peak, bandwidth x intensity); a k-token step of a bf16 model has an
    arithmetic intensity of about k FLOP per byte (2 FLOP per weight per token, 2 bytes per weight).

    machines: [{'name', 'peak_flops', 'bandwidth'}] (FLOP/s and bytes/s).
    """
    import numpy as np
    fig, ax = plt.subplots(figsize=(BOOK_WIDTH, 4.6))
    x = np.logspace(-1, 3.5, 200)
    for i, m in enumerate(machines):
        y = np.minimum(m["peak_flops"], m["bandwidth"] * x)
        ax.plot(x, y, color=f"C{i}", label=f"{m['name']}: ridge at {m['peak_flops'] / m['bandwidth']:.0f} FLOP/byte")
        for k in ks:
            ax.plot(k, min(m["peak_flops"], m["bandwidth"] * k), "o", color=f"C{i}", ms=5)
            ax.annotate(f"k={k}", (k, min(m["peak_flops"], m["bandwidth"] * k)), fontsize=9,
                        xytext=(4, -12), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte read)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title("roofline: a k-token step sits at an intensity of about k")
    _legend_below(fig, [ax], ncol=1)
    return fig


def plot_speedup_model(curve: dict, acceptances=(0.6, 0.8, 0.9), g_max: int = 16, draft_cost: float = 0.0,
                       ax=None, title: str | None = None):
    """Predicted speedup against draft length g for per-position acceptances a, best g starred.

    Predictions, so dashed (the course draws measurements solid).
    """
    from .costmodel import predicted_speedup
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(BOOK_WIDTH, 4.4))
    gs = list(range(1, g_max + 1))
    for i, a in enumerate(acceptances):
        s = [predicted_speedup(a, g, curve, draft_cost) for g in gs]
        best = max(range(len(gs)), key=lambda j: s[j])
        ax.plot(gs, s, "o--", ms=3, color=f"C{i}", label=f"predicted, a = {a:.2f}: best g = {gs[best]} ({s[best]:.2f}x)")
        ax.plot(gs[best], s[best], "*", ms=13, color=f"C{i}")
    ax.axhline(1, color="0.4", lw=0.8, ls=":")
    ax.set_xlabel("draft length g (tokens)")
    ax.set_ylabel("predicted speedup (x)")
    ax.set_title(title or f"{str(curve.get('model', '?'))[:36]} · draft cost {draft_cost:g}")
    if own:
        _legend_below(fig, [ax], ncol=1)
        return fig
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return ax
