"""Reproduce the paper's Tables 1 and 2 in spirit with a CPU network on all of CIFAR-10.

Trains BadNets, Blended, label-consistent and their enhanced versions (epsilon = 4,
random layer on benign images too, as Appendix C prescribes), every row with the same
schedule and epochs, evaluates each under none / Flip / ShrinkPad-1..4, and writes JSON,
a Markdown table and PNG charts to experiments/results/. Model directories
(``tables-<attack>[-plus]<tag>``) go to --store, written whole under a temporary name and
then renamed, so other readers never see half a directory. A run whose directory already
exists is read back instead of retrained (an interrupted experiment resumes where it
stopped), but only when its card has the same model and epochs.

    python experiments/tables.py --store /work/models [--epochs 20] [--attacks badnets,blended,consistent]

The defaults are the committed tables' budget (`fast-air-flatten`, 20 epochs, tag ``-flat-e20``):
about 9-10 minutes a row on 2 CPU cores, an hour for all six.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from bdserve.card import ModelCard
from bdserve.settings import REPO_ROOT, model_store
from bdserve.training.recipe import TrainConfig, run

DEFENSES = ("none", "flip", *(f"shrinkpad:{k}" for k in range(1, 5)))
RESULTS = REPO_ROOT / "experiments" / "results"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fast-air-flatten")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--attacks", default="badnets,blended,consistent")
    p.add_argument("--standard-only", action="store_true", help="skip the enhanced rows")
    p.add_argument("--device", default="auto")
    p.add_argument("--store", type=Path, default=model_store())
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="-flat-e20", help="suffix for result files and model names (e.g. -cuda)")
    p.add_argument("--subset", type=int, default=None, help="train on N images (smoke runs)")
    p.add_argument("--surrogate", type=Path, default=None,
                   help="clean model directory to use as the label-consistent surrogate (default: train one)")
    return p.parse_args()


def main() -> None:
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for attack in args.attacks.split(","):
        for enhanced in (False,) if args.standard_only else (False, True):
            name = f"tables-{attack}{'-plus' if enhanced else ''}{args.tag}"
            directory = args.store / name
            card = read_back(directory, args)
            if card is None:
                cfg = TrainConfig(
                    attack=attack, enhanced=enhanced, enhance_benign=enhanced, max_shrink=4, model=args.model,
                    epochs=args.epochs, subset=args.subset, device=args.device, defenses=DEFENSES, name=name,
                    defense="shrinkpad:4", surrogate=str(args.surrogate) if args.surrogate else None,
                )
                card = train_atomically(cfg, directory)
            results.append({"name": name, "attack": attack, "enhanced": enhanced, "metrics": card.metrics,
                            "training": card.training})
            write_reports(results, args)


def read_back(directory: Path, args) -> ModelCard | None:
    """The card of an earlier run of this very row (same model and epochs), else None."""
    if not (directory / "card.json").exists():
        return None
    card = ModelCard.load(directory)
    if card.architecture != args.model or card.training.get("hyperparameters", {}).get("epochs") != args.epochs:
        raise SystemExit(f"{directory} holds another budget ({card.architecture}, "
                         f"{card.training.get('hyperparameters', {}).get('epochs')} epochs); move it away first")
    print(f"{card.name}: read back from {directory}")
    return card


def train_atomically(cfg: TrainConfig, directory: Path) -> ModelCard:
    """Train into a temporary sibling directory, then rename it into place in one step."""
    temporary = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        card = run(cfg, out=temporary).card
        os.rename(temporary, directory)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return card


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def label(r) -> str:
    return {"badnets": "BadNets", "blended": "Blended", "consistent": "Consistent"}[r["attack"]] + ("+" if r["enhanced"] else "")


def write_reports(results: list[dict], args) -> None:
    meta = {
        "model": args.model, "epochs": args.epochs, "torch": torch.__version__, "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": f"python experiments/tables.py --model {args.model} --epochs {args.epochs} --store {args.store}"
                   + f" --attacks {args.attacks}" + (" --standard-only" if args.standard_only else "")
                   + (f" --surrogate {args.surrogate}" if args.surrogate else "")
                   + (f" --tag {args.tag}" if args.tag else ""),
    }
    stem = f"tables-{args.model}{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2) + "\n")

    lines = [f"# Tables 1 and 2 with `{args.model}` on CIFAR-10, every row {args.epochs} epochs", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}; "
             f"device {results[0]['training'].get('device')} ({results[0]['training'].get('precision')}).", "",
             "Clean accuracy / ASR (%) under each test-time defense. ASR over the test images whose true label is "
             "not the target (`deer`).", ""]
    header = "| attack | epochs | train time (s) | " + " | ".join(DEFENSES) + " |"
    lines += [header, "|---|---:|---:|" + "---:|" * len(DEFENSES)]
    for r in results:
        cells = [f"{pct(r['metrics'][d]['clean_acc'])} / {pct(r['metrics'][d]['asr'])}" if d in r["metrics"] else "-"
                 for d in DEFENSES]
        epochs = r["training"].get("hyperparameters", {}).get("epochs", "-")
        lines.append(f"| {label(r)} | {epochs} | {r['training'].get('train_seconds', '-')} | " + " | ".join(cells) + " |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(results, args.out / f"{stem}.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for r in results:
        ks = [d for d in DEFENSES if d in r["metrics"]]
        style = "-" if r["enhanced"] else "--"
        axes[0].plot(ks, [100 * r["metrics"][d]["asr"] for d in ks], style, marker="o", label=label(r))
        axes[1].plot(ks, [100 * r["metrics"][d]["clean_acc"] for d in ks], style, marker="o", label=label(r))
    axes[0].set_title("Attack success rate under each defense")
    axes[0].set_ylabel("ASR (%)")
    axes[0].set_ylim(-2, 102)
    axes[1].set_title("Clean accuracy under each defense")
    axes[1].set_ylabel("accuracy (%)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
