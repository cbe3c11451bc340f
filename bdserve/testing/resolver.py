"""What pip would install into a fresh environment, asked of pip itself without installing.

``pip install --dry-run --ignore-installed --report -`` runs the real resolver against the
configured indexes and prints the distributions an empty environment would get; the co-install
test and bench/install_sizes.py both read it from here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

_VERSIONS = re.compile(r"^Available versions:\s*(.+)$", re.MULTILINE)


def resolve(*requirements: str, timeout: float = 600) -> dict[str, str]:
    """{distribution name (lower case): version} that installing ``requirements`` together into an empty
    environment would give. Raises ``RuntimeError`` with pip's own explanation when they cannot be resolved."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
         *requirements], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        errors = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING: Location"))
        raise RuntimeError(f"pip cannot install {' '.join(requirements)} together:\n{errors[-4000:]}")
    report = json.loads(proc.stdout)
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}


def newest(name: str, timeout: float = 120) -> str:
    """The newest version of ``name`` that the configured indexes offer (``pip index versions``)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                          capture_output=True, text=True, timeout=timeout, check=True)
    found = _VERSIONS.search(proc.stdout)
    if not found:
        raise RuntimeError(f"pip lists no versions of {name}: {proc.stdout[-500:]}")
    return found.group(1).split(",")[0].strip()
