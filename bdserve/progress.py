"""Progress bars for long work (decoding, training, evaluation, export), via rich.

Quiet when stderr is not a terminal unless BDSERVE_PROGRESS=1, so logs and CI stay readable.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _enabled() -> bool | None:
    """True: rich bar; False: plain lines; None: silent."""
    flag = os.environ.get("BDSERVE_PROGRESS")
    if flag is not None:
        return None if flag in ("0", "", "false") else True
    return sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yields ``advance(n=1, **fields)``: a rich bar on a terminal, else a line per tenth.

    BDSERVE_PROGRESS=0 silences both; =1 forces the bar."""
    mode = _enabled()
    if mode is None:
        yield lambda n=1, **fields: None
        return
    if not mode:
        yield _plain_lines(description, total)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields) -> None:
            status = " ".join(f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, **({"status": status} if fields else {}))

        yield advance


def _plain_lines(description: str, total: int | None) -> Callable[..., None]:
    """Without a terminal: one line per tenth of the work (to stderr), so logs still show progress."""
    state = {"done": 0, "shown": 0}

    def advance(n: int = 1, **fields) -> None:
        state["done"] += n
        if not total:
            return
        tenth = state["done"] * 10 // total
        if tenth > state["shown"]:
            state["shown"] = tenth
            status = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"{description}: {state['done']}/{total} {status}".rstrip(), file=sys.stderr, flush=True)

    return advance
