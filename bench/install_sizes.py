"""Installed size of bdserve with each extra, computed without building an image.

For each extra, pip resolves ``bdserve[EXTRA]`` (``pip install --dry-run --ignore-installed
--report``: the distributions a fresh environment would get, on this machine's indexes) and
the size of each distribution is read from its RECORD in the current environment, which holds
all of them (the dev install). Writes bench/results/install_sizes.json and prints a table.

    .venv/bin/python bench/install_sizes.py serve train all [--cpu-torch-wheel PATH]

The dev environment's torch is PyPI's CUDA build (torch + triton + nvidia-* wheels, most of the
total); the serving images install the CPU build instead. So each extra is also reported
without that CUDA stack, and, given a CPU torch wheel, with its unpacked size in place.
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from bdserve.testing.resolver import resolve

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "install_sizes.json"
CUDA_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$", re.IGNORECASE)  # PyPI's CUDA torch and what it pulls in


def installed_bytes(name: str) -> tuple[int, str | None]:
    """Bytes of one installed distribution's files (its RECORD), and its installed version."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return 0, None
    total = 0
    for f in dist.files or []:
        if f.size is not None:
            total += f.size
        else:
            p = Path(f.locate())
            total += p.stat().st_size if p.is_file() else 0
    return total, dist.version


def wheel_bytes(path: Path) -> int:
    """Unpacked size of a wheel (what installing it puts on disk, before bytecode)."""
    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist())


def measure(extra: str, cpu_torch_mb: float | None) -> dict:
    rows, missing = [], []
    for name, version in resolve(f"{REPO}[{extra}]").items():
        if name == "bdserve":
            continue  # the project itself (editable here; a few hundred kB as a wheel)
        size, have = installed_bytes(name)
        if have is None:
            missing.append(f"{name}=={version}")
            continue
        rows.append({"name": name, "resolved": version, "installed": have, "mb": round(size / 1e6, 1)})
    rows.sort(key=lambda r: -r["mb"])
    total = sum(r["mb"] for r in rows)
    without_cuda = sum(r["mb"] for r in rows if not CUDA_STACK.match(r["name"]))
    out = {"extra": extra, "distributions": len(rows), "total_mb": round(total, 1),
           "without_cuda_torch_mb": round(without_cuda, 1), "not_in_this_environment": missing,
           "largest": rows[:8], "all": rows}
    if cpu_torch_mb is not None:
        out["with_cpu_torch_mb"] = round(without_cuda + cpu_torch_mb, 1)
    return out


def main(argv: list[str]) -> None:
    cpu_wheel = None
    if "--cpu-torch-wheel" in argv:
        i = argv.index("--cpu-torch-wheel")
        cpu_wheel, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    cpu_torch_mb = wheel_bytes(cpu_wheel) / 1e6 if cpu_wheel else None
    results = [measure(e, cpu_torch_mb) for e in (argv or ["serve", "train", "all"])]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"python": sys.version.split()[0], "cpu_torch_wheel": cpu_wheel and cpu_wheel.name,
                               "cpu_torch_mb": cpu_torch_mb and round(cpu_torch_mb, 1), "results": results},
                              indent=1) + "\n")
    for r in results:
        top = ", ".join(f"{x['name']} {x['mb']:.0f}" for x in [y for y in r["all"] if not CUDA_STACK.match(y["name"])][:5])
        cpu = f", {r['with_cpu_torch_mb']:.0f} MB with CPU torch" if "with_cpu_torch_mb" in r else ""
        print(f"bdserve[{r['extra']}]: {r['distributions']} distributions, {r['total_mb']:.0f} MB with PyPI's CUDA "
              f"torch, {r['without_cuda_torch_mb']:.0f} MB without it{cpu} (largest others: {top} MB)"
              + (f"; not installed here: {', '.join(r['not_in_this_environment'])}" if r["not_in_this_environment"] else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
