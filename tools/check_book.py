"""Check the built book as a reader meets it (after `make book`).

    python tools/check_book.py [_build/html]                  # exit 1 with a list of problems
    python tools/check_book.py _build/html --screenshots DIR  # also headless-Chromium screenshots

Rejected in any page: an absolute path of a machine (/home/..., /work/..., C:\\...), a Python
"Traceback", progress-bar text ("45%|####", "it/s]"), a widget cell (tag `widget`, or code that
calls interact/explore) without a figure in the cell just before it or without an output of its
own (the sentence saying where the controls run), a link to a page or anchor of the book that
does not exist, a code line of a notebook cell longer than 95 characters (the code column holds
about 96 in a 1280 px window; longer printed lines wrap through _static/wrap_code.js), and in
the prose (code and rendered math left out): $...$ math that did not render (e.g. in a figure
caption) or a leftover marker (an unresolved {glue}/{cite} role, a ::: fence, NBVAL, TODO, FIXME).
A cell whose only output is a quoted short string ('1.23': the return value of a last-line
glue(...) without ";") is flagged too. External links are not fetched (CI runs offline). Pages
in WARN_ONLY get a warning instead for long code lines and such echoes.

Screenshots: Chromium (Debian's `chromium`) renders each page (front matter and chapters) 1280 px wide; tall pages are
cut into tiles DIR/<page>-<nn>.png of at most 2000 px, small enough to look at one by one.
MathJax comes from a CDN; offline, pass --mathjax with a local tex-mml-chtml.js to see the math.
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
PRE = re.compile(r"<pre\b[^>]*>(.*?)</pre>", re.S)
NOT_PROSE = re.compile(r"<pre\b.*?</pre>|<code\b.*?</code>|<(span|div) class=\"math\b[^\"]*\">.*?</\1>", re.S)
DOLLAR_MATH = re.compile(r"(?<![\w$\\])\$[^$\s](?:[^$\n]{0,200}?[^$\s\\])?\$(?![\w$])")
MARKER = re.compile(r"\{(?:glue|glue:text|cite|ref|numref|doc|eq)\}?`|^\s*:::|NBVAL|\bTODO\b|\bFIXME\b", re.M)
MAX_CODE_LINE = 95
# chapters that are re-executed later by their owners: long code lines and glue echoes are only
# reported for now (a warning); remove a chapter from here once it passes
WARN_ONLY = ()
ECHO = re.compile(r"""<pre\b[^>]*>(?:<span></span>)?\s*('[^'\n<]{0,40}'|"[^"\n<]{0,40}")\s*</pre>""")


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


def check_page(path: Path, root: Path, ids_cache: dict, warnings: list | None = None) -> list[str]:
    raw = path.read_text(errors="replace")
    body = SCRIPT.sub("", raw)
    rel = path.relative_to(root)
    found = []
    prose = text_of(NOT_PROSE.sub(" ", body))
    m = DOLLAR_MATH.search(prose)
    if m:
        found.append(f"{rel}: math that did not render {m.group(0)!r}")
    m = MARKER.search(prose)
    if m:
        found.append(f"{rel}: leftover marker {prose[max(0, m.start() - 30):m.end() + 30].strip()!r}")
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
    long_lines, style = [], []
    for i, (cls, cell) in enumerate(cells(body)):
        inp, _, out = cell.partition('class="cell_output')
        is_widget = "tag_widget" in cls or bool(WIDGET_CALL.search(text_of(inp)))
        if is_widget:
            if not prev_figure:
                found.append(f"{rel}: widget cell {i} has no static figure just before it")
            if not text_of(out).strip():
                found.append(f"{rel}: widget cell {i} shows nothing (print plots.LIVE_NOTE in it)")
        prev_figure = "<img" in out
        for pre in PRE.findall(inp):
            for line in text_of(pre).split("\n"):
                if len(line) > MAX_CODE_LINE:
                    long_lines.append((i, line))
        m = ECHO.search(out)
        if m:
            style.append(f"{rel}: code cell {i + 1} shows the value {htmllib.unescape(m.group(1))} "
                         "(end its last glue(...) with ';')")
    if long_lines:
        i, line = long_lines[0]
        style.append(f"{rel}: {len(long_lines)} code line(s) over {MAX_CODE_LINE} characters "
                     f"(first in code cell {i + 1}: {line.strip()[:60]!r}...)")
    if path.stem in WARN_ONLY and warnings is not None:
        warnings += style
    else:
        found += style
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


