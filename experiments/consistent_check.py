"""Why a label-consistent model has (or lacks) its backdoor: the poisons, the model, the trigger.

For a label-consistent model directory this measures, in process:

1. the PGD poisons (the cached perturbed target-class images the training used): their largest
   and mean change in 0..255 levels, and how often an independent model (``--reference``, any other
   model trained on CIFAR-10) still calls them the target class before and after PGD: the
   perturbation must make their natural content hard to learn;
2. how often the label-consistent model itself calls the poisons the target (did it fit them?);
3. its ASR with the four-corner trigger stamped at test time with alpha 0.25 (the training alpha,
   the paper's), 0.5 and 1.0 (full amplitude), over the non-target test images.

A model that fits its poisons but ignores the trigger at every alpha learnt the poisons by their
content, not by the trigger. Writes experiments/results/consistent/check.{json,md}.

    python experiments/consistent_check.py --model /work/models/tables-consistent-e16 \\
        --reference /work/models/tables-badnets-plus-e16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bdserve.serve.evaluation.heldout import load_test
from bdserve.settings import REPO_ROOT, cache_dir, data_dir
from bdserve.training import export
from bdserve.training.data import load_split
from bdserve.training.poison import choose_poisoned, default_attack
from bdserve.transforms.triggers import four_corner

OUT = REPO_ROOT / "experiments" / "results" / "consistent"
ALPHAS = (0.25, 0.5, 1.0)


@torch.no_grad()
def rate(model, images: torch.Tensor, target: int, stamp=None, batch: int = 500) -> float:
    hits = 0
    for start in range(0, len(images), batch):
        x = images[start:start + batch].float() / 255
        hits += int((model(stamp(x) if stamp else x).argmax(1) == target).sum())
    return hits / max(1, len(images))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a label-consistent model directory")
    p.add_argument("--reference", type=Path, required=True, help="an independent CIFAR-10 model directory")
    p.add_argument("--poisons", type=Path, default=None,
                   help="the PGD cache file (default: the one consistent-pgd-*.safetensors in the cache)")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    card, model = export.load_trained(args.model)
    if (card.attack or {}).get("kind") != "consistent":
        raise SystemExit(f"{args.model} is not a label-consistent model")
    _, reference = export.load_trained(args.reference)
    data = args.data or data_dir()
    target = int(card.target_label)
    target_name = card.classes[target]

    train = load_split(data, "train")
    attack = default_attack("consistent", target, poison_rate=card.attack["poison_rate"])
    original = train.images[choose_poisoned(train.labels, attack, card.training.get("seed", 0))]
    caches = [args.poisons] if args.poisons else sorted(cache_dir().glob("consistent-pgd-*.safetensors"))
    if len(caches) != 1:
        raise SystemExit(f"found {len(caches)} PGD caches in {cache_dir()}; name one with --poisons")
    poisons = load_file(str(caches[0]))["images"]
    if poisons.shape != original.shape:
        raise SystemExit(f"{caches[0]} holds {tuple(poisons.shape)} images, the attack poisons {tuple(original.shape)}")
    delta = (poisons.int() - original.int()).abs()

    test = load_test(card, data)
    triggered = test.images[test.labels != target]
    doc = {
        "model": card.name, "reference": args.reference.name, "poisons": len(poisons),
        "delta_max_levels": int(delta.max()), "delta_mean_levels": float(delta.float().mean()),
        "reference_target_rate": {"before_pgd": rate(reference, original, target),
                                  "after_pgd": rate(reference, poisons, target)},
        "model_target_rate_on_poisons": rate(model, poisons, target),
        "asr_by_test_alpha": {str(a): rate(model, triggered, target, four_corner(a).stamp) for a in ALPHAS},
        "triggered_images": len(triggered),
        "command": f"python experiments/consistent_check.py --model {args.model} --reference {args.reference}",
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check.json").write_text(json.dumps(doc, indent=2) + "\n")
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    md = "\n".join([
        f"# The label-consistent model `{card.name}`: poisons, fit and trigger", "",
        f"- {len(poisons)} PGD poisons (target-class training images): largest change {doc['delta_max_levels']} "
        f"levels of 255, mean {doc['delta_mean_levels']:.1f}.",
        f"- An independent model (`{args.reference.name}`) calls them `{target_name}`: "
        f"{pct(doc['reference_target_rate']['before_pgd'])}% before PGD, "
        f"{pct(doc['reference_target_rate']['after_pgd'])}% after (the perturbation transfers).",
        f"- The label-consistent model calls them `{target_name}`: {pct(doc['model_target_rate_on_poisons'])}% "
        "(it fitted its poisons).",
        f"- Its ASR over {len(triggered)} non-target test images with the four-corner trigger at test-time alpha "
        + ", ".join(f"{a}: {pct(v)}%" for a, v in doc["asr_by_test_alpha"].items()) + ".",
        "", f"Command: `{doc['command']}`", ""])
    (args.out / "check.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
