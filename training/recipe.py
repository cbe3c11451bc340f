"""One training run end to end: data -> poisoning -> model -> training -> evaluation -> model directory.

``bdserve train``, ``bdserve demo`` and the experiments all go through ``run``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bdserve.card import ModelCard
from bdserve.settings import cache_dir, data_dir, pick_device
from bdserve.training import export
from bdserve.training.consistent import pgd_perturb
from bdserve.training.data import ImageSet, class_index, load_split
from bdserve.training.evaluate import PAPER_DEFENSES, DefenseRow, evaluate_defenses, metrics_dict
from bdserve.training.models import CIFAR_MEAN, CIFAR_STD, create_model
from bdserve.training.poison import AttackConfig, choose_poisoned, default_attack
from bdserve.training.trainer import SCHEDULES, default_schedule, is_main_process, train
from bdserve.transforms.triggers import Trigger, builtin_trigger


@dataclass
class TrainConfig:
    attack: str = "badnets"
    enhanced: bool = False
    max_shrink: int = 4
    enhance_benign: bool = False
    enhancement: str = "shrinkpad"  # with enhanced: "shrinkpad" (Flip + ShrinkPad) or "physical"
    model: str = "fast"
    data: str | None = None  # None: bdserve.settings.data_dir()
    epochs: int | None = None  # None: the schedule's
    schedule: str | None = None  # None: by model
    subset: int | None = None  # training images (class-balanced); None: all
    test_subset: int | None = None
    seed: int = 0
    target: str = "deer"
    poison_rate: float | None = None
    alpha: float | None = None
    trigger_png: str | None = None
    trigger: str | None = None  # a built-in trigger by name (e.g. badnets128, Section 3's 0/128 patch)
    trigger_top: int = -3
    trigger_left: int = -3
    device: str = "auto"
    precision: str = "auto"
    surrogate_epochs: int | None = None
    surrogate: str | None = None  # a clean model directory to use as the label-consistent surrogate
    defense: str = "shrinkpad:4"  # what the card tells the server to apply
    defenses: tuple[str, ...] = PAPER_DEFENSES
    torchscript: bool = False
    name: str | None = None
    version: str = "1"
    extra_card: dict = field(default_factory=dict)


@dataclass
class TrainOutcome:
    model: torch.nn.Module
    card: ModelCard
    rows: list[DefenseRow]
    directory: Path | None


def build_attack(cfg: TrainConfig, classes: list[str], image_size: int) -> AttackConfig:
    trigger = None
    if cfg.trigger_png and cfg.trigger:
        raise ValueError("give --trigger or --trigger-png, not both")
    if cfg.trigger:
        trigger = builtin_trigger(cfg.trigger)
    if cfg.trigger_png:
        trigger = Trigger.from_png(cfg.trigger_png, cfg.trigger_top, cfg.trigger_left, alpha=cfg.alpha)
    return default_attack(
        cfg.attack,
        class_index(classes, cfg.target),
        enhanced=cfg.enhanced,
        max_shrink=cfg.max_shrink,
        enhance_benign=cfg.enhance_benign,
        enhancement=cfg.enhancement,
        poison_rate=cfg.poison_rate,
        trigger=trigger,
        image_size=image_size,
        alpha=cfg.alpha,
    )


def label_consistent_images(cfg: TrainConfig, train_set: ImageSet, attack: AttackConfig, device) -> torch.Tensor:
    """Train a clean surrogate, then PGD-perturb the images the attack will poison.

    The result depends only on the data, the surrogate's recipe and the seed, so it is
    cached (safetensors) and shared by a consistent attack and its enhanced version.
    """
    key = hashlib.sha256(json.dumps([
        cfg.data, cfg.subset, cfg.seed, cfg.model, cfg.schedule, cfg.epochs, cfg.surrogate_epochs, cfg.target,
        *([str(Path(cfg.surrogate).resolve())] if cfg.surrogate else []),
        attack.poison_rate, attack.pgd_eps, attack.pgd_steps, len(train_set), int(train_set.images[:64].sum()),
    ]).encode()).hexdigest()[:16]
    cached = cache_dir() / f"consistent-pgd-{key}.safetensors"
    if cached.exists():
        return load_file(str(cached))["images"]
    if cfg.surrogate:
        surrogate = load_surrogate(Path(cfg.surrogate), len(train_set.classes))
    else:
        surrogate = train_surrogate(cfg, train_set, attack, device)
    mask = choose_poisoned(train_set.labels, attack, cfg.seed)
    perturbed = pgd_perturb(surrogate, train_set.images[mask], train_set.labels[mask], eps=attack.pgd_eps,
                            steps=attack.pgd_steps, device=device, seed=cfg.seed)
    save_file({"images": perturbed}, str(cached))
    return perturbed


def load_surrogate(directory: Path, num_classes: int) -> torch.nn.Module:
    """A trained clean model directory (card.json + weights.safetensors) as the PGD surrogate."""
    card, model = export.load_trained(directory, num_classes)
    if card.attack:
        raise ValueError(f"the surrogate {directory} must be a clean model; its card names an attack")
    return model


def train_surrogate(cfg: TrainConfig, train_set: ImageSet, attack: AttackConfig, device) -> torch.nn.Module:
    surrogate = create_model(cfg.model if cfg.model != "resnet34" else "fast", num_classes=len(train_set.classes))
    schedule_name = cfg.schedule or default_schedule(cfg.model)
    epochs = cfg.surrogate_epochs or max(1, (cfg.epochs or SCHEDULES[schedule_name].epochs) // 2)
    schedule = SCHEDULES[schedule_name].with_epochs(epochs)
    clean = AttackConfig("none", None, attack.target, 0.0)
    train(surrogate, train_set, clean, schedule, device=device, seed=cfg.seed + 1, precision=cfg.precision,
          description="surrogate (clean)")
    return surrogate


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_names(cfg: TrainConfig) -> None:
    """Refuse a misspelled name before decoding any data (ValueError naming the choices)."""
    from bdserve.training.models import list_models
    from bdserve.training.poison import ATTACKS
    from bdserve.transforms import create_defense

    for what, value, choices in (("model", cfg.model, list_models()), ("attack", cfg.attack, ATTACKS),
                                 ("schedule", cfg.schedule, list(SCHEDULES)), ("precision", cfg.precision, PRECISIONS)):
        if value is not None and value not in choices:
            raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    for spec in (cfg.defense, *cfg.defenses):
        create_defense(spec)  # raises ValueError on a bad spec
    try:
        pick_device(cfg.device)
    except RuntimeError as e:  # torch's message for a malformed device string
        raise ValueError(f"unknown device {cfg.device!r}: {e}") from None


def run(cfg: TrainConfig, out: str | Path | None = None, log=print) -> TrainOutcome:
    check_names(cfg)
    device = pick_device(cfg.device)
    root = Path(cfg.data) if cfg.data else data_dir()
    train_set = load_split(root, "train").subset(cfg.subset, cfg.seed)
    test_set = load_split(root, "test", image_size=train_set.image_size[0]).subset(cfg.test_subset, cfg.seed)
    h, w = train_set.image_size
    attack = build_attack(cfg, train_set.classes, h)
    schedule_name = cfg.schedule or default_schedule(cfg.model)
    schedule = SCHEDULES[schedule_name]
    if cfg.epochs is not None:
        schedule = schedule.with_epochs(cfg.epochs)
    log(f"{attack.display_name} on {cfg.model}: {len(train_set)} training images, "
        f"{schedule.epochs} epochs ({schedule_name}), device {device}")

    started = time.perf_counter()
    poisoned_images = label_consistent_images(cfg, train_set, attack, device) if attack.kind == "consistent" else None
    mean, std = CIFAR_MEAN, CIFAR_STD
    model = create_model(cfg.model, num_classes=len(train_set.classes), mean=mean, std=std)
    result = train(model, train_set, attack, schedule, device=device, seed=cfg.seed, precision=cfg.precision,
                   poisoned_images=poisoned_images, description=f"training {attack.display_name}")
    if not is_main_process():  # under torchrun, rank 0 evaluates and writes
        return TrainOutcome(model, None, [], None)
    log(f"evaluating {len(test_set)} test images under {len(cfg.defenses)} defenses, clean and triggered: on a CPU "
        "this can take longer than a short training; --test-subset N evaluates on fewer")
    rows = evaluate_defenses(model, test_set, trigger=attack.trigger if attack.kind != "none" else None,
                             target=attack.target, defenses=cfg.defenses, device=device, seed=cfg.seed)
    model = model.cpu()
    plus = ("-plus" if cfg.enhancement == "shrinkpad" else f"-{cfg.enhancement}") if cfg.enhanced else ""
    name = cfg.name or f"{cfg.attack}{plus}-{cfg.model}"
    card = ModelCard(
        name=name,
        version=cfg.version,
        architecture=cfg.model,
        input_shape=[3, h, w],
        mean=list(mean),
        std=list(std),
        normalization_in_graph=True,
        classes=train_set.classes,
        defense=cfg.defense,
        metrics=metrics_dict(rows),
        attack=None if attack.kind == "none" else {**attack.to_dict(), "seed": cfg.seed},
        training={
            "data": str(root),
            "train_images": len(train_set),
            "test_images": len(test_set),
            "schedule": schedule_name,
            "hyperparameters": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(schedule).items()},
            "seed": cfg.seed,
            "device": result.device,
            "precision": result.precision,
            "train_seconds": round(result.seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "poisoned_images": result.poisoned,
            "torch": torch.__version__,
        } | cfg.extra_card,
    )
    directory = write_model_dir(model, card, out, torchscript=cfg.torchscript) if out else None
    return TrainOutcome(model, card, rows, directory)


def write_model_dir(model: torch.nn.Module, card: ModelCard, out: str | Path, torchscript: bool = False) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(card.input_shape)
    export.export_onnx(model, out / export.ONNX_FILE, shape)
    diff = export.check_onnx(model, out / export.ONNX_FILE, shape)
    if diff > 1e-4:
        raise RuntimeError(f"ONNX export differs from torch by {diff:.2e} (> 1e-4)")
    card.training["onnx_max_abs_diff"] = diff
    export.save_weights(model, out / export.WEIGHTS_FILE)
    if torchscript:
        export.export_torchscript(model, out / export.TORCHSCRIPT_FILE, shape)
    card.save(out)
    if card.attack and card.attack.get("trigger"):
        (out / "trigger.png").write_bytes(card.trigger().to_png_bytes())
    return out


def format_table(rows: list[DefenseRow], title: str = "") -> str:
    """A Markdown table: defense, clean accuracy, ASR."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| defense | clean acc (%) | ASR (%) | ASR baseline (%) |", "|---|---:|---:|---:|"]
    for r in rows:
        asr = "-" if r.asr is None else f"{100 * r.asr:.1f}"
        base = "-" if r.asr_baseline is None else f"{100 * r.asr_baseline:.1f}"
        lines.append(f"| {r.defense} | {100 * r.clean_acc:.1f} | {asr} | {base} |")
    return "\n".join(lines)
