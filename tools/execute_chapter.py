"""Execute a chapter notebook as `jupyter nbconvert --execute` would, except its widget cells.

    SPECDEC_PROFILE=small python tools/execute_chapter.py chapters/05_medusa.ipynb /tmp/x/05_medusa.ipynb

Why: on the course's 2-core machine, nbconvert sometimes never returns from a chapter's closing
`interact(...)` cell: the kernel has run it and sits idle, and the client waits on its sockets until
the cell timeout (seen three times in chapters 5 and 6; a second client connected to the kernel
showed the widget cell as its last input). A widget cell's stored output is only the text of
`live_note()` (tools/clean_notebooks.py drops the interact box), so here those cells keep their
stored outputs and are not run; nbval runs them in CI under `tiny`. Every other cell runs in
order in one kernel, with the same per-cell timeout as the documented nbconvert command.
"""
import sys
import time

import nbformat
from nbclient import NotebookClient


class SkipWidgets(NotebookClient):
    """nbclient's client, except that widget cells keep their stored outputs, and that after every
    other cell its time goes to stderr and the notebook so far to `dst`: a run killed at a time limit
    (a leased GPU's call) still leaves the cells it ran and how long each took."""

    def __init__(self, nb, dst: str, **kw):
        super().__init__(nb, **kw)
        self.dst = dst

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        if "widget" in cell.get("metadata", {}).get("tags", []):
            return cell                  # stored output kept (live_note's text)
        if cell.cell_type != "code":
            return cell
        t0 = time.perf_counter()
        out = await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        print(f"cell {cell_index}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        nbformat.write(self.nb, self.dst)
        return out


def main(src: str, dst: str) -> None:
    nb = nbformat.read(src, as_version=4)
    SkipWidgets(nb, dst, timeout=900, kernel_name="python3", resources={"metadata": {"path": "chapters"}}).execute()
    nbformat.write(nb, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
