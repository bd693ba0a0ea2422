"""The chapters' helper module: throwaway results folders under `tiny` do not outlive the kernel."""
import subprocess
import sys
from pathlib import Path


def test_tiny_results_folder_is_removed_at_exit():
    code = ("from specdec_lib.notebook import results_dir\n"
            "d = results_dir('00_test', 'tiny')\n"
            "(d / 'x.json').write_text('{}')\n"
            "print(d)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("specdec-00_test-") and not folder.exists()


def test_local_cost_curve_follows_the_device(capsys, monkeypatch):
    """Chapters 2-4 read the curve of the kind of machine they run on: cpu_* on a CPU (the default
    here), gpu_* on a GPU; without a gpu_* curve of this machine, a GPU takes the stored H200 curve of the
    same shapes (the CPU one only where none is stored), saying whose it is."""
    from specdec_lib.notebook import local_cost_curve
    name, curve = local_cost_curve("small")
    assert name == "cpu_small_target" and curve["k"][0] == 1
    monkeypatch.setattr("specdec_lib.notebook.machine_description", lambda device: "some GPU")
    name, _ = local_cost_curve("small", "draft", device="cuda")   # no gpu_small_draft stored
    assert name == "h200_small_draft" and "another machine" in capsys.readouterr().out
    assert local_cost_curve("qwen7b", device="cuda")[0] == "h200_7b_shapes_target"
    assert local_cost_curve("qwen7b", "draft", device="cuda")[0] == "h200_small_draft"
    assert local_cost_curve("qwen7b", "draft", device="cpu")[0] == "cpu_small_draft"
