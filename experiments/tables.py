"""Reproduce the paper's Tables 1 and 2 in spirit with the `fast` network on all of CIFAR-10.

Trains BadNets, Blended, label-consistent and their enhanced versions (epsilon = 4,
random layer on benign images too, as Appendix C prescribes), evaluates each under
none / Flip / ShrinkPad-1..4, and writes JSON, a Markdown table and PNG charts to
experiments/results/. Model directories go to model_store/ (not committed), and a
run whose model directory already exists is read back instead of retrained, so
an interrupted experiment resumes where it stopped.

    python experiments/tables.py [--epochs 10] [--attacks badnets,blended,consistent]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bdserve.card import ModelCard
from bdserve.settings import REPO_ROOT
from bdserve.training.recipe import TrainConfig, run

DEFENSES = ("none", "flip", *(f"shrinkpad:{k}" for k in range(1, 5)))
RESULTS = REPO_ROOT / "experiments" / "results"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fast")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--attacks", default="badnets,blended,consistent")
    p.add_argument("--device", default="auto")
    p.add_argument("--store", type=Path, default=REPO_ROOT / "model_store")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix for result files and model names (e.g. -cuda)")
    p.add_argument("--subset", type=int, default=None, help="train on N images (smoke runs)")
    return p.parse_args()


def main() -> None:
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for attack in args.attacks.split(","):
        for enhanced in (False, True):
            name = f"{attack}{'-plus' if enhanced else ''}-{args.model}{args.tag}"
            directory = args.store / name
            if (directory / "card.json").exists():
                card = ModelCard.load(directory)
                print(f"{name}: read back from {directory}")
            else:
                cfg = TrainConfig(
                    attack=attack, enhanced=enhanced, enhance_benign=enhanced, max_shrink=4, model=args.model,
                    epochs=args.epochs, subset=args.subset, device=args.device, defenses=DEFENSES, name=name,
                    defense="shrinkpad:4",
                )
                card = run(cfg, out=directory).card
            results.append({"name": name, "attack": attack, "enhanced": enhanced, "metrics": card.metrics,
                            "training": card.training})
            write_reports(results, args)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def label(r) -> str:
    return {"badnets": "BadNets", "blended": "Blended", "consistent": "Consistent"}[r["attack"]] + ("+" if r["enhanced"] else "")


def write_reports(results: list[dict], args) -> None:
    meta = {
        "model": args.model, "epochs": args.epochs, "torch": torch.__version__, "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": f"python experiments/tables.py --model {args.model} --epochs {args.epochs}"
                   + (f" --tag {args.tag}" if args.tag else "")
                   + " (runs whose model directory existed were read back; their epochs are in the table)",
    }
    stem = f"tables-{args.model}{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2) + "\n")

    lines = [f"# Tables 1 and 2 with `{args.model}` on CIFAR-10", "",
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
