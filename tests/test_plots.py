"""Figure captions: provenance named once per source (specdec_lib/plots.py)."""
from specdec_lib.plots import caption_text, provenance

ROW = dict(machine="AMD EPYC, 2 cores", model="m", dtype="bfloat16", profile="small")


def test_provenance_names_each_source_once():
    assert provenance([ROW, dict(ROW)]) == "AMD EPYC, 2 cores · m · bfloat16 · profile small"
    # rows of one run with and without the instruction set: one source, with it
    both = provenance([ROW, dict(ROW, isa="AVX512")])
    assert both == "AMD EPYC, 2 cores, AVX512 · m · bfloat16 · profile small"
    mixed = provenance([ROW, dict(ROW, machine="NVIDIA H200", profile="h200", note="predicted")])
    assert mixed == ("AMD EPYC, 2 cores · m · bfloat16 · profile small; "
                     "NVIDIA H200 · m · bfloat16 · profile h200 (predicted)")


def test_caption_text():
    assert caption_text("A figure.", [ROW]) == (
        "*Figure.* A figure. Data: AMD EPYC, 2 cores · m · bfloat16 · profile small.")
    assert caption_text("No data") == "*Figure.* No data."


def test_plot_sweep_x_label():
    import matplotlib
    matplotlib.use("Agg")
    from specdec_lib.plots import plot_sweep
    rows = [dict(method="pard", category="all", draft_len=k, acceptance_rate=0.5, mean_accepted_len=1.5,
                 speedup=1.2) for k in (2, 4)]
    assert plot_sweep(rows).axes[-1].get_xlabel() == "draft length g (tokens)"
    fig = plot_sweep(rows, xlabel="draft length k (tokens)")
    assert fig.axes[-1].get_xlabel() == "draft length k (tokens)" and "k (tokens)" in fig.axes[0].get_title()
