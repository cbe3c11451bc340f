"""Section 5.4 in simulation, through the live service: does a camera-robust trigger survive a
print, a photograph, the server's fit and the defense?

Three models trained the same way on all of CIFAR-10 (`fast` network, same epochs, seed and
flags; `bdserve train --attack badnets [--enhanced [physical]]`):

  - BadNets;
  - BadNets+ (the paper's enhanced attack: random Flip + ShrinkPad on the poisoned images);
  - BadNets+physical (`--enhanced physical`: that plus scale with padding, rotation,
    perspective, blur, lighting and JPEG).

One set of simulated photographs (serve/evaluation/physical.py: test images whose label is not
the target, stamped with the trigger, printed, laid on a table and photographed at 640x480,
each with its clean counterpart in the same scene) is uploaded file by file, as a camera would,
to a live `bdserve serve --lab --fit F` for F in cover and print, under the defenses none, Flip
and ShrinkPad-4. For each: physical ASR and clean-photo accuracy (95% Wilson intervals).

Also measured: the calibration row (an ideal camera through `print`: plain BadNets must keep
>= 95%), an ablation of the camera factors through `print`, the crop error of the `print` fit on
every simulated photo (the same code the server runs, against the known picture corners), and
stand-ins for photographs of real scenes (prints of real photographs, with the trigger in the
corner, rendered on a table by the same simulation: not real camera photos).

    python experiments/physical.py [--count 100] [--ablation 60] [--store /work/models]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bdserve.card import ModelCard
from bdserve.client import AsyncClient
from bdserve.serve.evaluation import photos as ph
from bdserve.serve.evaluation.physical import Camera, crop_error, jpeg, render, simulate
from bdserve.serve.evaluation.report import pct
from bdserve.serve.images import FitPolicy, decode_fitted
from bdserve.settings import REPO_ROOT, data_dir
from bdserve.testing import served

OUT = REPO_ROOT / "experiments" / "results" / "physical"
MODELS = "physical-badnets,physical-badnets-plus,physical-badnets-physical"
FITS = ("cover", "print")
DEFENSES = ("none", "flip", "shrinkpad:4")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=Path("/work/models"))
    p.add_argument("--models", default=MODELS)
    p.add_argument("--count", type=int, default=100, help="test images photographed (each also clean)")
    p.add_argument("--ablation", type=int, default=60, help="photos per camera preset (0: no ablation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/bdserve-physical"), help="where the photos go (outside the repository)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--concurrency", type=int, default=4)
    return p.parse_args()


def simulated(card: ModelCard, data: Path, folder: Path, count: int, seed: int, clean: bool, cam: Camera) -> dict:
    """The photos in ``folder``, rendered unless a previous run left a matching set there."""
    previous = folder / "simulation.json"
    meta = json.loads(previous.read_text()) if previous.exists() else None
    key = (count, seed, clean, card.trigger().name, card.classes[card.target_label], json.loads(json.dumps(asdict(cam))))
    if meta is not None and (meta["count"], meta["seed"], meta["clean_counterparts"], meta["trigger"], meta["target"],
                             meta["camera"]) == key:
        return meta
    return simulate(card, data, folder, count=count, seed=seed, clean=clean, cam=cam)


def ideal(cam: Camera) -> Camera:
    """A perfect camera looking straight at a borderless print: only the print and the server's fit remain."""
    return replace(cam, shift=0.0, margin=(0.0, 0.0), rotation=0.0, tilt=0.0, distortion=(0.0, 0.0),
                   blur_sigma=(0.01, 0.01), brightness=(1.0, 1.0), gradient=0.0, color_cast=0.0,
                   noise_std=(0.0, 0.0), jpeg_quality=(95, 95), paper_gamut=(0.0, 1.0))


def presets(cam: Camera) -> dict[str, Camera]:
    """The calibration row, then camera factors one group at a time, then all of them."""
    base = ideal(cam)
    return {
        "ideal camera (calibration)": base,
        "geometry (margin, position, turn, tilt)": replace(base, shift=cam.shift, margin=cam.margin,
                                                          rotation=cam.rotation, tilt=cam.tilt),
        "lens (distortion, defocus blur)": replace(base, distortion=cam.distortion, blur_sigma=cam.blur_sigma),
        "light (brightness, gradient, cast, paper gamut)": replace(base, brightness=cam.brightness, gradient=cam.gradient,
                                                                    color_cast=cam.color_cast, paper_gamut=cam.paper_gamut),
        "sensor (noise, JPEG)": replace(base, noise_std=cam.noise_std, jpeg_quality=cam.jpeg_quality),
        "full camera": cam,
    }


