"""Triton's perf_analyzer, fetched for the tests without installing anything system-wide.

The binary ships only in tritonclient's manylinux wheels up to the 2.4x series (today's wheel is
pure Python, and the PyPI project ``perf-analyzer`` is a placeholder). It links two libraries a
plain machine lacks: libb64 (Debian's ``libb64-0d``, unpacked with ``dpkg -x``, not installed) and
the CUDA runtime, loaded even for CPU-only runs (``nvidia-cuda-runtime-cu12``'s wheel).
Everything lands in one cache folder; ``fetch`` says exactly what failed when a piece cannot be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEEL = "tritonclient==2.41.1"  # the last series whose manylinux wheel carries bin/perf_analyzer
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12"
LIBB64 = "libb64-0d"


class Unavailable(RuntimeError):
    """A piece of perf_analyzer could not be fetched here; the message names the piece and why."""


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    library_path: str  # for LD_LIBRARY_PATH

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (self.library_path, env.get("LD_LIBRARY_PATH")) if p)
        return env

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env(),
                              timeout=timeout)


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bdserve" / "perf_analyzer"


def _pip_download(requirement: str, into: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
         "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64", "--python-version", "3.11",
         "-d", str(into), requirement], capture_output=True, text=True, timeout=600)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("WARNING: Location"))
        raise Unavailable(f"pip download {requirement} failed: {reason.strip()[-800:] or 'no wheel'}")
    return wheels[0]


def _binary(cache: Path) -> Path:
    target = cache / "bin" / "perf_analyzer"
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(WHEEL, Path(tmp))
            with zipfile.ZipFile(wheel) as z:
                names = [n for n in z.namelist() if n.endswith("/bin/perf_analyzer")]
                if not names:
                    raise Unavailable(f"{wheel.name} carries no bin/perf_analyzer")
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(names[0]) as src, open(target.with_suffix(".part"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            target.with_suffix(".part").chmod(0o755)
            target.with_suffix(".part").rename(target)
    return target


def _cuda_runtime(cache: Path) -> Path:
    lib = cache / "cuda" / "nvidia" / "cuda_runtime" / "lib"
    if not lib.exists():
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(CUDA_RUNTIME, Path(tmp))
            with zipfile.ZipFile(wheel) as z:
                z.extractall(cache / "cuda")
    if not any(lib.glob("libcudart.so*")):
        raise Unavailable(f"{CUDA_RUNTIME} holds no libcudart.so under {lib}")
    return lib


def _libb64(cache: Path) -> Path:
    lib = cache / "libb64" / "usr" / "lib" / "x86_64-linux-gnu"
    if not any(lib.glob("libb64.so*")):
        for tool in ("apt-get", "dpkg"):
            if shutil.which(tool) is None:
                raise Unavailable(f"libb64 comes from Debian's {LIBB64} package and {tool} is not on this machine")
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(["apt-get", "download", LIBB64], cwd=tmp, capture_output=True, text=True,
                                  timeout=300)
            debs = list(Path(tmp).glob("*.deb"))
            if proc.returncode != 0 or not debs:
                raise Unavailable(f"apt-get download {LIBB64} failed: {proc.stderr.strip()[-500:]}")
            subprocess.run(["dpkg", "-x", str(debs[0]), str(cache / "libb64")], check=True, timeout=120)
    return lib


def fetch(cache: Path | None = None) -> PerfAnalyzer:
    """perf_analyzer and its two libraries in ``cache`` (fetched once), checked by running ``--help``."""
    cache = cache or default_cache()
    pa = PerfAnalyzer(_binary(cache), os.pathsep.join(str(p) for p in (_libb64(cache), _cuda_runtime(cache))))
    probe = pa.run("--help", timeout=60)
    if "error while loading shared libraries" in probe.stderr:
        raise Unavailable(f"perf_analyzer does not start here: {probe.stderr.strip()[-500:]}")
    return pa
