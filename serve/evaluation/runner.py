"""Send held-out sets through bdserve.client: batches, a bounded number in flight, one progress bar.

Every image ends in exactly one state: predicted (correct or wrong is the report's
business) or an error. A batch's answer is written once, after its last attempt (the
client retries transient failures), so a retried batch cannot be counted twice; a batch
that fails for good marks all its images as errors with the reason, so nothing is dropped
silently.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from bdserve.client import AsyncClient, PermanentError, Result, RetriesExhausted
from bdserve.progress import progress_bar
from bdserve.specs import canonical_spec
from bdserve.serve.evaluation.heldout import HeldOut

NO_ANSWER = -1
INTERRUPTED = "not sent: the run was interrupted"


@dataclass
class SetResult:
    name: str
    labels: np.ndarray  # true labels (N,)
    preds: np.ndarray  # predicted class (N,), NO_ANSWER where the request failed
    suspected: np.ndarray | None  # bool (N,) when the server detects; False where no answer
    errors: Counter = field(default_factory=Counter)  # reason -> images
    latencies_s: list[float] = field(default_factory=list)  # per answered request (its last attempt)
    requests: int = 0
    retries: int = 0
    applied: Counter = field(default_factory=Counter)  # defense the server said it applied -> images
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # float per-image outputs (trigger scores); NaN: no answer

    @property
    def answered(self) -> np.ndarray:
        return self.preds != NO_ANSWER

    @property
    def n_errors(self) -> int:
        return int((~self.answered).sum())


@dataclass
class RunResult:
    defense: str | None  # what was asked (None: the server's own)
    sets: dict[str, SetResult]
    seconds: float
    interrupted: bool = False  # SIGINT / cancelled: the sets hold what was answered until then
    stopped: str | None = None  # why the run stopped early (the circuit breaker), else None

    @property
    def images(self) -> int:
        return sum(len(s.labels) for s in self.sets.values())


def canonical(spec: str | None) -> str | None:
    """The spec as the server will name it (no torch needed: bdserve.specs)."""
    return None if spec is None else canonical_spec(spec)


def class_ids(labels: list[str], classes: list[str]) -> np.ndarray:
    """Label names as the server answers them -> the card's class indices, so that the client
    scores exactly the server's top-1."""
    index = {c: i for i, c in enumerate(classes)}
    try:
        return np.array([index[n] for n in labels], dtype=np.int64)
    except KeyError as e:
        raise PermanentError(f"the server answered label {e.args[0]!r}, not one of the card's classes") from None


async def ask(call: Callable[[], Awaitable[Result]], want: str | None,
              on_retries: Callable[[int], None] | None = None) -> Result:
    """One request (the client retries what is transient; ``on_retries`` hears how many retries it
    took, answered or not). Raises PermanentError, also when the server says it applied another
    defense than ``want`` (canonical spec)."""
    try:
        answer = await call()
    except RetriesExhausted as e:
        if on_retries is not None:
            on_retries(getattr(e, "attempts", 1) - 1)
        raise
    if on_retries is not None:
        on_retries(answer.attempts - 1)
    if want is not None and answer.defense is not None and answer.defense != want:
        raise PermanentError(f"asked for defense {want!r}, the server applied {answer.defense!r} "
                             "(is it running with --lab?)")
    return answer


async def run_sets(client: AsyncClient, sets: list[HeldOut], classes: list[str], *, defense: str | None = None,
                   batch_size: int = 256, concurrency: int = 4, description: str = "eval") -> RunResult:
    """Send every set through ``client`` under one defense; the sets share the in-flight budget.
    ``classes`` (the card's) turn the answered labels into class indices.

    With the client's circuit breaker (``client.breaker``), a server unreachable several times in a
    row stops the run: every batch not yet answered then fails at once, instead of each spending
    its own retries on a dead server. Cancelled (SIGINT), the run returns what was answered so
    far, with ``interrupted`` set and the rest counted as errors."""
    if client.max_batch_size is not None:
        batch_size = min(batch_size, client.max_batch_size)
    want = canonical(defense)
    results = {s.name: SetResult(s.name, s.labels.copy(), np.full(len(s), NO_ANSWER, dtype=np.int64), None)
               for s in sets}
    gate = asyncio.Semaphore(max(1, concurrency))
    total = sum(len(s) for s in sets)

    with progress_bar(description, total=total) as advance:
        async def one(s: HeldOut, res: SetResult, start: int, stop: int) -> None:
            async with gate:
                def retried(n: int) -> None:
                    res.retries += n

                try:
                    answer = await ask(lambda: client.infer(s.images[start:stop], defense=defense, top_k=0),
                                       want, retried)
                    preds = class_ids(answer.labels, classes)
                except PermanentError as e:
                    res.errors[str(e)] += stop - start
                else:
                    res.preds[start:stop] = preds
                    if answer.suspected_trigger is not None:
                        if res.suspected is None:
                            res.suspected = np.zeros(len(res.labels), dtype=bool)
                        res.suspected[start:stop] = answer.suspected_trigger
                    for name, v in answer.per_image.items():
                        if np.asarray(v).dtype.kind == "f":
                            res.scores.setdefault(name, np.full(len(res.labels), np.nan))[start:stop] = v
                    res.applied[answer.defense or "?"] += stop - start
                    res.latencies_s.append(answer.seconds)
                res.requests += 1
                advance(stop - start)

        t0 = time.perf_counter()
        interrupted = False
        try:
            await asyncio.gather(*(one(s, results[s.name], i, min(i + batch_size, len(s)))
                                   for s in sets for i in range(0, len(s), batch_size)))
        except asyncio.CancelledError:
            interrupted = True  # keep what was answered; the caller writes a partial report
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            for res in results.values():
                counted = sum(res.errors.values())
                missing = int((~res.answered).sum()) - counted
                if missing > 0:
                    res.errors[INTERRUPTED] += missing
        seconds = time.perf_counter() - t0
    breaker = getattr(client, "breaker", None)
    stopped = f"the server was unreachable: {breaker.last}" if breaker is not None and breaker.open else None
    return RunResult(defense, results, seconds, interrupted, stopped)
