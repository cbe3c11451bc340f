"""Progress bars for long work (decoding, training, evaluation, export), via rich.

Quiet when stderr is not a terminal unless BDSERVE_PROGRESS=1, so logs and CI stay readable.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


DESCRIPTION_WIDTH = 24  # with a 12-cell bar, the counts and times fit on an 80-column terminal
FIXED_WIDTH = DESCRIPTION_WIDTH + 12 + 11 + 7 + 7 + 5  # description, bar, 50000/50000, two times, gaps


def _short(description: str, width: int = DESCRIPTION_WIDTH) -> str:
    """A long description (a data path) loses its middle, so the counts after it stay visible."""
    if len(description) <= width:
        return description
    head = (width - 1) // 3
    return description[:head] + "…" + description[-(width - 1 - head):]


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
    # Only the status text may be squeezed: the counts and times stay whole on an 80-column terminal.
    columns = [
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=12, table_column=Column(no_wrap=True)),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        TimeRemainingColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
    ]
    with Progress(*columns, transient=False) as progress:
        columns[-1].get_table_column().max_width = max(1, progress.console.width - FIXED_WIDTH)
        task = progress.add_task(_short(description), total=total, status="")

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
