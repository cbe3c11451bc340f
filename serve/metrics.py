"""Prometheus metrics of one server, on its own CollectorRegistry (several servers
can live in one process, e.g. in tests). Names follow architecture.md; labels are
bounded: model names come from the store (an unknown model a client asked for is
counted as ``_unknown``), labels from the card's class list, codes from HTTP/gRPC.

Under ``bdserve serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set by the parent) every
worker writes its counts to prometheus-client's multiprocess files and ``render`` sums the
workers' series; the model description and python_info are the same in every worker and
come from the answering one. The per-process process_* and GC series are left out there:
they would describe whichever worker answered the scrape.
"""

from __future__ import annotations

import os

from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge,
                               Histogram, Info, generate_latest)
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the HTTP app)
from prometheus_client.multiprocess import MultiProcessCollector

UNKNOWN_MODEL = "_unknown"
OTHER_DEFENSE = "_other"
_MAX_DEFENSE_LABELS = 16  # lab-mode clients choose defenses: keep the label set bounded
_MAX_LABEL_CHARS = 64  # and each label short

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Trigger scores are margins over the calibrated threshold (serve/detection.py): 0 is the
# threshold (flagged above), -1 a typical clean image.
_MARGIN = (-4, -2, -1.5, -1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 4, 8)


class _Children:
    """A metric's labelled children, cached by their label values. prometheus-client's
    ``labels()`` sorts, validates and locks on every call (about 3 us); a request and its
    batch ask for eight children. Safe to cache because every label here is bounded."""

    def __init__(self, metric):
        self.metric = metric
        self._children: dict[tuple, object] = {}

    def __call__(self, *values):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        # Series every worker knows alike (only this worker's copy is rendered).
        self._local = CollectorRegistry() if self.multiprocess_dir else r
        # The standard process_* and python_* series (memory, CPU, open fds, GC), which the
        # default registry has and a registry of our own must ask for.
        for collector in ((PLATFORM_COLLECTOR,) if self.multiprocess_dir
                          else (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)):
            self._local.register(collector)
        self.requests = Counter("bdserve_requests", "Requests answered", ["model", "protocol", "code"], registry=r)
        self.request_duration = Histogram(
            "bdserve_request_duration_seconds", "Time from request to response",
            ["model", "protocol"], buckets=_LATENCY, registry=r)
        self.defense_duration = Histogram(
            "bdserve_defense_duration_seconds", "Time the defense took per batch",
            ["model", "defense"], buckets=_LATENCY, registry=r)
        self.inference_duration = Histogram(
            "bdserve_inference_duration_seconds", "Time the runtime took per batch",
            ["model", "backend"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("bdserve_batch_size", "Images per executed batch", ["model"],
                                    buckets=_BATCH, registry=r)
        self.inflight = Gauge("bdserve_inflight_requests", "Requests being processed", ["model"], registry=r,
                              multiprocess_mode="livesum")
        self.queued = Gauge("bdserve_queue_images", "Images in the model's batcher: waiting for a batch or in the "
                            "running one (refused with 503 beyond --max-queue)", ["model"], registry=r,
                            multiprocess_mode="livesum")
        self._defense_labels: dict[str, set[str]] = {}
        self.model_info = Info("bdserve_model", "Served model", ["model"], registry=self._local)
        self.predictions = Counter("bdserve_predictions", "Top-1 predictions by class", ["model", "label"], registry=r)
        self.suspected = Counter("bdserve_suspected_triggers",
                                 "Images a calibrated trigger detector flags (--detect)", ["model"], registry=r)
        self.trigger_score = Histogram(
            "bdserve_trigger_score", "Trigger score per image and detector: margin over the calibrated threshold "
            "(> 0 flagged, -1 the clean median)", ["model", "method"], buckets=_MARGIN, registry=r)
        self.false_alarm_ratio = Gauge(
            "bdserve_detection_false_alarm_ratio",
            "Share of clean images the served detectors flag, as calibrated (bdserve calibrate)", ["model"], registry=r)
        self.rejected = Counter("bdserve_suspected_rejections",
                                "Requests refused because an image was flagged (--on-suspect reject)", ["model"],
                                registry=r)

        # The children the request and batch path counts with, by label values in declaration order.
        self._requests, self._request_duration = _Children(self.requests), _Children(self.request_duration)
        self._batch_size, self._predictions = _Children(self.batch_size), _Children(self.predictions)
        self._defense_duration, self._inference_duration = (_Children(self.defense_duration),
                                                            _Children(self.inference_duration))
        self._suspected, self._trigger_score = _Children(self.suspected), _Children(self.trigger_score)
        self.inflight_of, self.queued_of = _Children(self.inflight), _Children(self.queued)

    def describe_model(self, model) -> None:
        self.model_info.labels(model=model.name).info({
            "version": model.version, "backend": model.backend,
            "device": model.runtime_device, "defense": model.defense_spec,
        })
        self.inflight.labels(model=model.name)
        self.queued.labels(model=model.name)
        if model.detect:
            self.suspected.labels(model=model.name)
            self.rejected.labels(model=model.name)
            self.false_alarm_ratio.labels(model=model.name).set(model.detection.expected_far)
            for method in model.detect_methods:
                self.trigger_score.labels(model=model.name, method=method)

    def observe_request(self, model: str, protocol: str, code: str | int, seconds: float) -> None:
        self._requests(model, protocol, str(code)).inc()
        self._request_duration(model, protocol).observe(seconds)

    def observe_batch(self, model, size: int, pred) -> None:
        self._batch_size(model.name).observe(size)
        self._defense_duration(model.name, self._defense_label(model, pred.defense)).observe(
            pred.timings.get("defense", 0.0))
        self._inference_duration(model.name, model.backend).observe(pred.timings.get("inference", 0.0))
        for label in pred.labels:
            self._predictions(model.name, label).inc()
        if pred.suspected is not None:
            self._suspected(model.name).inc(int(pred.suspected.sum()))
        for method in pred.detector_methods:
            hist = self._trigger_score(model.name, method)
            for v in pred.detector_score(method):
                hist.observe(float(v))

    def _defense_label(self, model, spec: str) -> str:
        seen = self._defense_labels.setdefault(model.name, {model.defense_spec})
        if spec in seen:
            return spec
        if len(seen) < _MAX_DEFENSE_LABELS and len(spec) <= _MAX_LABEL_CHARS:
            seen.add(spec)
            return spec
        return OTHER_DEFENSE

    def render(self) -> bytes:
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        workers = CollectorRegistry()
        MultiProcessCollector(workers, path=self.multiprocess_dir)
        return generate_latest(workers) + generate_latest(self._local)
