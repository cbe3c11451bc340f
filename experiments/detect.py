"""Trigger detectors (consistency, STRIP, SCALE-UP) on the full CIFAR-10 test set.

For every infected model given: score the 10,000 clean test images and the test images
of every non-target class stamped with the card's trigger, with one seeded set of
detectors, in-process through the served pipeline's code (DefendedModel's runtime,
transforms/detectors.py, serve/detection.py: the same functions ``bdserve calibrate``
and ``bdserve serve --detect`` use). Then:

- AUROC with a 95% bootstrap interval, TPR at 1% and 5% false-alarm rate (FAR);
- FAR at a threshold calibrated to 5% on images held out from the ones it is measured
  on, two ways:
  * **cross-fit on the test split** (primary): the clean test images are split in two
    seeded halves; the threshold calibrated on one half is measured on the other, and
    back; both FARs and their mean are reported. Every test image is measured with a
    threshold that never saw it.
  * **train split**: 5,000 random images of CIFAR-10's train split (seeded).
    The models were trained on all 50,000 train images, so these are clean but *seen*
    images: the row shows how much calibrating on training data shifts the FAR.
- STRIP's 16 overlays are 16 further train images (never scored).

Results: experiments/results/detect/detect.{json,md} and ROC curves detect.png. The
per-model scores are cached (outside the repository), so a rerun only adds models.

    python experiments/detect.py --model badnets=model_store/demo \\
        --model blended=/work/models/tables-blended [--limit N for a smoke run]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bdserve.serve.detection import build_detectors, score_images, threshold_at
from bdserve.serve.evaluation import detection as dm
from bdserve.serve.evaluation.heldout import load_test, triggered_set
from bdserve.serve.pipeline import DefendedModel
from bdserve.settings import REPO_ROOT, cache_dir, data_dir
from bdserve.transforms.detectors import DETECTORS, DEFAULT_N

RESULTS = REPO_ROOT / "experiments" / "results" / "detect"
FPR = 0.05
TRAIN_CALIBRATION = 5000


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="ATTACK=MODEL_DIR[@N] (repeatable); @N: a class-balanced subset of N test images for this model")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--limit", type=int, default=None, help="class-balanced subset of the test split for every model")
    p.add_argument("--train-calibration", type=int, default=TRAIN_CALIBRATION,
                   help="train-split images for the 'calibrated on train' row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def _progress(attack: str, name: str, total: int):
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if done[0] % 2048 < n or done[0] == total:
            print(f"{attack}: {name} {done[0]}/{total} ({time.strftime('%H:%M:%S')})", flush=True)

    return advance


def crossfit(clean: np.ndarray, trig: np.ndarray, seed: int) -> dict:
    """Calibrate on one half of the clean test scores, measure on the other, and back."""
    perm = np.random.default_rng(seed).permutation(len(clean))
    halves = perm[: len(clean) // 2], perm[len(clean) // 2:]
    folds = []
    for cal, held in (halves, halves[::-1]):
        t, _ = threshold_at(clean[cal], FPR)
        folds.append({"threshold": t, "calibration_images": len(cal), "far": float((clean[held] > t).mean()),
                      "held_out_images": len(held), "tpr": float((trig > t).mean())})
    return {"folds": folds, "far": float(np.mean([f["far"] for f in folds])),
            "tpr": float(np.mean([f["tpr"] for f in folds]))}


def score_model(attack: str, model_dir: Path, limit: int | None, args) -> dict:
    n_train = args.train_calibration if limit is None else min(args.train_calibration, limit)
    tag = "" if n_train == TRAIN_CALIBRATION else f"-train{n_train}"
    cached = cache_dir() / f"detect-scores-{attack}-{limit}-{args.seed}{tag}.npz"
    model = DefendedModel.load(model_dir, threads=args.threads)
    card = model.card
    data = args.data or data_dir()
    test = load_test(card, data, limit, args.seed)
    trig = triggered_set(test.images, test.labels, card.trigger(), int(card.target_label))
    from bdserve.training.data import load_split

    train = load_split(data, "train")
    n_over = DEFAULT_N["strip"]
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    # A seeded random draw from the train split: the overlays first, then the calibration images.
    overlays = train.images[pick[:n_over]]
    rest = train.images[pick[n_over:]]
    calib = rest[:n_train]
    methods = [(d, DEFAULT_N[d]) for d in DETECTORS]
    detectors = build_detectors(card, methods, args.seed, overlays, model.defense_spec)
    if cached.exists():
        z = np.load(cached)
        scores = {k: z[k] for k in z.files}
        seconds = None
    else:
        t0 = time.perf_counter()
        scores = {}
        for name, images in (("clean", test.images), ("triggered", torch.from_numpy(trig.images)), ("train", calib)):
            print(f"{attack}: scoring {len(images)} {name} images", flush=True)
            for det, s in score_images(model, detectors, images, advance=_progress(attack, name, len(images))).items():
                scores[f"{name}/{det}"] = s
        seconds = time.perf_counter() - t0
        np.savez(cached, **scores)
    out = {"attack": attack, "model_dir": str(model_dir), "model": card.name, "defense": model.defense_spec,
           "limit": limit,
           "card_attack": {k: card.attack.get(k) for k in ("kind", "target", "poison_rate", "enhanced", "max_shrink")},
           "clean_images": int(len(test)), "triggered_images": int(len(trig)),
           "train_calibration_images": int(len(calib)), "scoring_seconds": seconds, "detectors": {}}
    for d in detectors:
        clean, tr, cal = scores[f"clean/{d.name}"], scores[f"triggered/{d.name}"], scores[f"train/{d.name}"]
        t_train, _ = threshold_at(cal, FPR)
        out["detectors"][d.name] = {
            "spec": d.spec, "forward_passes": d.passes,
            "metrics": dm.detector_metrics(clean, tr),
            "crossfit_test": crossfit(clean, tr, args.seed),
            "calibrated_on_train": {"threshold": t_train, "far": float((clean > t_train).mean()),
                                    "tpr": float((tr > t_train).mean())},
        }
    out["_curves"] = {d.name: (scores[f"clean/{d.name}"], scores[f"triggered/{d.name}"]) for d in detectors}
    return out


def markdown(results: list[dict], args) -> str:
    lines = ["# Trigger detectors on CIFAR-10 (fast network)", "",
             "Clean: the CIFAR-10 test images (all 10,000 unless a row says otherwise); triggered: the test images of every "
             "non-target class with the card's trigger. Detectors: "
             + ", ".join(f"{d} ({DEFAULT_N[d]})" for d in DETECTORS)
             + f"; {1 + sum(d['forward_passes'] for d in results[0]['detectors'].values())} forward passes per image "
             "in all (1 shared undefended). "
             f"Calibrated FAR target {FPR:.0%}. Command: `python experiments/detect.py "
             + " ".join(f"--model {m}" for m in args.model) + (f" --limit {args.limit}" if args.limit else "") + "`",
             "", "| attack | detector | clean / triggered images | AUROC [95% CI] | TPR @1% FPR | TPR @5% FPR | FAR cross-fit (fold A / B) | "
             "TPR at cross-fit threshold | FAR, calibrated on train | TPR, calibrated on train |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    for r in results:
        for name, d in r["detectors"].items():
            m, cf, tr = d["metrics"], d["crossfit_test"], d["calibrated_on_train"]
            lo, hi = m["auroc_ci95"]
            folds = " / ".join(f"{100 * f['far']:.2f}" for f in cf["folds"])
            lines.append(f"| {r['attack']} | {d['spec']} | {r['clean_images']} / {r['triggered_images']} | {m['auroc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                         f"{dm.pct(m['at_fpr_1']['tpr'])} | {dm.pct(m['at_fpr_5']['tpr'])} | "
                         f"{100 * cf['far']:.2f} ({folds}) | {100 * cf['tpr']:.1f} | {100 * tr['far']:.2f} | "
                         f"{100 * tr['tpr']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.model:
        attack, _, directory = spec.partition("=")
        directory, _, n = directory.partition("@")
        results.append(score_model(attack, Path(directory), int(n) if n else args.limit, args))
        print(f"{attack}: done", flush=True)
    panels = [(f"{r['attack']} ({r['model']})", r.pop("_curves")) for r in results]
    suffix = "" if args.limit is None else f"-limit{args.limit}"
    dm.roc_figure(panels, args.out / f"detect{suffix}.png", "ROC of the trigger detectors, CIFAR-10 test set")
    doc = {"fpr": FPR, "seed": args.seed, "limit": args.limit, "host": platform.node(),
           "torch": torch.__version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "results": results}
    (args.out / f"detect{suffix}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"detect{suffix}.md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