def crop_errors(folder: Path, meta: dict, size: tuple[int, int]) -> dict:
    """The print fit's crop error on every triggered photo of a folder (model pixels), and how often
    it found no print: the server's own code, run here on the same files."""
    errs, missed = [], 0
    for s in meta["scenes"]:
        f = decode_fitted((folder / s["file"]).read_bytes(), size, policy=FitPolicy("print"))
        if f.outline is None:
            missed += 1
        else:
            errs.append(crop_error(f.outline, s["picture_corners"], size[0]))
    a = np.asarray(errs) if errs else np.asarray([np.nan])
    return {"photos": len(meta["scenes"]), "no_print_found": missed, "median_px": float(np.median(a)),
            "p90_px": float(np.percentile(a, 90)), "max_px": float(a.max()),
            "within_half_px": float(np.mean(a <= 0.5)), "within_1px": float(np.mean(a <= 1.0)),
            "within_3px": float(np.mean(a <= 3.0))}


SCENE_SOURCES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


def real_pictures(size: int = 256) -> list[tuple[str, np.ndarray]]:
    """Square crops of real photographs shipped with matplotlib (a portrait, a product photo)."""
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "sample_data"
    out = []
    for name in SCENE_SOURCES:
        im = Image.open(root / name).convert("RGB")
        w, h = im.size
        for i, (fx, fy) in enumerate(((0.5, 0.5), (0.2, 0.8), (0.8, 0.3))):
            s = min(w, h) * (0.9 if i == 0 else 0.6)
            cx, cy = fx * w, fy * h
            left, top = min(max(0, cx - s / 2), w - s), min(max(0, cy - s / 2), h - s)
            crop = im.crop((round(left), round(top), round(left + s), round(top + s))).resize((size, size), Image.Resampling.BICUBIC)
            out.append((f"{Path(name).stem}-{i}", np.asarray(crop)))
    return out


def scenes(card: ModelCard, folder: Path, seed: int, cam: Camera) -> list[dict]:
    """Stand-ins for photographs of real scenes: real photographs with the trigger printed in their
    bottom-right corner (its cells 1/32 of the picture's side, as in the model's input), each also
    without it, printed and photographed on a table by the simulation. Labels stay empty: none of
    these shows a CIFAR-10 class."""
    trig = card.trigger()
    folder.mkdir(parents=True, exist_ok=True)
    rows, info = [], []

    pattern, alpha = trig.canvas(3, *card.input_shape[1:])  # the trigger as it lies on a model input
    for i, (name, pic) in enumerate(real_pictures()):
        side = pic.shape[0]
        pattern_up, alpha_up = (torch.nn.functional.interpolate(t[None].float(), size=(side, side), mode="nearest")[0]
                                for t in (pattern, alpha))
        clean = torch.from_numpy(np.ascontiguousarray(pic.transpose(2, 0, 1))).float() / 255
        printed = (1 - alpha_up) * clean + alpha_up * pattern_up  # Eq. 1 at the print's resolution
        for kind, img in (("triggered", printed), ("clean", clean)):
            g = torch.Generator().manual_seed(seed * 7919 + i)  # the same scene with and without the trigger
            photo, draws = render((img * 255).round().byte().numpy(), g, cam)
            file = f"{kind}/{name}.jpg"
            (folder / kind).mkdir(exist_ok=True)
            (folder / file).write_bytes(jpeg(photo, draws["jpeg_quality"]))
            rows.append(f"{file},,{kind}")
            info.append({"file": file, "kind": kind, "source": name, **{k: draws[k] for k in ("picture_corners", "print_side")}})
    (folder / "labels.csv").write_text("file,label,kind\n" + "\n".join(rows) + "\n")
    return info


