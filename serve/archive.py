"""Pack a model directory into a TorchServe .mar (``bdserve archive``).

The archive holds the model (model.onnx, or a TorchScript model.pt), card.json (and
STRIP's overlays when the model is calibrated), a model-config.yaml (TorchServe's batching
and worker settings, plus the defense and trigger detectors the handler serves with) and
serve/torchserve_handler.py. The handler imports
``bdserve`` from the Python environment TorchServe runs in: install bdserve into
that environment (``pip install bdserve[torchserve]``). No copy of the pipeline is
vendored into the archive, so the .mar and ``bdserve serve`` cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HANDLER_FILE = Path(__file__).resolve().parent / "torchserve_handler.py"
MODEL_CONFIG_FILE = "model-config.yaml"
MODEL_FILES = ("model.onnx", "model.pt")  # preferred first, the same order the pipeline uses
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ArchiveError(RuntimeError):
    """The model directory cannot be archived (missing files, bad name, archiver failed)."""


@dataclass
class ArchiveResult:
    path: Path
    name: str
    version: str
    defense: str | None
    files: list[str]
    seconds: float

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def _model_config_yaml(*, defense: str | None, batch_size: int, max_batch_delay_ms: int,
                       workers: int, response_timeout_s: int, detect: str | None = None,
                       on_suspect: str = "flag") -> str:
    # Hand-written YAML (flat scalars only) so that archiving needs no yaml library.
    lines = [
        "# TorchServe model configuration, written by `bdserve archive`.",
        f"minWorkers: {workers}",
        f"maxWorkers: {workers}",
        f"batchSize: {batch_size}",
        f"maxBatchDelay: {max_batch_delay_ms}",
        f"responseTimeout: {response_timeout_s}",
        "# Read by bdserve's handler (context.model_yaml_config['handler']).",
        "handler:",
    ]
    if defense is not None:
        lines.append(f"  defense: {json.dumps(defense)}")  # a JSON string is a valid YAML scalar
    else:
        lines.append("  defense: null  # the card's default")
    if detect:  # calibrated trigger detectors, as `bdserve serve --detect`
        lines += [f"  detect: {json.dumps(detect)}", f"  on_suspect: {json.dumps(on_suspect)}"]
    return "\n".join(lines) + "\n"


def build_archive(
    model_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    name: str | None = None,
    version: str | None = None,
    defense: str | None = None,
    batch_size: int = 32,
    max_batch_delay_ms: int = 5,
    workers: int = 1,
    response_timeout_s: int = 120,
    detect: str | None = None,
    on_suspect: str = "flag",
    force: bool = True,
    check: bool = True,
    status: Callable[[str], None] | None = None,
) -> ArchiveResult:
    """Write ``<out_dir>/<name>.mar`` (default: inside the model directory, beside model.onnx).

    ``detect`` names calibrated trigger detectors the handler runs on every image, and
    ``on_suspect`` what it does with a flagged one, as ``bdserve serve --detect/--on-suspect``."""
    say = status or (lambda _msg: None)
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArchiveError(f"{model_dir} is not a model directory")
    model_file = next((model_dir / f for f in MODEL_FILES if (model_dir / f).is_file()), None)
    if model_file is None:
        raise ArchiveError(f"{model_dir} holds neither {' nor '.join(MODEL_FILES)}")
    card_file = model_dir / "card.json"

    card_version = None
    if card_file.is_file():
        from bdserve.card import ModelCard

        card = ModelCard.load(card_file)  # validates the card before it is shipped
        name = name or card.name
        card_version = card.version
    name = name or model_dir.name
    version = version or card_version or "1"
    if not _NAME_RE.match(name):
        raise ArchiveError(f"model name {name!r} is not usable as a TorchServe model name")
    if defense is not None and not check:
        from bdserve.specs import canonical_spec

        try:
            canonical_spec(defense)  # fail here, not in the TorchServe worker
        except ValueError as e:
            raise ArchiveError(f"--defense: {e}") from None
    if on_suspect not in ("flag", "reject"):
        raise ArchiveError(f"on-suspect must be flag or reject, not {on_suspect!r}")
    if on_suspect == "reject" and not detect:
        raise ArchiveError("--on-suspect reject needs --detect METHOD")
    if check:
        # Build the very pipeline the handler will build: a model or card it cannot load,
        # or a defense that cannot run on this input size, fails now and not in a worker loop.
        say(f"checking that {model_dir} loads with defense {defense or 'from the card'}")
        from bdserve.serve.pipeline import DefendedModel

        try:
            DefendedModel.load(model_dir, defense=defense, device="cpu", detect=detect)
        except Exception as e:  # noqa: BLE001 - any load failure means an unusable archive
            raise ArchiveError(f"{model_dir} does not load as a bdserve model: {e}") from None
    if batch_size < 1 or workers < 1 or max_batch_delay_ms < 0:
        raise ArchiveError("batch size and workers must be >= 1, max batch delay >= 0")

    out = Path(out_dir) if out_dir is not None else model_dir
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.mar"
    if target.exists() and not force:
        raise ArchiveError(f"{target} exists (pass force=True to overwrite)")

    from bdserve.serve.detection import OVERLAYS_FILE

    extra = [f for f in ("card.json", OVERLAYS_FILE) if (model_dir / f).is_file()]  # the calibration travels along
    files = [model_file.name] + extra + [MODEL_CONFIG_FILE]
    say(f"packing {', '.join(files)} + handler into {target}")
    with tempfile.TemporaryDirectory(prefix="bdserve-archive-") as tmp:
        cfg = Path(tmp) / MODEL_CONFIG_FILE
        cfg.write_text(_model_config_yaml(defense=defense, batch_size=batch_size,
                                          max_batch_delay_ms=max_batch_delay_ms, workers=workers,
                                          response_timeout_s=response_timeout_s, detect=detect,
                                          on_suspect=on_suspect))
        cmd = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name,
            "--version", str(version),
            "--serialized-file", str(model_file),
            "--handler", str(HANDLER_FILE),
            "--config-file", str(cfg),
            "--export-path", str(out),
        ]
        if extra:
            cmd += ["--extra-files", ",".join(str(model_dir / f) for f in extra)]
        if force:
            cmd.append("--force")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except FileNotFoundError as e:  # pragma: no cover - sys.executable always exists
            raise ArchiveError(str(e)) from None
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()
            if "No module named model_archiver" in err:
                err = "torch-model-archiver is not installed: pip install 'bdserve[torchserve]'"
            raise ArchiveError(f"torch-model-archiver failed: {err[-2000:]}")
    if not target.is_file():
        raise ArchiveError(f"torch-model-archiver reported success but {target} is missing")
    say(f"wrote {target}")
    return ArchiveResult(path=target, name=name, version=str(version), defense=defense,
                         files=files + [HANDLER_FILE.name], seconds=time.perf_counter() - t0)


def which_torchserve() -> str | None:
    """The torchserve launcher of this environment (the one whose python will run the handler)."""
    cand = Path(sys.executable).parent / "torchserve"
    if cand.is_file():
        return str(cand)
    return shutil.which("torchserve")
