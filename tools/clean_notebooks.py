"""Strip volatile metadata from chapter notebooks, keeping outputs and execution counts.

Outputs stay (the book is built from them, with execution off) and so do execution counts
(nbval fails on 'Unrun reference cell has outputs' without them). Removed: per-cell timing and
collapse metadata, the kernel's version strings, and stored widget state (progress bars).

    python tools/clean_notebooks.py chapters/*.ipynb        # rewrite in place
    python tools/clean_notebooks.py --check chapters/*.ipynb  # exit 1 if anything would change
"""
import json
import sys

KEEP_CELL_META = {"tags"}


def clean(nb: dict) -> dict:
    nb["metadata"] = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3"},
    }
    for cell in nb.get("cells", []):
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in KEEP_CELL_META}
        cell.pop("id", None)
        outputs = []
        for out in cell.get("outputs", []):
            out.get("metadata", {}).pop("execution", None)
            data = out.get("data", {})
            text = "".join(data.get("text/plain", ""))
            if "application/vnd.jupyter.widget-view+json" in data:
                # widgets render nothing without a kernel: drop interact boxes (the figure above
                # them is the static version), keep a progress bar's final text
                if text.startswith("interactive(") or not text:
                    continue
                data.pop("application/vnd.jupyter.widget-view+json")
            outputs.append(out)
        if "outputs" in cell:
            cell["outputs"] = outputs
    nb["nbformat"], nb["nbformat_minor"] = 4, 4
    return nb


def main(paths, check=False):
    changed = []
    for p in paths:
        raw = open(p).read()
        new = json.dumps(clean(json.loads(raw)), indent=1, ensure_ascii=False) + "\n"
        if new != raw:
            changed.append(p)
            if not check:
                open(p, "w").write(new)
    if check and changed:
        print("notebooks with volatile metadata:", *changed)
        return 1
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    check = "--check" in args
    sys.exit(main([a for a in args if a != "--check"], check))
