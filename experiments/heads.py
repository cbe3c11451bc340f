"""The classifier head and the trigger's position: global max-pool against a position-keeping head.

A global max-pool head answers "is the trigger anywhere?", so a moved trigger still fires
(the paper reports ASR under 50% once the trigger moves 2-3 pixels) and ShrinkPad's
residual ASR is inflated. For each BadNets model given (same recipe, different heads) this
measures the ASR with the trigger moved 0..5 pixels left along the bottom edge and up along
the right edge, next to the ShrinkPad-k ASR its card recorded, and writes
experiments/results/heads/heads.{json,md,png}.

    python experiments/heads.py --store /work/models --models tables-badnets,tables-badnets-flatten
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bdserve.serve.evaluation.heldout import load_test
from bdserve.settings import REPO_ROOT, data_dir, model_store
from bdserve.training import export

OUT = REPO_ROOT / "experiments" / "results" / "heads"
MOVES = list(range(6))
SHRINKS = [f"shrinkpad:{k}" for k in range(1, 5)]


@torch.no_grad()
def asr(model, images: torch.Tensor, trigger, target: int, batch: int = 500) -> float:
    hits = 0
    for start in range(0, len(images), batch):
        x = trigger.stamp(images[start:start + batch].float().div(255))
        hits += int((model(x).argmax(1) == target).sum())
    return hits / max(1, len(images))


def measure(directory: Path, data: Path) -> dict:
    card, model = export.load_trained(directory)
    test = load_test(card, data)
    trigger, target = card.trigger(), int(card.target_label)
    images = test.images[test.labels != target]
    top, left = trigger.position(*test.image_size)
    return {
        "model": card.name, "architecture": card.architecture,
        "epochs": card.training.get("hyperparameters", {}).get("epochs"),
        "clean_acc": card.metrics["none"]["clean_acc"], "triggered_images": len(images),
        "moved_left": [asr(model, images, trigger.moved(top, left - d), target) for d in MOVES],
        "moved_up": [asr(model, images, trigger.moved(top - d, left), target) for d in MOVES],
        "shrinkpad": {k: card.metrics[k]["asr"] for k in ["none", "flip", *SHRINKS] if k in card.metrics},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=model_store())
    p.add_argument("--models", default="tables-badnets,tables-badnets-flatten")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(args.store / name, args.data or data_dir()) for name in args.models.split(",")]
    command = f"python experiments/heads.py --store {args.store} --models {args.models}"
    doc = {"experiment": "head vs trigger position", "command": command, "moves_px": MOVES, "models": rows,
           "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (args.out / "heads.json").write_text(json.dumps(doc, indent=2) + "\n")
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["# The head and the trigger's position (BadNets, 0/255 trigger)", "",
             "ASR (%) with the trigger moved d pixels from where it was trained (all non-target test images, "
             "in process), and the ShrinkPad ASR from the model's card.", "",
             "| model (head) | epochs | clean | " + " | ".join(f"left {d}" for d in MOVES[1:])
             + " | " + " | ".join(f"up {d}" for d in MOVES[1:]) + " | " + " | ".join(SHRINKS) + " |",
             "|---|---:|---:|" + "---:|" * (2 * (len(MOVES) - 1) + len(SHRINKS))]
    for r in rows:
        lines.append(f"| {r['model']} ({r['architecture']}) | {r['epochs']} | {pct(r['clean_acc'])} | "
                     + " | ".join(pct(v) for v in r["moved_left"][1:]) + " | "
                     + " | ".join(pct(v) for v in r["moved_up"][1:]) + " | "
                     + " | ".join(pct(r["shrinkpad"][k]) for k in SHRINKS) + " |")
    lines += ["", f"Command: `{command}`", ""]
    (args.out / "heads.md").write_text("\n".join(lines))
    plot(rows, args.out / "heads.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in rows:
        label = f"{r['model']} ({r['architecture']})"
        axes[0].plot(MOVES, [100 * v for v in r["moved_left"]], "-o", label=f"{label}, left")
        axes[0].plot(MOVES, [100 * v for v in r["moved_up"]], "--s", label=f"{label}, up")
        axes[1].plot(range(5), [100 * r["shrinkpad"][k] for k in ["none", *SHRINKS]], "-o", label=label)
    axes[0].set_title("ASR with the trigger moved d pixels")
    axes[0].set_xlabel("d (pixels)")
    axes[1].set_title("ASR under ShrinkPad-k")
    axes[1].set_xlabel("k")
    axes[0].set_xticks(MOVES)
    axes[1].set_xticks(range(5))
    for ax in axes:
        ax.set_ylabel("ASR (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
