"""Fig. 8 through the service: ASR of the enhanced attacks (max shrink 4) under ShrinkPad-k, k = 1..8.

One live `bdserve serve --lab` serves BadNets+ and Blended+; `bdserve eval`'s client asks
it for each defense in turn (none, shrinkpad:1 .. shrinkpad:8) on a class-balanced subset
of the test split (clean images for accuracy, the non-target ones stamped for ASR).
The paper expects high ASR while k <= 4 and a sharp drop once k exceeds it. Writes
fig8.png, fig8.json and fig8.md to experiments/results/fig8/.

    python experiments/fig8.py --store /work/models [--limit 2000] [--models tables-badnets-plus-flat-e20,tables-blended-plus-flat-e20]

The models are the enhanced rows of experiments/tables.py (trained with Appendix C's benign
transformation, as the paper evaluates them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bdserve.card import ModelCard
from bdserve.serve.evaluation import plots
from bdserve.serve.evaluation.evaluate import EvalConfig, run
from bdserve.testing import served
from bdserve.serve.evaluation.report import pct
from bdserve.settings import REPO_ROOT, data_dir, model_store

OUT = REPO_ROOT / "experiments" / "results" / "fig8"
KS = list(range(1, 9))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=model_store())
    p.add_argument("--models", default="tables-badnets-plus-flat-e20,tables-blended-plus-flat-e20")
    p.add_argument("--limit", type=int, default=2000, help="test images per defense (0: all 10,000)")
    p.add_argument("--transport", default="grpc", choices=["http", "grpc"])
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tag", default="", help="suffix for the result files (fig8<tag>.png/.json/.md)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    defenses = ["none", *(f"shrinkpad:{k}" for k in KS)]
    models = []
    t0 = time.perf_counter()
    with served(args.store, names, "--lab") as addr:
        for name in names:
            card = ModelCard.load(args.store / name)
            rep = run(EvalConfig(addr[args.transport], name, args.store / name / "card.json",
                                 args.data or data_dir(), args.limit or None, defenses=defenses))
            models.append({"model": card.name, "max_shrink": (card.attack or {}).get("max_shrink"),
                           "architecture": card.architecture,
                           "epochs": card.training.get("hyperparameters", {}).get("epochs"),
                           "enhance_benign": (card.attack or {}).get("enhance_benign"),
                           "attack": (card.attack or {}).get("kind"), "rows": rep["rows"],
                           "clean_images": rep["clean_images"], "triggered_images": rep["triggered_images"]})
            print(rep["table1_row"], flush=True)
    eps = models[0]["max_shrink"]
    series = {m["model"]: (KS, [r["triggered"]["asr"] for r in m["rows"][1:]]) for m in models}
    plots.shrink_curves(series, eps, "ASR of enhanced attacks under ShrinkPad-k, through the service", args.out / f"fig8{args.tag}.png")
    doc = {"experiment": "Fig. 8 through the service", "defenses": defenses, "limit": args.limit,
           "transport": args.transport, "seconds": time.perf_counter() - t0,
           "command": (f"python experiments/fig8.py --store {args.store} --limit {args.limit} --models {args.models} "
                       f"--transport {args.transport}" + (f" --tag={args.tag}" if args.tag else "")),
           "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "models": [{**m, "rows": [{k: r[k] for k in ("defense", "applied", "images", "errors", "seconds",
                                                          "throughput_images_per_s")}
                                     | {"clean_accuracy": r["clean"]["accuracy"], "asr": r["triggered"]["asr"]}
                                     for r in m["rows"]]} for m in models]}
    (args.out / f"fig8{args.tag}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Fig. 8 through the service: ASR (%) under ShrinkPad-k", "",
             "Enhanced attacks trained with maximal shrink " + str(eps) + "; "
             + "; ".join(f"`{m['model']}`: {m['architecture']}, {m['epochs']} epochs, benign images transformed too: "
                         f"{'yes' if m['enhance_benign'] else 'no'}" for m in models) + ". "
             f"{models[0]['clean_images']} clean and about "
             f"{models[0]['triggered_images']} triggered test images per cell, through one live `bdserve serve --lab` "
             f"({args.transport}). Brackets: 95% Wilson intervals.", "",
             "| model | " + " | ".join(defenses) + " |", "|---|" + "---:|" * len(defenses)]
    for m in models:
        lines.append(f"| {m['model']} ASR | " + " | ".join(pct(r["triggered"]["asr"]) for r in m["rows"]) + " |")
        lines.append(f"| {m['model']} clean | " + " | ".join(pct(r["clean"]["accuracy"], ci=False) for r in m["rows"]) + " |")
    lines += ["", f"Command: `{doc['command']}`", ""]
    (args.out / f"fig8{args.tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
