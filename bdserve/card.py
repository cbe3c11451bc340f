"""card.json: everything a reader of a model directory needs besides the weights.

A model directory holds ``model.onnx`` (or a TorchScript ``model.pt``) and, usually,
``card.json``. Cards are plain JSON: loading one never executes or unpickles anything.
Only ``name`` is required; a foreign classifier's card (``bdserve import``) may hold
just the input shape, class names and normalisation.

Loading validates the card against its typed schema (pydantic, over the dataclass below)
and a few rules that types cannot say (three input channels, a defense spec that parses,
a positive std), so that a bad card fails at load with a message naming the file and
the field, not on every request later.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

CARD_FILE = "card.json"
CARD_SCHEMA_VERSION = 1


@dataclass
class ModelCard:
    name: str
    version: str = "1"
    architecture: str = "unknown"
    # Input contract of model.onnx: float32 NCHW, values in input_range; when
    # normalization_in_graph is false the server applies (x - mean) / std itself.
    input_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    input_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    normalization_in_graph: bool = True
    classes: list[str] = field(default_factory=list)
    defense: str = "shrinkpad:4"  # what the server applies unless told otherwise
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. {"none": {"clean_acc":..,"asr":..}, ...}
    attack: dict[str, Any] | None = None  # kind, trigger, target, poison_rate, enhanced, max_shrink, seed
    training: dict[str, Any] = field(default_factory=dict)  # data, epochs, schedule, seed, wall time, device
    detection: dict[str, Any] | None = None  # calibrated trigger detectors (bdserve calibrate; serve/detection.py)
    schema_version: int = CARD_SCHEMA_VERSION

    # pydantic reads this when validating the dataclass: unknown fields are errors, and a
    # number is never silently taken for a string (``name: 123``).
    __pydantic_config__ = ConfigDict(extra="forbid", strict=False, coerce_numbers_to_str=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = CARD_FILE) -> "ModelCard":
        """Validate a parsed card; ValueError names ``source`` and every bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a card must be a JSON object, got {type(d).__name__}")
        if isinstance(d.get("version"), int) and not isinstance(d.get("version"), bool):
            d = {**d, "version": str(d["version"])}  # "version": 2 is a common, harmless spelling
        try:
            card = _ADAPTER.validate_python(d)
        except ValidationError as e:
            raise ValueError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None
        problems = card.problems()
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return card

    def problems(self) -> list[str]:
        """What types cannot say: each entry names the field."""
        out = []
        if not self.name.strip():
            out.append("field 'name': must not be empty")
        if len(self.input_shape) != 3 or any(d <= 0 for d in self.input_shape):
            out.append(f"field 'input_shape': must be [C, H, W] with positive sizes, got {self.input_shape}")
        elif self.input_shape[0] != 3:
            out.append(f"field 'input_shape': the server feeds RGB images, so C must be 3, got {self.input_shape} "
                       "(export the model to take 3 channels)")
        lo_hi = self.input_range
        if len(lo_hi) != 2 or not all(math.isfinite(v) for v in lo_hi) or lo_hi[0] >= lo_hi[1]:
            out.append(f"field 'input_range': must be [low, high] with low < high, got {lo_hi}")
        for key, values in (("mean", self.mean), ("std", self.std)):
            if not all(math.isfinite(v) for v in values):
                out.append(f"field {key!r}: values must be finite, got {values}")
        if not self.normalization_in_graph and any(v <= 0 for v in self.std):
            out.append(f"field 'std': must be > 0 where the server normalises, got {self.std}")
        if len(set(self.classes)) != len(self.classes):
            out.append("field 'classes': class names must be unique")
        try:
            from bdserve.specs import parse_spec

            parse_spec(self.defense)
        except ImportError:
            pass
        except ValueError as e:
            out.append(f"field 'defense': {e}")
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CARD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        """From a card.json file or the model directory that holds one."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        try:
            d = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(d, str(path))

    @classmethod
    def from_runtime(cls, runtime, card: "ModelCard | None" = None, *, name: str = "model",
                     input_size: tuple[int, int] | None = None, classes: list[str] | None = None,
                     mean: list[float] | None = None, std: list[float] | None = None) -> "ModelCard":
        """The card of a model as its runtime shows it: the one place a card is derived from a graph.

        Starts from ``card`` (a loaded card.json; else a foreign model's card named ``name``).
        The input shape comes from ``input_size``, else the graph (it must agree with a given
        card), else the card; the class count from one forward pass (names from ``classes``,
        else the card's, else ``class_0 ..``); ``mean``/``std`` mean normalisation outside the
        graph. Raises ValueError when the pieces disagree."""
        import torch

        has_card = card is not None
        card = cls.from_dict(card.to_dict()) if has_card else cls(name=name, architecture="foreign")
        graph = getattr(runtime, "input_shape", None)
        if input_size is not None:
            c = graph[0] if graph and graph[0] else card.input_shape[0]
            card.input_shape = [int(c), int(input_size[0]), int(input_size[1])]
        elif graph and all(graph):
            if has_card and list(graph) != list(card.input_shape):
                raise ValueError(f"card.json says input {card.input_shape}, the graph {list(graph)}")
            card.input_shape = list(graph)
        elif not has_card:
            raise ValueError(f"the graph's input size is dynamic ({graph}); give an input size or a card")
        if mean is not None or std is not None:
            card.mean = list(mean if mean is not None else [0.0] * 3)
            card.std = list(std if std is not None else [1.0] * 3)
            card.normalization_in_graph = False
        if classes:
            card.classes = list(classes)
        n_out = runtime(torch.zeros((1, *card.input_shape))).shape[-1]  # also warms the runtime up
        if not card.classes:
            card.classes = [f"class_{i}" for i in range(n_out)]
        elif len(card.classes) != n_out:
            raise ValueError(f"{len(card.classes)} class names but the model outputs {n_out} scores")
        return card

    def trigger(self):
        """The attack's trigger, or None for a model this project did not infect."""
        if not self.attack or "trigger" not in self.attack:
            return None
        from bdserve.transforms.triggers import Trigger

        return Trigger.from_dict(self.attack["trigger"])

    @property
    def target_label(self) -> int | None:
        return None if not self.attack else self.attack.get("target")


_ADAPTER = TypeAdapter(ModelCard)


def _describe(err: dict) -> str:
    """One pydantic error as "field 'a.b': what is wrong (got VALUE)"."""
    where = ".".join(str(p) for p in err["loc"]) or "(card)"
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown field {where!r}"
    if err["type"] == "missing":
        return f"field {where!r}: required"
    return f"field {where!r}: {err['msg']} (got {got})"
