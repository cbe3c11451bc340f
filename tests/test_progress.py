"""Progress bars on an 80-column terminal keep their counts whole, whatever the description."""

import os
import subprocess
import sys

SCRIPT = """
from bdserve.progress import progress_bar
with progress_bar("decoding /a/very/long/path/to/the/shared/data/folder/cifar10-jpg/train", total=50000) as adv:
    for _ in range(5):
        adv(10000, loss="1.234", acc="0.512")
"""


def test_counts_survive_a_long_description_at_80_columns():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "BDSERVE_PROGRESS": "1", "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert "50000/50000" in text and "ifar10-jpg/train" in text  # the end of the path, not its middle
    lines = [line for line in text.splitlines() if "50000/50000" in line]
    assert lines and all(len(line.rstrip()) <= 80 for line in lines)
