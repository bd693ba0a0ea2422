"""Check the built book as a reader meets it (after `make book`).

    python tools/check_book.py [_build/html]                  # exit 1 with a list of problems
    python tools/check_book.py _build/html --screenshots DIR  # also headless-Chromium screenshots

Rejected in any page: an absolute path of a machine (/home/..., /work/..., C:\\...), a Python
"Traceback", progress-bar text ("45%|####", "it/s]"), a widget cell (tag `widget`, or code that
calls interact/explore) without a figure in the cell just before it or without an output of its
own (the sentence saying where the controls run), and a link to a page or anchor of the book that
does not exist. External links are not fetched (CI runs offline).

Screenshots: Chromium (Debian's `chromium`) renders each chapter page 1280 px wide; tall pages are
cut into tiles DIR/<page>-<n>.png of at most 2000 px, small enough to look at one by one.
"""
from __future__ import annotations

import argparse
import html as htmllib
import re
import shutil
import subprocess
import sys
from pathlib import Path

ABS_PATH = re.compile(r"(?<![\w.:/-])(/(?:home|root|tmp|work|Users|usr|opt|var|content|mnt|srv)/[\w.\-]+"
                      r"|[A-Z]:\\\\?[\w.\-]+\\)")
PROGRESS = re.compile(r"\d+%\|[^\n<]*\||\d+/\d+ \[\d+:\d+<|it/s\]|s/it\]")
WIDGET_CALL = re.compile(r"\b(interact|interactive|explore)\(")
SCRIPT = re.compile(r"<script\b.*?</script>|<style\b.*?</style>", re.S)
TAG = re.compile(r"<[^>]+>")
CELL = re.compile(r'<div class="cell( [^"]*)? docutils container"')
HREF = re.compile(r'(?:href|src)="([^"]+)"')
IDS = re.compile(r'\bid="([^"]+)"')


def text_of(fragment: str) -> str:
    return htmllib.unescape(TAG.sub("", fragment))


def cells(page: str) -> list[tuple[str, str]]:
    """[(class string, html of the cell)] for the notebook cells of a page, in order."""
    starts = [(m.start(), m.group(1) or "") for m in CELL.finditer(page)]
    out = []
    for i, (start, cls) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(page)
        out.append((cls, page[start:end]))
    return out


def check_page(path: Path, root: Path, ids_cache: dict) -> list[str]:
    raw = path.read_text(errors="replace")
    body = SCRIPT.sub("", raw)
    rel = path.relative_to(root)
    found = []
    visible = text_of(body)
    for m in ABS_PATH.finditer(visible):
        found.append(f"{rel}: absolute path {m.group(0)!r}")
        break
    if "Traceback" in visible:
        found.append(f"{rel}: a Traceback")
    m = PROGRESS.search(visible)
    if m:
        found.append(f"{rel}: progress-bar text {m.group(0)!r}")
    prev_figure = False
    for i, (cls, cell) in enumerate(cells(body)):
        inp, _, out = cell.partition('class="cell_output')
        is_widget = "tag_widget" in cls or bool(WIDGET_CALL.search(text_of(inp)))
        if is_widget:
            if not prev_figure:
                found.append(f"{rel}: widget cell {i} has no static figure just before it")
            if not text_of(out).strip():
                found.append(f"{rel}: widget cell {i} shows nothing (print plots.LIVE_NOTE in it)")
        prev_figure = "<img" in out
    for link in HREF.findall(raw):
        if re.match(r"^(https?:|mailto:|data:|javascript:|//)", link) or link.startswith("#") and len(link) == 1:
            continue
        target, _, anchor = htmllib.unescape(link).partition("#")
        target = target.split("?", 1)[0]
        target_path = (path.parent / target).resolve() if target else path
        if not target_path.exists():
            found.append(f"{rel}: broken link {link!r}")
            continue
        if anchor and target_path.suffix == ".html":
            if target_path not in ids_cache:
                ids_cache[target_path] = set(IDS.findall(target_path.read_text(errors="replace")))
            if anchor not in ids_cache[target_path]:
                found.append(f"{rel}: link to a missing anchor {link!r}")
    return found


def screenshots(root: Path, out: Path, pages: list[Path], height: int = 12000, tile: int = 2000) -> list[Path]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no Chromium found (Debian: apt-get install -y chromium): screenshots skipped")
        return []
    from PIL import Image
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for page in pages:
        name = page.stem
        full = out / f"{name}-full.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size=1280,{height}", f"--screenshot={full}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        img = Image.open(full).convert("RGB")
        # trim the white tail below the page's end
        px = img.load()
        bottom = img.height
        while bottom > tile and all(px[x, bottom - 1] == (255, 255, 255) for x in range(0, img.width, 16)):
            bottom -= 8
        for n, top in enumerate(range(0, bottom, tile)):
            part = out / f"{name}-{n + 1}.png"
            img.crop((0, top, img.width, min(top + tile, bottom))).save(part)
            made.append(part)
        full.unlink()
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", nargs="?", default="_build/html")
    ap.add_argument("--screenshots", metavar="DIR", default=None)
    a = ap.parse_args(argv)
    root = Path(a.html)
    if not (root / "index.html").exists():
        print(f"no built book in {root}: run `make book` first")
        return 1
    pages = sorted(p for p in root.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts
                   and p.name not in ("genindex.html", "search.html"))
    found, ids_cache = [], {}
    for p in pages:
        found += check_page(p, root, ids_cache)
    for line in found:
        print(line)
    print(f"checked {len(pages)} pages: {len(found)} problem(s)")
    if a.screenshots:
        chapters = [p for p in pages if p.parent.name == "chapters"]
        made = screenshots(root, Path(a.screenshots), chapters)
        if made:
            print(f"{len(made)} screenshots in {a.screenshots}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
