"""How well trigger detectors separate triggered from clean images: AUROC with a bootstrap
interval, TPR at fixed false-alarm rates, the false-alarm rate at the calibrated threshold,
and ROC curves (PNG). Used by ``bdserve eval --detect`` and experiments/detect.py.

Scores are "higher = more suspicious". TPR at a false-alarm rate a uses the calibration
rule of serve/detection.py on the evaluated clean scores (flag above the
(floor(a*n)+1)-th highest clean score), so the false-alarm rate reached never exceeds a.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdserve.serve.detection import threshold_at
from bdserve.serve.evaluation.plots import _plt
from bdserve.serve.evaluation.stats import rate

FPR_POINTS = (0.01, 0.05)
BOOTSTRAP = 500


def auroc(clean: np.ndarray, trig: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(clean)), np.ones(len(trig))]
    return float(roc_auc_score(y, np.r_[clean, trig]))


def auroc_interval(clean: np.ndarray, trig: np.ndarray, reps: int = BOOTSTRAP, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval, resampling clean and triggered images separately."""
    rng = np.random.default_rng(seed)
    vals = [auroc(clean[rng.integers(0, len(clean), len(clean))], trig[rng.integers(0, len(trig), len(trig))])
            for _ in range(reps)]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def tpr_at(clean: np.ndarray, trig: np.ndarray, fpr: float) -> dict:
    t, _ = threshold_at(clean, fpr)
    return {"fpr_target": fpr, "threshold": t, "fpr": float((clean > t).mean()),
            "tpr": rate(int((trig > t).sum()), len(trig))}


def detector_metrics(clean: np.ndarray, trig: np.ndarray, threshold: float | None = None,
                     reps: int = BOOTSTRAP) -> dict:
    """Everything the report says about one detector on one attack. ``threshold``: the
    calibrated one (served margins: 0), giving the false-alarm and detection rates the
    server really produces."""
    clean, trig = np.asarray(clean, dtype=np.float64), np.asarray(trig, dtype=np.float64)
    out = {"clean_images": len(clean), "triggered_images": len(trig),
           "auroc": auroc(clean, trig), "auroc_ci95": auroc_interval(clean, trig, reps),
           **{f"at_fpr_{int(round(100 * a))}": tpr_at(clean, trig, a) for a in FPR_POINTS}}
    if threshold is not None:
        out["calibrated"] = {"threshold": float(threshold),
                             "far": rate(int((clean > threshold).sum()), len(clean)),
                             "tpr": rate(int((trig > threshold).sum()), len(trig))}
    return out


def pct(r: dict | None) -> str:
    return "-" if not r or r.get("rate") is None else f"{100 * r['rate']:.1f}"


def markdown_rows(rows: list[dict]) -> list[str]:
    """rows: {"attack", "detector", "metrics"} -> a Markdown table."""
    lines = ["| attack | detector | AUROC [95% CI] | TPR @1% FPR | TPR @5% FPR | FAR at calibrated threshold | TPR at calibrated threshold |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        m = r["metrics"]
        lo, hi = m["auroc_ci95"]
        cal = m.get("calibrated") or {}
        lines.append(f"| {r['attack']} | {r['detector']} | {m['auroc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{pct(m['at_fpr_1']['tpr'])} | {pct(m['at_fpr_5']['tpr'])} | {pct(cal.get('far'))} | "
                     f"{pct(cal.get('tpr'))} |")
    return lines


def roc_figure(panels: list[tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]], path: Path,
               title: str | None = None) -> Path:
    """One ROC panel per attack: {detector: (clean scores, triggered scores)} -> PNG."""
    from sklearn.metrics import roc_curve

    plt = _plt()
    n = max(1, len(panels))
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax, (name, curves) in zip(axes.flat, panels):
        for det, (clean, trig) in curves.items():
            y = np.r_[np.zeros(len(clean)), np.ones(len(trig))]
            fpr, tpr, _ = roc_curve(y, np.r_[clean, trig])
            ax.plot(100 * fpr, 100 * tpr, label=f"{det} (AUROC {auroc(clean, trig):.3f})")
        ax.plot([0, 100], [0, 100], color="0.7", lw=0.8, ls=":")
        ax.axvline(5, color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("false-alarm rate on clean images (%)")
        ax.set_ylabel("triggered images flagged (%)")
        ax.set_xlim(0, 100), ax.set_ylim(0, 101)
        ax.set_title(name, fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ bdserve eval --detect
SCORE_OUTPUT = "trigger_score"  # the served combined margin (max over the server's detectors)
METHOD_PREFIX = "trigger_score_"  # one served margin per detector: trigger_score_<method>


def served_detection(run, attack: str) -> tuple[list[dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Rows (one per served detector, then the combined flag) and ROC curves from one
    evaluation run through a ``--detect`` server. Served scores are margins, so the
    calibrated threshold is 0 (an image is flagged above it)."""
    clean, trig = run.sets.get("clean"), run.sets.get("triggered")
    if clean is None or trig is None:
        raise ValueError("detection needs clean and triggered images (a card with an attack)")
    names = [n for n in clean.scores if n.startswith(METHOD_PREFIX)] + [n for n in clean.scores if n == SCORE_OUTPUT]
    if not names:
        raise ValueError("the server sent no trigger scores: start it with --detect METHOD[,METHOD]")
    rows, curves = [], {}
    for name in names:
        c = clean.scores[name][clean.answered]
        t = trig.scores[name][trig.answered]
        detector = name[len(METHOD_PREFIX):] if name.startswith(METHOD_PREFIX) else "any (served flag)"
        rows.append({"attack": attack, "detector": detector, "metrics": detector_metrics(c, t, threshold=0.0)})
        curves[detector] = (c, t)
    return rows, curves
