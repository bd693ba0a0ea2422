"""tools/clean_notebooks.py and tools/check_book.py on tiny synthetic notebooks and pages."""
import json

from tests.helpers import load_tool

clean_nb = load_tool("clean_notebooks")
check_book = load_tool("check_book")
BOOT = clean_nb.bootstrap_cell("https://example.org/course", "main")


def _code(src, outputs=(), tags=None):
    meta = {"tags": tags} if tags else {"execution": {"iopub.status.busy": "x"}}
    return {"cell_type": "code", "execution_count": 1, "metadata": meta, "outputs": list(outputs), "source": src}


def _nb(cells):
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3"}, "widgets": {}}, "nbformat": 4,
            "nbformat_minor": 5}


FIG = {"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}, "metadata": {}}
BAR = {"output_type": "display_data", "data": {"text/plain": "cost curve:  43%|####3     | 3/7 [00:01<00:02]"},
       "metadata": {}}


def test_clean_fixes_what_it_can():
    nb = _nb([_code("import x"), _code("# NBVAL_CHECK_OUTPUT\nprint(1)", [BAR]),
              _code("plot()", [FIG]), _code("explore(rows);")])
    out = clean_nb.clean(nb, BOOT)
    cells = out["cells"]
    assert cells[0]["source"] == BOOT                       # the install cell, inserted
    assert cells[2]["metadata"]["tags"] == ["nbval-check-output"] and "NBVAL" not in cells[2]["source"]
    assert cells[2]["outputs"] == []                        # the frozen progress bar is gone
    assert cells[4]["metadata"]["tags"] == ["widget"]
    assert clean_nb.problems(out, BOOT) == []


def test_check_rejects_what_cleaning_cannot_fix():
    path_out = {"output_type": "stream", "name": "stdout", "text": "reading /home/alice/course/x.json\n"}
    err = {"output_type": "error", "ename": "ValueError", "evalue": "x", "traceback": ["Traceback ..."]}
    nb = _nb([_code(BOOT), _code("print(OUT)", [path_out]), _code("boom()", [err]),
              _code("explore(rows);", tags=["widget"])])
    found = " | ".join(clean_nb.problems(nb, BOOT))
    assert "absolute path '/home/alice" in found
    assert "error output" in found
    assert "no static figure" in found
    wrong_url = _nb([_code(clean_nb.bootstrap_cell("https://elsewhere.org/x", "main"))])
    assert "install cell" in " ".join(clean_nb.problems(wrong_url, BOOT))


def _page(cells_html):
    return ("<html><body><a href=\"other.html#there\">x</a>"
            + "".join(f'<div class="cell{cls} docutils container">{body}</div>' for cls, body in cells_html)
            + "</body></html>")


def test_check_book_pages(tmp_path):
    (tmp_path / "index.html").write_text("<html><body>home</body></html>")
    ch = tmp_path / "chapters"
    ch.mkdir()
    (ch / "other.html").write_text('<html><body><span id="there"></span></body></html>')
    good = _page([("", '<div class="cell_input">plot()</div><div class="cell_output"><img src="x.png"></div>'),
                  (" tag_widget", '<div class="cell_input">explore(rows)</div>'
                                  '<div class="cell_output">Live controls: ...</div>')])
    (ch / "x.png").write_bytes(b"png")
    (ch / "good.html").write_text(good)
    assert check_book.check_page(ch / "good.html", tmp_path, {}) == []
    bad = _page([("", '<div class="cell_input">x</div><div class="cell_output">'
                      'Traceback (most recent call last) at /work/main/x.py 45%|####  | 3/7</div>'),
                 (" tag_widget", '<div class="cell_input">explore(rows)</div>')]).replace("#there", "#gone")
    (ch / "bad.html").write_text(bad)
    found = " | ".join(check_book.check_page(ch / "bad.html", tmp_path, {}))
    for what in ("absolute path", "Traceback", "progress-bar", "no static figure", "shows nothing",
                 "missing anchor"):
        assert what in found, what


def test_check_book_long_code_lines_math_and_markers(tmp_path, monkeypatch):
    (tmp_path / "index.html").write_text("<html><body>home</body></html>")
    ch = tmp_path / "chapters"
    ch.mkdir()
    (ch / "other.html").write_text('<html><body><span id="there"></span></body></html>')
    ok_line = "x = 1" + " " * 80 + "# fits"
    long_line = "y = " + "1 + " * 30 + "1"
    good = _page([("", f'<div class="cell_input"><pre>{ok_line}\nz = 2</pre></div>'
                       '<div class="cell_output"><p>cost <span class="math notranslate">\\(a_i\\)</span>'
                       '</p><pre>printed $x$ {glue:text}`k` TODO</pre></div>')])
    (ch / "good.html").write_text(good)
    assert check_book.check_page(ch / "good.html", tmp_path, {}) == []
    bad = _page([("", f'<div class="cell_input"><pre>{long_line}</pre></div>'
                      '<div class="cell_output"><p><em>Figure.</em> acceptance $a_i$ per position</p>'
                      '</div>')]) + "<p>see {glue:text}`ch9_x`</p>"
    bad = bad.replace("</body>", '<div class="cell docutils container"><div class="cell_input">'
                      'glue("k", 1.0, ".1f")</div><div class="cell_output"><pre>\'1.0\'</pre></div>'
                      '</div></body>')
    (ch / "bad.html").write_text(bad)
    found = " | ".join(check_book.check_page(ch / "bad.html", tmp_path, {}))
    for what in ("code line(s) over 95", "math that did not render", "leftover marker",
                 "shows the value '1.0'"):
        assert what in found, what
    # a chapter listed in WARN_ONLY (one waiting to be re-executed): long lines are a warning only
    monkeypatch.setattr(check_book, "WARN_ONLY", ("07_pard",))
    (ch / "07_pard.html").write_text(_page([("", f'<div class="cell_input"><pre>{long_line}</pre></div>')]))
    warnings = []
    assert check_book.check_page(ch / "07_pard.html", tmp_path, {}, warnings) == []
    assert len(warnings) == 1 and "over 95" in warnings[0]
