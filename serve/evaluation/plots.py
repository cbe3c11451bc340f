"""PNG figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _yerr(rates: list[dict | None]) -> tuple[np.ndarray, np.ndarray]:
    """Values and asymmetric error bars (in %) from ``stats.rate`` dicts."""
    vals, lo, hi = [], [], []
    for r in rates:
        if r is None or r.get("rate") is None:
            vals.append(np.nan), lo.append(0), hi.append(0)
            continue
        v = 100 * r["rate"]
        a, b = r["ci95"]
        vals.append(v), lo.append(max(0.0, v - 100 * a)), hi.append(max(0.0, 100 * b - v))
    return np.array(vals), np.array([lo, hi])


def defenses_chart(rows: list[dict], title: str, path: Path) -> Path:
    """Clean accuracy and ASR per defense, with 95% Wilson error bars; a tick on each ASR bar marks
    its baseline (clean non-target images predicted as the target)."""
    plt = _plt()
    names = [r["defense"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    for offset, key, sub, label, color in ((-0.2, "clean", "accuracy", "clean accuracy", "#4c72b0"),
                                           (0.2, "triggered", "asr", "ASR", "#c44e52")):
        vals, err = _yerr([(r.get(key) or {}).get(sub) for r in rows])
        if np.isnan(vals).all():
            continue
        ax.bar(x + offset, vals, 0.4, yerr=err, capsize=3, label=label, color=color)
    base, _ = _yerr([(r.get("triggered") or {}).get("baseline") for r in rows])
    if not np.isnan(base).all():
        ax.hlines(base, x + 0.02, x + 0.38, colors="black", linewidths=2, label="ASR baseline")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(title)
    # Beside the axes, never over the bars (inside, it hid the last one).
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_chart(rows: list[dict], classes: list[str], title: str, path: Path) -> Path:
    """One confusion matrix (clean images, rows = true class) per defense, side by side."""
    plt = _plt()
    rows = [r for r in rows if r.get("clean")]
    n = max(1, len(rows))
    cols = min(n, 4)
    rws = (n + cols - 1) // cols
    fig, axes = plt.subplots(rws, cols, figsize=(3.6 * cols + 0.8, 3.4 * rws), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    short = [c[:5] for c in classes]
    im = None
    for ax, r in zip(axes.flat, rows):
        cm = np.asarray(r["clean"]["confusion"], dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        im = ax.imshow(100 * norm, cmap="Blues", vmin=0, vmax=100)
        ax.set_title(r["defense"], fontsize=9)
        ax.set_xticks(range(len(classes)), short, rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), short, fontsize=6)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    fig.suptitle(title, fontsize=10)
    if im is not None:  # one scale for every panel: share of each true class (row) predicted as each column
        fig.colorbar(im, ax=axes, label="% of the true class", shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def location_heatmap(grid: np.ndarray, rows: list[int], cols: list[int], train_at: tuple[int, int],
                     title: str, path: Path) -> Path:
    """Fig. 4: ASR (%) by the trigger's location (its bottom-right pixel, Definition 2)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(100 * grid, cmap="viridis", vmin=0, vmax=100, origin="upper")
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("column of the trigger's bottom-right pixel")
    ax.set_ylabel("row of the trigger's bottom-right pixel")
    if train_at[0] in rows and train_at[1] in cols:
        ax.scatter([cols.index(train_at[1])], [rows.index(train_at[0])], marker="s", s=80,
                   facecolors="none", edgecolors="red", label="training location")
        ax.legend(loc="upper left", fontsize=7)
    fig.colorbar(im, ax=ax, label="ASR (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def appearance_curve(values: list[int], rates: list[dict], train_value: int | None, title: str, path: Path) -> Path:
    """Fig. 5: ASR against the trigger's non-zero pixel value, with Wilson bars."""
    plt = _plt()
    vals, err = _yerr(rates)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(values, vals, yerr=err, marker="o", ms=4, capsize=2)
    if train_value is not None and train_value in values:
        i = values.index(train_value)
        ax.plot([train_value], [vals[i]], "o", color="red", ms=8, label=f"training value ({train_value})")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("non-zero pixel value of the trigger")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def shrink_curves(series: dict[str, tuple[list[int], list[dict]]], eps: int | None, title: str, path: Path) -> Path:
    """Fig. 8: ASR against ShrinkPad's shrinking size, one line per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (ks, rates) in series.items():
        vals, err = _yerr(rates)
        ax.errorbar(ks, vals, yerr=err, marker="o", ms=4, capsize=2, label=name)
    if eps is not None:
        ax.axvline(eps + 0.5, color="grey", ls="--", lw=1, label=f"max shrink of the attack ({eps})")
    ax.set_xlabel("ShrinkPad shrinking size k (pixels)")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
