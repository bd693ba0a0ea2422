"""Keep chapter notebooks clean: no volatile metadata, nothing in a stored output a reader should not see.

Outputs stay (the book is built from them, with execution off) and so do execution counts
(nbval fails on 'Unrun reference cell has outputs' without them).

Cleaning removes per-cell timing and collapse metadata, the kernel's version strings, stored
widget state, interact boxes and frozen progress bars; turns `# NBVAL_...` comments into cell
tags (`nbval-check-output`); adds the install cell (specdec_lib/setup_env.py) before the first
code cell when it is missing and writes `_config.yml`'s repository URL into it; tags widget cells
`widget`; and strips this checkout's own path from outputs.

--check also rejects what cleaning cannot fix (see BOOK_CONVENTIONS in the README):
absolute paths, progress-bar text, tracebacks or error outputs, a first code cell that is not the
install cell, a widget cell (`interact(` / `explore(`) without the tag `widget` or without a
figure in the cell just before it.

    python tools/clean_notebooks.py chapters/*.ipynb          # rewrite in place
    python tools/clean_notebooks.py --check chapters/*.ipynb  # exit 1 with a list of problems
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from specdec_lib.setup_env import bootstrap_cell, repository_from_config  # noqa: E402  (stdlib only)

KEEP_CELL_META = {"tags"}
BOOTSTRAP_MARK = "# Runs anywhere: on Colab or in a fresh kernel"
NBVAL_COMMENT = re.compile(r"^\s*#\s*(NBVAL_[A-Z_]+)\s*$")
# /home/..., /root/..., /tmp/..., /work/..., /Users/..., C:\...; not URLs (preceded by a host name)
ABS_PATH = re.compile(r"(?<![\w.:/-])(/(?:home|root|tmp|work|Users|usr|opt|var|content|mnt|srv)/[\w.\-]+"
                      r"|[A-Z]:\\\\?[\w.\-]+\\)")
PROGRESS = re.compile(r"\d+%\|[^\n]*\||\d+/\d+ \[\d+:\d+<|it/s\]|s/it\]")
WIDGET_CALL = re.compile(r"\b(interact|interactive|explore)\(")


def _text(out) -> str:
    if out.get("output_type") == "stream":
        t = out.get("text", "")
    elif out.get("output_type") == "error":
        return "Traceback " + " ".join(out.get("traceback", []))
    else:
        t = out.get("data", {}).get("text/plain", "")
    return "".join(t) if isinstance(t, list) else t


def _set_text(out, fn) -> None:
    key, holder = ("text", out) if out.get("output_type") == "stream" else ("text/plain", out.get("data", {}))
    if key in holder:
        t = holder[key]
        holder[key] = fn("".join(t) if isinstance(t, list) else t)
    for mime in ("text/markdown", "text/html"):
        if mime in out.get("data", {}):
            t = out["data"][mime]
            out["data"][mime] = fn("".join(t) if isinstance(t, list) else t)


def _source(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def clean(nb: dict, bootstrap: str | None = None) -> dict:
    nb["metadata"] = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3"},
    }
    root = str(ROOT) + "/"
    code = [c for c in nb.get("cells", []) if c["cell_type"] == "code"]
    if bootstrap and code and not _source(code[0]).startswith(BOOTSTRAP_MARK):
        at = nb["cells"].index(code[0])          # the install cell goes before the first code cell
        nb["cells"].insert(at, {"cell_type": "code", "execution_count": None, "metadata": {},
                                "outputs": [], "source": bootstrap})
    first_code = True
    for cell in nb.get("cells", []):
        meta = {k: v for k, v in cell.get("metadata", {}).items() if k in KEEP_CELL_META}
        cell.pop("id", None)
        if cell["cell_type"] == "code":
            src = _source(cell)
            tags = list(meta.get("tags", []))
            kept = []
            for line in src.split("\n"):
                m = NBVAL_COMMENT.match(line)
                if m:
                    tag = m.group(1).lower().replace("_", "-")
                    if tag not in tags:
                        tags.append(tag)
                else:
                    kept.append(line)
            src = "\n".join(kept)
            if first_code and bootstrap and src.startswith(BOOTSTRAP_MARK):
                src = bootstrap
            first_code = False
            if WIDGET_CALL.search(src) and "widget" not in tags:
                tags.append("widget")
            cell["source"] = src
            if tags:
                meta["tags"] = tags
        cell["metadata"] = meta
        outputs = []
        for out in cell.get("outputs", []):
            out.get("metadata", {}).pop("execution", None)
            data = out.get("data", {})
            text = _text(out)
            if "application/vnd.jupyter.widget-view+json" in data:
                # widgets render nothing without a kernel: drop interact boxes (the figure above
                # them is the static version) and progress bars, keep any other widget's text
                if text.startswith("interactive(") or not text or PROGRESS.search(text):
                    continue
                data.pop("application/vnd.jupyter.widget-view+json")
            if out.get("output_type") == "stream" and out.get("name") == "stderr" and PROGRESS.search(text):
                continue                 # a tqdm bar written to stderr
            if set(data) == {"text/plain"} and PROGRESS.search(text):
                continue                 # a frozen bar whose widget state was dropped earlier
            _set_text(out, lambda t: t.replace(root, ""))
            outputs.append(out)
        if "outputs" in cell:
            cell["outputs"] = outputs
    nb["nbformat"], nb["nbformat_minor"] = 4, 4
    return nb


def problems(nb: dict, bootstrap: str | None = None) -> list[str]:
    """What --check rejects beyond volatile metadata: [description, ...] ('cell N: ...')."""
    found = []
    cells = nb.get("cells", [])
    code = [i for i, c in enumerate(cells) if c["cell_type"] == "code"]
    if bootstrap and (not code or _source(cells[code[0]]) != bootstrap):
        found.append("the first code cell is not the install cell of specdec_lib/setup_env.py "
                     "(run tools/clean_notebooks.py after pasting BOOTSTRAP_CELL)")
    prev_has_figure = False
    for i, cell in enumerate(cells):
        src = _source(cell)
        tags = cell.get("metadata", {}).get("tags", [])
        if cell["cell_type"] == "code":
            if any(NBVAL_COMMENT.match(line) for line in src.split("\n")):
                found.append(f"cell {i}: an NBVAL comment (use the cell tag, e.g. nbval-check-output)")
            if WIDGET_CALL.search(src):
                if "widget" not in tags:
                    found.append(f"cell {i}: a widget cell without the tag 'widget'")
                if not prev_has_figure:
                    found.append(f"cell {i}: a widget cell with no static figure in the cell before it")
        for out in cell.get("outputs", []):
            t = _text(out)
            if out.get("output_type") == "error" or "Traceback (most recent call last)" in t:
                found.append(f"cell {i}: an error output")
            if PROGRESS.search(t):
                found.append(f"cell {i}: progress-bar text {PROGRESS.search(t).group(0)!r}")
            for mime in ("text/markdown", "text/html"):
                v = out.get("data", {}).get(mime, "")
                t += "".join(v) if isinstance(v, list) else v
            m = ABS_PATH.search(t)
            if m:
                found.append(f"cell {i}: an absolute path {m.group(0)!r}")
        if cell["cell_type"] == "code":
            prev_has_figure = any("image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {})
                                  for o in cell.get("outputs", []))
    return found


def main(paths, check=False):
    try:
        bootstrap = bootstrap_cell(*repository_from_config())
    except (OSError, ValueError) as e:
        print(f"no install cell to compare with: {e}")
        bootstrap = None
    changed, bad = [], []
    for p in paths:
        raw = open(p).read()
        nb = json.loads(raw)
        new = json.dumps(clean(nb, bootstrap), indent=1, ensure_ascii=False) + "\n"
        if check:
            found = problems(json.loads(raw), bootstrap)
            bad += [f"{p}: {f}" for f in found]
        if new != raw:
            changed.append(p)
            if not check:
                open(p, "w").write(new)
    if check:
        if changed:
            print("notebooks that tools/clean_notebooks.py would change:", *changed)
        for line in bad:
            print(line)
        return 1 if changed or bad else 0
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    check = "--check" in args
    sys.exit(main([a for a in args if a != "--check"], check))