MEASURE = ('<script>window.addEventListener("load", () => document.body.setAttribute('
           '"data-page-height", document.documentElement.scrollHeight));</script></body>')
MATHJAX_CDN = re.compile(r'src="https://cdn\.jsdelivr\.net/npm/mathjax@3/es5/tex-mml-chtml\.js"')


def page_copy(page: Path, mathjax: Path | None) -> Path:
    """A copy of the page next to it (so its links resolve) that records its rendered height on
    load; with a local MathJax 3 (tex-mml-chtml.js) instead of the CDN's, for offline screenshots."""
    text = page.read_text(errors="replace").replace("</body>", MEASURE, 1)
    if mathjax is not None:
        text = MATHJAX_CDN.sub(f'src="{mathjax.resolve().as_uri()}"', text)
    copy = page.with_name(f".screenshot-{page.name}")
    copy.write_text(text)
    return copy


def page_height(browser: str, page: Path, width: int) -> int:
    """The rendered height of a page in px (Chromium's --dump-dom reads what MEASURE recorded)."""
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--window-size={width},1200", "--virtual-time-budget=10000",
                          "--dump-dom", page.resolve().as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-page-height="(\d+)"', dom)
    return int(m.group(1)) if m else 20000


def screenshots(root: Path, out: Path, pages: list[Path], width: int = 1280, tile: int = 2000,
                mathjax: Path | None = None) -> list[Path]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no Chromium found (Debian: apt-get install -y chromium): screenshots skipped")
        return []
    if mathjax is None:
        print("math shows as \\(...\\) source: MathJax comes from a CDN (offline here); "
              "--mathjax PATH/tex-mml-chtml.js renders it")
    from PIL import Image
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    made = []
    for page in pages:
        name = page.stem
        full = out / f"{name}-full.png"
        copy = page_copy(page, mathjax)
        try:
            height = page_height(browser, copy, width) + 40          # the whole page, in one window
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--window-size={width},{height}", "--virtual-time-budget=10000",
                            f"--screenshot={full}", copy.resolve().as_uri()],
                           check=True, capture_output=True, timeout=300)
        finally:
            copy.unlink()
        img = Image.open(full).convert("RGB")
        for n, top in enumerate(range(0, img.height, tile)):
            part = out / f"{name}-{n + 1:02d}.png"
            img.crop((0, top, img.width, min(top + tile, img.height))).save(part)
            made.append(part)
        full.unlink()
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", nargs="?", default="_build/html")
    ap.add_argument("--screenshots", metavar="DIR", default=None)
    ap.add_argument("--mathjax", metavar="JS", default=None, type=Path,
                    help="a local MathJax 3 tex-mml-chtml.js for the screenshots (offline); e.g. from "
                         "`npm pack mathjax@3`: package/es5/tex-mml-chtml.js")
    a = ap.parse_args(argv)
    root = Path(a.html)
    if not (root / "index.html").exists():
        print(f"no built book in {root}: run `make book` first")
        return 1
    pages = sorted(p for p in root.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts
                   and p.name not in ("genindex.html", "search.html"))
    found, ids_cache, warnings = [], {}, []
    for p in pages:
        found += check_page(p, root, ids_cache, warnings)
    for line in warnings:
        print("warning:", line)
    for line in found:
        print(line)
    print(f"checked {len(pages)} pages: {len(found)} problem(s), {len(warnings)} warning(s)")
    if a.screenshots:
        shown = [p for p in pages if p.parent.name in ("chapters", "book")]   # front matter too
        made = screenshots(root, Path(a.screenshots), shown, mathjax=a.mathjax)
        if made:
            print(f"{len(made)} screenshots in {a.screenshots}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
