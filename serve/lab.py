"""The photo lab: a page at ``/lab`` where a person uploads (or shoots, on a phone) a photo and
sees the image the model saw and its answers undefended and under each defense the server offers.

Mounted only on a server started with ``--lab`` (a production server answers 404 for every
route here):

    GET  /lab                          the page: plain HTML, CSS and a small script from
                                       bdserve/serve/static (no framework, no CDN: works offline)
    GET  /lab/static/{file}            its stylesheet and script
    GET  /lab/models                   per model: classes, the server's defense, the defenses the
                                       page compares, the attack's target class when the card has one
    POST /lab/models/{m}/analyze       body: the photo's bytes as uploaded; query ``label`` (a class
                                       name, or empty: not one of the classes) and ``kind``
                                       (``triggered``, ``clean`` or empty), kept with --lab-keep

The analysis answers in one JSON document: the fitted input as a PNG data URL, the fit applied
(under ``--fit print`` the print's outline in the photo, which the page draws over it) and, per
defense, the top-3 classes with probabilities and the detection fields the pipeline produced.
It is the pipeline's own path: one decode and fit (``DefendedModel.decode_with_fits``), then one
``InferenceService.infer`` per defense with those very pixels as the UINT8 input (the batcher,
then ``DefendedModel.predict``), so each answer equals ``/predictions?defense=SPEC``.
"""

from __future__ import annotations

import asyncio
import base64
import io
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from bdserve.serve import oip
from bdserve.serve.errors import InvalidInput, NotFound
from bdserve.serve.http_app import _observed
from bdserve.serve.images import Fitted
from bdserve.serve.lab_keep import KINDS, LabKeeper
from bdserve.serve.pipeline import DefendedModel, Prediction
from bdserve.serve.service import InferenceService

TOP_K = 3
DEFAULT_SHRINK = 4  # the paper's ShrinkPad-4, when neither the served defense nor the card names a size
STATIC = {"lab.css": "text/css; charset=utf-8", "lab.js": "text/javascript; charset=utf-8"}
# The page loads nothing from elsewhere and runs no inline script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def mount_lab(app: FastAPI, service: InferenceService, keep_dir: str | Path | None = None) -> None:
    """Add the lab's routes to the HTTP app, on a --lab server only (every model lets requests
    choose the defense); elsewhere they do not exist and answer 404."""
    if not all(m.lab for m in service.models.values()):
        if keep_dir is not None:
            raise ValueError("--lab-keep needs --lab")
        return
    app.include_router(lab_router(service, None if keep_dir is None else LabKeeper(keep_dir)))


def compared_defenses(model: DefendedModel) -> list[str]:
    """Undefended, the server's own defense, Flip and ShrinkPad-k (canonical specs, no repeats).

    k is the served defense's shrink size, else the size an enhanced attack was trained
    against (the card's ``max_shrink``), else 4."""
    k = _served_shrink(model.defense_spec)
    if k is None:
        k = (model.card.attack or {}).get("max_shrink") or DEFAULT_SHRINK
    specs = ["none", model.defense_spec, "flip", f"shrinkpad:{int(k)}"]
    return list(dict.fromkeys(model.resolve_defense(s).spec for s in specs))


def _served_shrink(spec: str) -> int | None:
    for part in spec.split("+"):
        name, _, arg = part.partition(":")
        if name == "shrinkpad" and arg.isdigit():
            return int(arg)
    return None


def model_info(model: DefendedModel) -> dict:
    target = model.card.target_label
    return {
        "name": model.name,
        "version": model.version,
        "classes": model.classes,
        "input_size": list(model.input_size),
        "served_defense": model.defense_spec,
        "defenses": compared_defenses(model),
        "detect": model.detect,
        "fit": model.fit.policy,
        "target": None if target is None else model.classes[target],
    }


def png_data_url(x: torch.Tensor) -> str:
    """uint8 (3, H, W) -> a PNG data URL (lossless: the page shows exactly what the model got)."""
    buf = io.BytesIO()
    Image.fromarray(x.detach().cpu().permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def defense_result(model: DefendedModel, pred: Prediction) -> dict:
    """One defense's answer for one image: top-k, and what detection said when it is on."""
    top = model.postprocess(pred, top_k=TOP_K)[0]
    row = {
        "defense": pred.defense,
        "label": pred.labels[0],
        "top": [{"class": c, "probability": p} for c, p in top.items()],
        "suspected": None if pred.suspected is None else bool(pred.suspected[0]),
    }
    score = getattr(pred, "trigger_score", None)  # present when the pipeline scores triggers
    row["trigger_score"] = None if score is None else float(np.asarray(score).reshape(-1)[0])
    return row


def fit_info(model: DefendedModel, fitted: Fitted) -> dict:
    """What the fit did to one photo: the policy applied, its spec as responses word it, whether it
    fell back to cover (no print found), the print's outline (corners x, y: top-left, top-right,
    bottom-right, bottom-left; None under cover) and the frame (width, height) of the upright photo
    whose pixels the outline is in."""
    return {"name": fitted.fit, "spec": model.describe_fits([fitted]), "fallback": fitted.fallback,
            "outline": fitted.outline, "frame": None if fitted.frame is None else list(fitted.frame)}


def _check_choice(value: str, allowed: list[str], what: str) -> str:
    if value and value not in allowed:
        raise InvalidInput(f"{what} {value!r} is not one of: {', '.join(allowed)} (or empty)")
    return value


def lab_router(service: InferenceService, keep: LabKeeper | None = None) -> APIRouter:
    router = APIRouter()
    static = resources.files("bdserve.serve") / "static"
    page = (static / "lab.html").read_bytes()
    assets = {name: (static / name).read_bytes() for name in STATIC}

    @router.get("/lab")
    async def lab_page():
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @router.get("/lab/static/{name}")
    async def lab_static(name: str):
        if name not in assets:
            raise NotFound(f"no such lab file {name!r}")
        return Response(assets[name], media_type=STATIC[name], headers=PAGE_HEADERS)

    @router.get("/lab/models")
    async def lab_models():
        return {"models": [model_info(m) for m in service.models.values()], "keeping": keep is not None}

    @router.post("/lab/models/{name}/analyze")
    async def lab_analyze(name: str, request: Request):
        return await _observed(service, name, _analyze(service, keep, name, request))

    return router


async def _analyze(service: InferenceService, keep: LabKeeper | None, name: str, request: Request) -> Response:
    model = service.get(name)
    label = _check_choice(request.query_params.get("label", ""), model.classes, "label")
    kind = _check_choice(request.query_params.get("kind", ""), list(KINDS), "kind")
    blob = await request.body()
    x, how = await asyncio.to_thread(model.decode_with_fits, [blob])  # decoded and fitted once, off the event loop
    pixels = oip.Tensor(oip.TENSOR_INPUT, "UINT8", list(x.shape), x.cpu().numpy())
    preds = await asyncio.gather(*(
        service.predict(oip.InferRequest(model=model.name, input=pixels, parameters={oip.DEFENSE: d}))
        for d in compared_defenses(model)))
    doc = {
        "model": model.name,
        "version": model.version,
        "served_defense": model.defense_spec,
        "fit": fit_info(model, how[0]),
        "fitted_size": list(model.input_size),
        "fitted_png": png_data_url(x[0]),
        "results": [defense_result(model, p) for p in preds],
        "kept": None,
    }
    if keep is not None:
        doc["kept"] = await asyncio.to_thread(keep.append, blob, label, kind, doc)
    return JSONResponse(doc)