def trigger_visible(image: np.ndarray, card: ModelCard) -> float:
    """Grey-level contrast of the trigger's white over its black cells in a model input (0..255)."""
    trig = card.trigger()
    pat = trig.pattern.float().mean(0).numpy()  # (3, 3) in [0, 1]
    h, w = pat.shape
    top, left = trig.top % image.shape[0], trig.left % image.shape[1]
    patch = image[top:top + h, left:left + w].astype(float).mean(2)
    return float(patch[pat > 0.5].mean() - patch[pat < 0.5].mean())


async def classify(url: str, name: str, card: ModelCard, items: list, defense: str, concurrency: int) -> list[dict]:
    """``name``: the served name, the model's directory."""
    async with AsyncClient(url, name, concurrency=concurrency) as client:
        await client.wait_ready()
        return await ph.classify(client, items, card.classes, route="oip", defense=defense, concurrency=concurrency)


def main() -> None:
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or data_dir()
    names = args.models.split(",")
    cards = {n: ModelCard.load(args.store / n) for n in names}
    first = cards[names[0]]
    if len({json.dumps(c.attack["trigger"]) for c in cards.values()}) != 1 or len({c.target_label for c in cards.values()}) != 1:
        raise SystemExit("the models must share the trigger and target so that one set of photos serves them all")
    size = tuple(first.input_shape[1:])
    cam = Camera()
    t0 = time.perf_counter()
    work = args.work
    meta = simulated(first, data, work / "full", args.count, args.seed, True, cam)
    folders = {name: work / "ablation" / str(i) for i, name in enumerate(presets(cam))} if args.ablation else {}
    metas = {name: simulated(first, data, folders[name], args.ablation, args.seed, False, preset)
             for name, preset in presets(cam).items()} if args.ablation else {}
    scene_info = scenes(first, work / "scenes", args.seed, cam)
    sim_s = time.perf_counter() - t0
    print(f"simulated {meta['count']} scenes (+ clean), {len(folders)} presets, {len(scene_info)} real-scene stand-ins "
          f"in {sim_s:.0f} s into {work}", flush=True)

    crop = {f"full camera ({meta['count']} photos above)": crop_errors(work / "full", meta, size)}  # not the 40 below
    crop.update({name: crop_errors(folders[name], metas[name], size) for name in folders})
    items = ph.collect(work / "full", first.classes)
    scene_items = ph.collect(work / "scenes", first.classes)
    results: dict = {n: {} for n in names}
    ablation: dict = {}
    scene_results: dict = {}
    sheets = []
    for fit in FITS:
        with served(args.store, names, "--lab", "--fit", fit) as addr:
            for n in names:
                for d in DEFENSES:
                    t = time.perf_counter()
                    res = asyncio.run(classify(addr["http"], n, cards[n], items, d, args.concurrency))
                    s = ph.summarize(res, first.classes, first.target_label)
                    results[n][f"{fit}/{d}"] = {"fit": fit, "defense": d, "summary": s,
                                                "per_photo": [{k: r.get(k) for k in ("file", "kind", "label_name", "pred_name", "fit", "error")}
                                                              for r in res]}
                    print(f"{n} fit {fit} defense {d}: ASR {pct(s['physical_asr'])} clean {pct(s['clean_accuracy'])} "
                          f"({time.perf_counter() - t:.0f} s)", flush=True)
                    if fit == "print" and d == "none" and n == names[-1]:
                        name = f"contact_{n}_print.png"
                        ph.contact_sheet([r for r in res if r["kind"] == "triggered"][:48], args.out / name,
                                         f"{n}, --fit print, defense none: simulated photos of triggered prints "
                                         f"(red: predicted the target, {first.classes[first.target_label]})",
                                         thumb=96, cols=6, input_size=size)
                        sheets.append(name)
            if fit != "print":
                continue
            for preset, folder in folders.items():
                pitems = ph.collect(folder, first.classes)
                for n in names:
                    for d in ("none", "shrinkpad:4"):
                        res = asyncio.run(classify(addr["http"], n, cards[n], pitems, d, args.concurrency))
                        ablation.setdefault(preset, {})[f"{n}/{d}"] = ph.summarize(res, first.classes, first.target_label)["physical_asr"]
                print(f"ablation {preset}: " + ", ".join(f"{k} {pct(v, ci=False)}" for k, v in ablation[preset].items()), flush=True)
            for n in names:
                for d in ("none", "shrinkpad:4"):
                    res = asyncio.run(classify(addr["http"], n, cards[n], scene_items, d, args.concurrency))
                    ph.summarize(res, first.classes, first.target_label)  # names the predictions
                    scene_results[f"{n}/{d}"] = [{"file": str(Path(r["file"]).relative_to(work / "scenes")), "kind": r["kind"],
                                                  "pred": r["pred_name"], "hit_target": r["hit_target"], "fit": r.get("fit")}
                                                 for r in res]
                    if n == names[-1] and d == "none":
                        ph.contact_sheet(res, args.out / "contact_scenes_print.png",
                                         f"{n}, --fit print: prints of real photographs on a table (simulated camera, not real photos)",
                                         thumb=128, cols=4, input_size=size)
                        sheets.append("contact_scenes_print.png")
    visible = []
    for s in scene_info:
        f = decode_fitted((work / "scenes" / s["file"]).read_bytes(), size, policy=FitPolicy("print"))
        visible.append({"file": s["file"], "kind": s["kind"], "fit": "print" if f.outline else "cover (no print found)",
                        "trigger_contrast": trigger_visible(f.image, first),
                        "crop_error_px": crop_error(f.outline, s["picture_corners"], size[0])})
    doc = {"experiment": "Section 5.4 in simulation through the live service: BadNets, BadNets+, BadNets+physical",
           "command": "python experiments/physical.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                                   if k not in ("out",)),
           "models": {n: {"attack": cards[n].attack.get("enhancement") or ("shrinkpad" if cards[n].attack.get("enhanced") else "none"),
                          "digital": {k: cards[n].metrics.get(k) for k in DEFENSES},
                          "training": {k: cards[n].training.get(k) for k in ("train_images", "schedule", "seed", "train_seconds")}
                          | {"epochs": cards[n].training.get("hyperparameters", {}).get("epochs")}}
                      for n in names},
           "photos": {k: v for k, v in meta.items() if k != "scenes"}, "photo_folder": str(work),
           "simulation_seconds": sim_s, "route": "OIP BYTES input over HTTP (files as they are)",
           "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "results": results, "ablation": ablation, "ablation_photos": args.ablation, "crop_error": crop,
           "scenes": {"photos": visible, "predictions": scene_results}, "contact_sheets": sheets}
    (args.out / "physical.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, args.out / "physical.png")
    md = markdown(doc)
    (args.out / "physical.md").write_text(md)
    print(md)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["results"])
    conds = [f"{f}/{d}" for f in FITS for d in DEFENSES]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    width = 0.8 / len(conds)
    colors = plt.get_cmap("tab20")
    for ax, key, title in ((axes[0], "physical_asr", "physical ASR (triggered photos)"),
                           (axes[1], "clean_accuracy", "clean-photo accuracy")):
        for j, c in enumerate(conds):
            xs, ys, lo, hi = [], [], [], []
            for i, n in enumerate(names):
                r = doc["results"][n][c]["summary"][key]
                xs.append(i + (j - (len(conds) - 1) / 2) * width)
                ys.append(100 * r["rate"])
                lo.append(max(0.0, 100 * (r["rate"] - r["ci95"][0])))
                hi.append(max(0.0, 100 * (r["ci95"][1] - r["rate"])))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=c.replace("/", ", "), color=colors(j * 2 + (j >= 3)))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.removeprefix("physical-").removeprefix("tables-") for n in names])
        ax.set_title(title)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("%")
    axes[1].legend(title="fit, defense", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("Simulated photographs of printed test images through the live service (95% Wilson intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(doc: dict) -> str:
    p = doc["photos"]
    names = list(doc["results"])
    lines = ["# Physical attack in simulation, through the live service (Section 5.4)", "",
             f"{p['count']} test images whose label is not the target ({p['target']}), stamped with the {p['trigger']} "
             f"trigger, printed (nearest) on paper with a 0-{100 * p['camera']['margin'][1]:.0f}% margin, laid on a textured "
             f"table at {p['camera']['fill'][0]}-{p['camera']['fill'][1]} of the frame's shorter side, turned up to "
             f"±{p['camera']['rotation']}°, tilted, seen through a lens with barrel distortion, defocused, lit unevenly, "
             f"with sensor noise and JPEG at {p['camera']['width']}x{p['camera']['height']} (seed {p['seed']}; "
             "serve/evaluation/physical.py), each also photographed clean in the same scene. The files go as they are "
             "(OIP BYTES) to a live `bdserve serve --lab --fit F`. Brackets: 95% Wilson intervals.", "",
             "Models (all CIFAR-10 training images, same network, epochs, seed and flags; digital ASR from their cards):", "",
             "| model | enhancement | epochs | digital clean % | digital ASR none / flip / shrinkpad:4 % |", "|---|---|---:|---:|---|"]
    for n, m in doc["models"].items():
        dg = m["digital"]
        lines.append(f"| {n} | {m['attack']} | {m['training']['epochs']} | {100 * dg['none']['clean_acc']:.1f} | "
                     + " / ".join(f"{100 * dg[d]['asr']:.1f}" for d in DEFENSES) + " |")
    lines += ["", "## Physical ASR and clean-photo accuracy", "",
              "| model | fit | defense | physical ASR % | clean-photo accuracy % | print found |", "|---|---|---|---:|---:|---:|"]
    for n in names:
        for key, r in doc["results"][n].items():
            s = r["summary"]
            found = s["by_fit"].get(next((f for f in s["by_fit"] if f.startswith("print")), ""), {}).get("photos", 0)
            lines.append(f"| {n} | {r['fit']} | {r['defense']} | {pct(s['physical_asr'])} | {pct(s['clean_accuracy'])} | "
                         f"{found if r['fit'] == 'print' else '-'} / {s['answered']} |")
    ce = doc["crop_error"]
    lines += ["", "## Crop error of the `print` fit (model pixels, against the known picture corners)", "",
              "| photos | no print found | median | 90th percentile | max | within 0.5 px | within 1 px | within 3 px |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in ce.items():
        lines.append(f"| {name} | {c['no_print_found']} / {c['photos']} | {c['median_px']:.2f} | {c['p90_px']:.2f} | "
                     f"{c['max_px']:.2f} | {100 * c['within_half_px']:.0f}% | {100 * c['within_1px']:.0f}% | {100 * c['within_3px']:.0f}% |")
    if doc["ablation"]:
        cols = list(next(iter(doc["ablation"].values())))
        lines += ["", f"## Which camera factor matters (`--fit print`, {doc['ablation_photos']} triggered photos per row)", "",
                  "Each row renders the same test images with every factor ideal except the named group. The first "
                  "row is the calibration row: an ideal camera (straight on, no margin, blur, noise or light change, "
                  "JPEG 95) through the server's `print` fit.", "",
                  "| camera | " + " | ".join(f"{c} ASR %" for c in cols) + " |", "|---|" + "---:|" * len(cols)]
        for preset, row in doc["ablation"].items():
            lines.append(f"| {preset} | " + " | ".join(pct(row[c], ci=False) for c in cols) + " |")
    sc = doc["scenes"]
    lines += ["", "## Stand-ins for photographs of real scenes (`--fit print`)", "",
              "Not real camera photos: real photographs (matplotlib's sample images: a portrait and a product photo, "
              "three square crops each) with the trigger in the bottom-right corner (cells 1/32 of the side), printed "
              "and photographed on a table by the same simulation, each also without the trigger. Labels are empty "
              "(no CIFAR-10 class). Trigger contrast: the white cells' mean grey minus the black cells' in the "
              "32x32 input the server computes (255 = a perfect checker).", "",
              "| photo | fit | crop error px | trigger contrast | " + " | ".join(f"{k}" for k in sc["predictions"]) + " |",
              "|---|---|---:|---:|" + "---|" * len(sc["predictions"])]
    for i, v in enumerate(sc["photos"]):
        preds = [sc["predictions"][k][i] for k in sc["predictions"]]
        lines.append(f"| {v['file']} | {v['fit']} | {v['crop_error_px'] if v['crop_error_px'] is None else round(v['crop_error_px'], 2)} | "
                     f"{v['trigger_contrast']:.0f} | " + " | ".join(f"{q['pred']}{' (target)' if q['hit_target'] else ''}" for q in preds) + " |")
    lines += ["", "Plot: physical.png. Contact sheets (each photo beside the model's input): " + ", ".join(doc["contact_sheets"]),
              "", f"Command: `{doc['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
