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
