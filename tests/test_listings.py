"""Every chapter shows the library it teaches with inspect.getsource, and its stored outputs are what the
book shows: a listing that no longer matches specdec_lib/ means chapter and library have drifted (re-run
the chapter, or SPECDEC_REUSE=1 for a cheap refresh of its stored outputs)."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9]*.ipynb"))
LIBRARY_LINES = {line.rstrip() for f in (ROOT / "specdec_lib").rglob("*.py")
                 for line in f.read_text().splitlines()}


def listing_cells(nb):
    """(cell index, printed text) of code cells that only print library source."""
    for i, cell in enumerate(nb["cells"]):
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        lines = [x.strip() for x in src.splitlines() if x.strip() and not x.strip().startswith("#")]
        if cell["cell_type"] != "code" or not lines or not all("inspect.getsource(" in x for x in lines):
            continue
        text = "".join("".join(o["text"]) if isinstance(o["text"], list) else o["text"]
                       for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        yield i, text


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_stored_listings_match_the_library(path):
    nb = json.loads(path.read_text())
    stale = [(i, line) for i, text in listing_cells(nb) for line in text.splitlines()
             if line.strip() and line.rstrip() not in LIBRARY_LINES]
    assert not stale, (f"{path.name}: a stored source listing differs from specdec_lib/ (cell {stale[0][0]}: "
                       f"{stale[0][1].strip()[:80]!r}, {len(stale)} lines): re-run the chapter")
