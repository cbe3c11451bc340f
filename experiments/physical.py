"""Section 5.4 in simulation: BadNets against BadNets+ on photographs of printed triggered images.

One set of simulated photographs (`bdserve physical simulate`: test images whose label is
not the target, stamped with the BadNets trigger, printed and photographed at 640x480,
with their clean counterparts in the same scenes) is sent, file by file as a camera would
upload it, through one live `bdserve serve --lab` to each model:

  - defense none: a plain camera pipeline with no defense (the paper's setting);
  - the card's default defense (shrinkpad:4), what bdserve serves unless told otherwise.

Photos travel as an OIP BYTES input (the server decodes, orients and cover-fits them), since
only that route lets a lab request choose the defense. For reference the same test images,
stamped digitally, are sent as tensors (the digital ASR). Writes physical.json,
physical.md and contact sheets to experiments/results/physical/; the photos themselves go
to a work folder outside the repository.

    python experiments/physical.py [--count 200] [--models badnets-fast,badnets-plus-fast]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from bdserve.card import ModelCard
from bdserve.serve.evaluation import photos as ph
from bdserve.serve.evaluation.clients import open_client
from bdserve.serve.evaluation.heldout import HeldOut, load_test, stamp_uint8
from bdserve.testing import served
from bdserve.serve.evaluation.physical import Camera, simulate
from bdserve.serve.evaluation.report import pct
from bdserve.serve.evaluation.retry import RetryPolicy, with_retries
from bdserve.serve.evaluation.runner import run_sets
from bdserve.serve.evaluation.stats import rate
from bdserve.settings import REPO_ROOT, data_dir

OUT = REPO_ROOT / "experiments" / "results" / "physical"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=REPO_ROOT / "model_store")
    p.add_argument("--models", default="badnets-fast,badnets-plus-fast")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None,
                   help="where the photos go (default: a temporary folder); a folder simulated with the same settings is reused")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--ablation", type=int, default=100, help="photos per camera-factor preset (0: no ablation)")
    p.add_argument("--tag", default="", help="suffix for the result files (physical<tag>.json/.md)")
    return p.parse_args()


def simulated(card: ModelCard, data: Path, folder: Path, count: int, seed: int, clean: bool, cam: Camera) -> dict:
    """The photos in ``folder``, rendered unless a previous run left a matching set there (they depend
    on the trigger, target, seed and camera only)."""
    previous = folder / "simulation.json"
    meta = json.loads(previous.read_text()) if previous.exists() else None
    key = (count, seed, clean, card.trigger().name, card.classes[card.target_label], json.loads(json.dumps(asdict(cam))))
    if meta is not None and (meta["count"], meta["seed"], meta["clean_counterparts"], meta["trigger"], meta["target"],
                             meta["camera"]) == key:
        return meta
    return simulate(card, data, folder, count=count, seed=seed, clean=clean, cam=cam)


def presets(cam: Camera) -> dict[str, Camera]:
    """Camera factors one at a time, for the ablation: everything ideal except the named group."""
    ideal = replace(cam, fill=(1.0, 1.0), shift=0.0, margin=0.0, tilt=0.0, blur_sigma=(0.01, 0.01),
                    brightness=(1.0, 1.0), gradient=0.0, color_cast=0.0, noise_std=(0.0, 0.0),
                    jpeg_quality=(95, 95), paper_gamut=(0.0, 1.0))
    return {
        "ideal (print and photo, nothing else)": ideal,
        "ideal, bicubic print": replace(ideal, print_resample="bicubic"),
        "geometry (scale, position, tilt, margin)": replace(ideal, fill=cam.fill, shift=cam.shift, margin=cam.margin, tilt=cam.tilt),
        "light (brightness, gradient, cast, paper gamut)": replace(ideal, brightness=cam.brightness, gradient=cam.gradient,
                                                                    color_cast=cam.color_cast, paper_gamut=cam.paper_gamut),
        "optics and sensor (blur, noise, JPEG)": replace(ideal, blur_sigma=cam.blur_sigma, noise_std=cam.noise_std,
                                                         jpeg_quality=cam.jpeg_quality),
    }


async def ablation_asr(url: str, cards: list[ModelCard], folders: dict[str, Path]) -> dict:
    out = {}
    for c in cards:
        async with open_client(url, c.name, c.classes, concurrency=4) as client:
            await with_retries(client.connect, RetryPolicy())
            for name, folder in folders.items():
                results = await ph.classify(client, ph.collect(folder, c.classes), route="oip", defense="none", concurrency=4)
                out.setdefault(name, {})[c.name] = ph.summarize(results, c.classes, c.target_label)["physical_asr"]
    return out


def effective_shrink(scene: dict, cam: Camera, size: int) -> float:
    """How many pixels smaller than the model's input the printed image lands after the server's
    cover-fit and center crop (a ShrinkPad-like shrink; the background plays the padding)."""
    inner = scene["print_side"] * (1 - 2 * cam.margin)
    return size * (1 - inner / min(cam.width, cam.height))


def by_shrink(results: list[dict], scenes: list[dict], card: ModelCard, cam: Camera, work: Path) -> list[dict]:
    """Physical ASR split by the photo's effective shrink: within the attack's max shrink or beyond."""
    eps = (card.attack or {}).get("max_shrink") or 4
    shrink = {str(work / s["file"]): effective_shrink(s, cam, card.input_shape[1]) for s in scenes}
    hits = [(shrink[r["file"]], r["pred"] == card.target_label) for r in results
            if r["kind"] == "triggered" and r["pred"] is not None]
    out = []
    for name, keep in ((f"<= {eps} px", lambda v: v <= eps), (f"> {eps} px", lambda v: v > eps)):
        sel = [h for v, h in hits if keep(v)]
        out.append({"shrink": name, **rate(sum(sel), len(sel))})
    return out


async def run_model(url: str, card: ModelCard, items, scenes, data: Path, out: Path, cam: Camera, work: Path) -> dict:
    test = load_test(card, data)
    idx = torch.tensor([s["test_index"] for s in scenes])
    digital = HeldOut("triggered", stamp_uint8(test.images[idx], card.trigger()).numpy(), test.labels[idx].numpy(),
                      idx.numpy())
    res = {"model": card.name, "enhanced": bool((card.attack or {}).get("enhanced")),
           "max_shrink": (card.attack or {}).get("max_shrink"), "card_defense": card.defense, "defenses": {}}
    async with open_client(url, card.name, card.classes, concurrency=4) as client:
        await with_retries(client.connect, RetryPolicy())
        for defense in ("none", card.defense):
            run = await run_sets(client, [digital], defense=defense, batch_size=256, concurrency=2,
                                 description=f"{card.name} digital {defense}")
            s = run.sets["triggered"]
            digital_asr = rate(int((s.preds[s.answered] == card.target_label).sum()), int(s.answered.sum()))
            results = await ph.classify(client, items, route="oip", defense=defense, concurrency=4)
            summary = ph.summarize(results, card.classes, card.target_label)
            sheet = None
            if defense == "none":  # one sheet per model (the plain camera pipeline): PNGs of photos are large
                sheet = ph.contact_sheet([r for r in results if r["kind"] == "triggered"],
                                         out / f"contact_{card.name}.png",
                                         f"{card.name}, defense none: simulated photos of triggered prints "
                                         f"(red: predicted the target, {card.classes[card.target_label]})",
                                         thumb=80, cols=14).name
            res["defenses"][defense] = {"digital_asr": digital_asr, "physical": summary, "contact_sheet": sheet,
                                        "by_shrink": by_shrink(results, scenes, card, cam, work),
                                        "per_photo": [{k: r[k] for k in ("file", "kind", "label_name", "pred_name", "hit_target", "error")}
                                                      for r in results]}
    return res


def main() -> None:
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or data_dir()
    names = args.models.split(",")
    cards = [ModelCard.load(args.store / n) for n in names]
    trig = [c.attack["trigger"] for c in cards]
    if any(t != trig[0] for t in trig) or len({c.target_label for c in cards}) != 1:
        raise SystemExit("the models must share the trigger and target so that one set of photos serves both")
    work = args.work or Path(tempfile.mkdtemp(prefix="bdserve-physical-"))
    cam = Camera(width=args.width, height=args.height)
    t0 = time.perf_counter()
    meta = simulated(cards[0], data, work, args.count, args.seed, True, cam)
    sim_s = time.perf_counter() - t0
    items = ph.collect(work, cards[0].classes)
    print(f"simulated {meta['count']} scenes (+ clean counterparts) in {sim_s:.0f} s into {work}", flush=True)

    folders = {}
    if args.ablation:
        for i, (name, preset) in enumerate(presets(cam).items()):
            folders[name] = work / "ablation" / str(i)
            simulated(cards[0], data, folders[name], args.ablation, args.seed, False, preset)
    with served(args.store, names, "--lab") as addr:
        results = [asyncio.run(run_model(addr["http"], c, items, meta["scenes"], data, args.out, cam, work))
                   for c in cards]
        ablation = asyncio.run(ablation_asr(addr["http"], cards, folders)) if folders else None

    doc = {"experiment": "Section 5.4 in simulation: physical attack with BadNets and BadNets+",
           "command": "python experiments/physical.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                                   if v not in (None, "") and k not in ("out", "work")),
           "photos": {k: v for k, v in meta.items() if k != "scenes"}, "photo_folder": str(work),
           "simulation_seconds": sim_s, "route": "OIP BYTES input over HTTP (files as they are)",
           "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": results,
           "ablation": ablation, "ablation_photos": args.ablation}
    (args.out / f"physical{args.tag}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    (args.out / f"physical{args.tag}.md").write_text(md)
    print(md)


def markdown(doc: dict) -> str:
    p = doc["photos"]
    lines = ["# Physical attack in simulation (Section 5.4)", "",
             f"{p['count']} test images whose label is not the target ({p['target']}), stamped with the "
             f"{p['trigger']} trigger, printed ({p['camera'].get('print_resample', 'bicubic')} enlargement) and photographed "
             f"in simulation at {p['camera']['width']}x{p['camera']['height']} (seed {p['seed']}; print side "
             f"{p['camera']['fill'][0]}-{p['camera']['fill'][1]} of the frame's shorter side, tilt, defocus, lighting, "
             f"noise, JPEG: serve/evaluation/physical.py); each also photographed clean in the same scene. "
             "Photos sent as files (OIP BYTES) through one live `bdserve serve --lab`; the server cover-fits them "
             "to 32x32. Brackets: 95% Wilson intervals. Effective shrink: how many pixels smaller than 32 the "
             "printed image lands in the model's input after that fit (the background around it plays ShrinkPad's "
             "padding); the split shows the physical ASR for photos within the enhanced attack's maximal shrink "
             "and beyond it (photo counts in parentheses).", "",
             "| model | defense | digital ASR % | physical ASR % | physical ASR, shrink within / beyond max shrink % "
             "| accuracy on triggered photos % | clean photos' accuracy % | errors |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for m in doc["models"]:
        for d, r in m["defenses"].items():
            s = r["physical"]
            split = " / ".join(f"{pct(b, ci=False)} ({b['n']})" for b in r["by_shrink"])
            lines.append(f"| {m['model']} | {d} | {pct(r['digital_asr'])} | {pct(s['physical_asr'])} | {split} | "
                         f"{pct(s['attack_photos_accuracy'])} | {pct(s['clean_accuracy'])} | {s['errors']} |")
    if doc.get("ablation"):
        names = [m["model"] for m in doc["models"]]
        lines += ["", f"## Which camera factor breaks the trigger (defense none, {doc['ablation_photos']} triggered photos each)", "",
                  "Each row renders the same scenes with every factor ideal except the named group (the table above is "
                  "all factors together).", "",
                  "| camera | " + " | ".join(f"{n} physical ASR %" for n in names) + " |", "|---|" + "---:|" * len(names)]
        for preset, by_model in doc["ablation"].items():
            lines.append(f"| {preset} | " + " | ".join(pct(by_model[n]) for n in names) + " |")
    lines += ["", "Contact sheets: " + ", ".join(r["contact_sheet"] for m in doc["models"] for r in m["defenses"].values()
                                             if r["contact_sheet"]),
              "", f"Command: `{doc['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
