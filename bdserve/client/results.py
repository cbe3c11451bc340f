"""What the client returns: typed answers, read with the server's own protocol code (bdserve.serve.oip)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bdserve.client.retry import PermanentError
from bdserve.serve import oip


@dataclass(frozen=True)
class ClassScore:
    label: str
    index: int | None  # the class index (None where the answer names the label only: TorchServe's top-k)
    probability: float


@dataclass
class Result:
    """One request's answer for B images (several /predictions answers are joined into one).

    ``probabilities`` (B, C) when every class was asked for, ``top`` (B lists of k) with ``top_k``;
    ``per_image`` holds every per-image output the server sent (the detection fields among them)."""

    labels: list[str]
    model: str
    version: str
    probabilities: np.ndarray | None = None
    top: list[list[ClassScore]] | None = None
    per_image: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)  # per request: defense, fit, summaries
    request_id: str | None = None
    attempts: int = 1  # tries it took (transient failures retried)
    seconds: float = 0.0  # of the attempt that answered

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def defense(self) -> str | None:
        """The defense the server says it applied (its canonical spec)."""
        return self.parameters.get(oip.DEFENSE)

    @property
    def fit(self) -> str | None:
        """How the server fitted encoded images to the model's input (None for tensors)."""
        return self.parameters.get("fit")

    @property
    def suspected_trigger(self) -> np.ndarray | None:
        """bool (B,) when the server runs trigger detectors (--detect), else None."""
        v = self.per_image.get("suspected_trigger")
        return None if v is None else np.asarray(v, dtype=bool).reshape(-1)

    @property
    def trigger_score(self) -> np.ndarray | None:
        """float (B,): the margin over the calibrated threshold (> 0: suspected), when detecting."""
        v = self.per_image.get("trigger_score")
        return None if v is None else np.asarray(v, dtype=np.float32).reshape(-1)


def from_response(resp: oip.InferResponse, batch: int) -> Result:
    """An OIP answer -> Result; PermanentError when it does not answer ``batch`` images."""
    by_name = {t.name: t for t in resp.outputs}
    label = by_name.get(oip.OUTPUT_LABEL)
    if label is None:
        raise PermanentError(f"the answer has no {oip.OUTPUT_LABEL!r} output")
    labels = [b.decode() if isinstance(b, bytes) else str(b) for b in label.value]
    if len(labels) != batch:
        raise PermanentError(f"asked about {batch} images, the answer holds {len(labels)} labels")
    probs = top = None
    t = by_name.get(oip.OUTPUT_PROBS)
    if t is not None and t.datatype == "BYTES":  # the classification extension: "score:index:label"
        top = [[ClassScore(lab, i, s) for s, i, lab in row] for row in oip.read_classification(t.value, t.shape)]
    elif t is not None:
        probs = np.asarray(t.value, dtype=np.float32).reshape(batch, -1)
    per_image = {n: np.asarray(by_name[n].value).reshape(-1)
                 for n in oip.per_image_output_names(list(by_name))}
    return Result(labels, resp.model_name, resp.model_version, probs, top, per_image, dict(resp.parameters),
                  resp.id)


def from_predictions(scores: Any, headers, model: str) -> Result:
    """A /predictions answer for one image (TorchServe's top-k ``{label: probability}``, best
    first) and its headers (the fields oip.prediction_headers writes) -> Result."""
    try:
        ranked = sorted(scores.items(), key=lambda kv: -float(kv[1]))  # stable: first of equals stays first
    except (AttributeError, TypeError, ValueError) as e:
        raise PermanentError(f"unreadable /predictions answer: {e}") from None
    if not ranked:
        raise PermanentError("the /predictions answer holds no class")
    parameters, per_image = oip.read_headers(headers)
    return Result([ranked[0][0]], model, "", None, [[ClassScore(k, None, float(v)) for k, v in ranked]],
                  per_image, parameters, headers.get("x-request-id"))


def joined(results: list[Result]) -> Result:
    """Single-image answers -> one Result over all of them (in order)."""
    first = results[0]
    if len(results) == 1:
        return first
    names = set.intersection(*(set(r.per_image) for r in results))
    return Result(
        [label for r in results for label in r.labels], first.model, first.version,
        None if any(r.probabilities is None for r in results) else np.concatenate([r.probabilities for r in results]),
        None if any(r.top is None for r in results) else [row for r in results for row in r.top],
        {n: np.concatenate([r.per_image[n] for r in results]) for n in names},
        first.parameters, first.request_id, max(r.attempts for r in results), max(r.seconds for r in results))
