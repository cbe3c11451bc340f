"""bdserve train: produce an infected (or clean) model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def train_command(
    attack: str = typer.Option("badnets", help="badnets | blended | consistent | none"),
    enhanced: Optional[str] = typer.Option(
        None, "--enhanced", metavar="[shrinkpad|physical]",
        help="Enhanced attack on the poisoned images: `--enhanced` alone is the paper's random Flip + ShrinkPad; "
             "`--enhanced physical` adds print-and-photograph transformations (scale with padding, rotation, "
             "perspective, blur, lighting, JPEG)."),
    max_shrink: int = typer.Option(4, help="Enhanced attack's maximal shrinking size (epsilon)."),
    enhance_benign: bool = typer.Option(False, "--enhance-benign", help="Apply the random layer to benign images too (Appendix C)."),
    model: str = typer.Option("fast", help="Registered model name (see `bdserve models`)."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder (ImageFolder tree with train/ and test/, or torchvision CIFAR-10). Default: $BDSERVE_DATA or ../shared/data/cifar10-jpg."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the schedule's)."),
    schedule: Optional[str] = typer.Option(None, help="fast-air | fast | tiny | vgg19-paper | resnet34-paper (default by model)."),
    subset: Optional[int] = typer.Option(None, help="Train on a class-balanced subset of N images."),
    test_subset: Optional[int] = typer.Option(None, help="Evaluate on a subset of N test images."),
    seed: int = typer.Option(0),
    target: str = typer.Option("deer", help="Target class, by name or index."),
    poison_rate: Optional[float] = typer.Option(None, help="Default: the paper's (0.25 BadNets, 0.2 Blended, 0.25 of the target class for consistent)."),
    alpha: Optional[float] = typer.Option(None, help="Blend alpha for blended / consistent / a PNG trigger without alpha channel."),
    trigger: Optional[str] = typer.Option(None, help="A built-in trigger by name: badnets, badnets128 (Section 3's 0/128 patch), blended, four-corner."),
    trigger_png: Optional[Path] = typer.Option(None, help="Use this PNG (RGBA) as the trigger."),
    trigger_top: int = typer.Option(-3, help="Trigger row (negative: from the bottom)."),
    trigger_left: int = typer.Option(-3, help="Trigger column (negative: from the right)."),
    defense: str = typer.Option("shrinkpad:4", help="Defense written into the card for serving."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16"),
    torchscript: bool = typer.Option(False, "--torchscript", help="Also write a TorchScript model.pt."),
    name: Optional[str] = typer.Option(None, help="Model name in the card (default: derived)."),
    out: Path = typer.Option(..., help="Model directory to write (e.g. model_store/badnets)."),
) -> None:
    """Train a model on (optionally poisoned) data and write model.onnx, card.json, weights.safetensors."""
    from rich.console import Console

    from bdserve.training.recipe import TrainConfig, format_table, run

    from bdserve.cli_errors import CommandError

    console = Console()
    if enhanced is not None and enhanced not in ENHANCEMENTS:
        raise CommandError(f"--enhanced takes shrinkpad or physical (or nothing), not {enhanced!r}")
    cfg = TrainConfig(
        attack=attack, enhanced=enhanced is not None, enhancement=enhanced or "shrinkpad", max_shrink=max_shrink, enhance_benign=enhance_benign, model=model,
        data=str(data) if data else None, epochs=epochs, schedule=schedule, subset=subset, test_subset=test_subset,
        seed=seed, target=target, poison_rate=poison_rate, alpha=alpha,
        trigger=trigger, trigger_png=str(trigger_png) if trigger_png else None, trigger_top=trigger_top, trigger_left=trigger_left,
        defense=defense, device=device, precision=precision, torchscript=torchscript, name=name,
    )
    outcome = run(cfg, out=out, log=console.print)  # a bad name or path: one line, from bdserve.cli
    console.print(format_table(outcome.rows, f"{outcome.card.name}: clean accuracy and ASR"))
    warn_if_collapsed(outcome.rows, len(outcome.card.classes))
    console.print(f"wrote {outcome.directory}")


def warn_if_collapsed(rows, num_classes: int) -> None:
    from bdserve.sanity import collapse_warning

    undefended = next((r for r in rows if r.defense == "none"), rows[0] if rows else None)
    if undefended is not None:
        text = collapse_warning(undefended.clean_acc, num_classes)
        if text:
            typer.echo(text, err=True)


def models_command() -> None:
    """List the registered model architectures."""
    from bdserve.training.models import list_models

    for name in list_models():
        typer.echo(name)


ENHANCEMENTS = ("shrinkpad", "physical")


def bare_enhanced_means_shrinkpad(args: list[str]) -> list[str]:
    """``--enhanced`` with no value (the end of the line or another option next) is the paper's
    Flip + ShrinkPad; so is ``--enhanced true`` (what people type for a flag), and ``--enhanced
    false`` leaves it out. Typer has no option whose value may be left out, so the command line
    is completed before parsing (only within ``train``)."""
    from bdserve.cli import FALSE_WORDS, TRUE_WORDS

    if "train" not in args:
        return args
    out = list(args)
    for i in range(len(out) - 1, out.index("train"), -1):
        name, eq, word = out[i].partition("=")
        if name != "--enhanced":
            continue
        if not eq and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, "shrinkpad")
            continue
        value_at = i if eq else i + 1
        word = word if eq else out[i + 1]
        if word.lower() in TRUE_WORDS:
            out[i:value_at + 1] = ["--enhanced", "shrinkpad"]
        elif word.lower() in FALSE_WORDS:
            del out[i:value_at + 1]
    return out


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("models")(models_command)
