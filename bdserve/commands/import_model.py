"""``bdserve import``: make a foreign classifier servable by writing a minimal card.json."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be numbers, e.g. 0.485,0.456,0.406") from None
    if len(vals) != 3:
        raise typer.BadParameter(f"{what} needs 3 values (one per channel), got {len(vals)}")
    return vals


def _classes(text: Optional[str]) -> Optional[list[str]]:
    """A file with one class name per line, or a comma-separated list."""
    if text is None:
        return None
    p = Path(text)
    names = p.read_text().splitlines() if p.is_file() else text.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise typer.BadParameter("--classes holds no names")
    return names


def import_model(source: Path, store: Path, *, name: str | None = None, classes: list[str] | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, defense: str | None = None,
                 version: str = "1", input_size: tuple[int, int] | None = None) -> Path:
    """Copy ``source`` (a model.onnx file, or a directory holding one) to STORE/NAME/model.onnx
    and write card.json there. Returns the model directory."""
    from bdserve.card import ModelCard
    from bdserve.serve.runtimes import OnnxRuntime
    from bdserve.specs import canonical_spec
    import torch

    src = source / "model.onnx" if source.is_dir() else source
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    name = name or (source.name if source.is_dir() else src.stem)
    dest = store / name
    dest.mkdir(parents=True, exist_ok=True)
    if src.resolve() != (dest / "model.onnx").resolve():
        shutil.copyfile(src, dest / "model.onnx")
        if (src.parent / (src.name + ".data")).exists():  # external weights of large exports
            shutil.copyfile(src.parent / (src.name + ".data"), dest / (src.name + ".data"))
    card = ModelCard.from_runtime(OnnxRuntime(dest / "model.onnx", torch.device("cpu")), name=name,
                                  input_size=input_size, classes=classes, mean=mean, std=std)
    card.version = version
    if defense is not None:
        card.defense = canonical_spec(defense)
    card.save(dest)
    return dest


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_cmd(
        source: Path = typer.Argument(..., help="A foreign model.onnx (any file name), or a directory holding model.onnx."),
        model_store: Optional[Path] = typer.Option(None, "--model-store", help="Where the model directory goes (default: $BDSERVE_MODEL_STORE or ./model_store)."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the directory name or the file's stem)."),
        classes: Optional[str] = typer.Option(None, "--classes", help="Class names: a file with one per line, or a comma-separated list (default: class_0, class_1, ...)."),
        mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean on the [0,1] scale when the graph does not normalise, e.g. 0.485,0.456,0.406."),
        std: Optional[str] = typer.Option(None, "--std", help="Per-channel std on the [0,1] scale, e.g. 0.229,0.224,0.225."),
        defense: Optional[str] = typer.Option(None, "--defense", help="Default defense to serve with (default: the card's default)."),
        version: str = typer.Option("1", "--version", help="Model version."),
        input_size: Optional[str] = typer.Option(None, "--input-size", help="HxW, when the graph's spatial size is dynamic."),
    ) -> None:
        """Write a minimal card.json for a foreign ONNX classifier (input shape from the graph)."""
        from bdserve.settings import model_store as default_store

        size = None
        if input_size:
            try:
                h, w = (int(v) for v in input_size.lower().split("x"))
                size = (h, w)
            except ValueError:
                raise typer.BadParameter("--input-size must look like 224x224") from None
        dest = import_model(source, model_store or default_store(), name=name, classes=_classes(classes),
                            mean=_floats(mean, "--mean"), std=_floats(std, "--std"), defense=defense,
                            version=version, input_size=size)
        typer.echo(f"wrote {dest / 'card.json'}")
