"""Pieces shared by the verbs: argument types, console output, progress bars, quiet library logs."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any, Iterator


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and advice; slimlm prints what matters."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def console(stderr: bool = False):
    from rich.console import Console

    c = Console(stderr=stderr, highlight=False)
    if not c.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
        c = Console(stderr=stderr, highlight=False, width=160)
    return c


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """Yields `update(task, done, total, info="")`; draws a rich progress bar on stderr when enabled
    (info, e.g. the current loss, is shown after the task's name)."""
    if not enabled:
        yield lambda task, done, total, info="": None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Redrawn from update() (at most 10 times a second), not by rich's refresh thread: on a 2-core machine
    # that thread would preempt the compute threads of whatever runs, speed measurements included.
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console(stderr=True), transient=True, auto_refresh=False) as bar:
        ids: dict[str, Any] = {}
        drawn = [0.0]

        def update(task: str, done: int, total: int, info: str = "") -> None:
            if task not in ids:
                ids[task] = bar.add_task(task, total=total)
            bar.update(ids[task], completed=done, total=total, description=f"{task} {info}" if info else task)
            now = time.monotonic()
            if now - drawn[0] > 0.1 or done >= total:
                bar.refresh()
                drawn[0] = now

        yield update


def print_table(rows: list[dict[str, str]], title: str | None = None) -> None:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    for c in cols:
        numeric = all(_looks_numeric(str(r.get(c, ""))) for r in rows)
        table.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in cols))
    console().print(table)


def _looks_numeric(text: str) -> bool:
    try:
        float(text.rstrip("%x").replace("+", "", 1))
        return True
    except ValueError:
        return text == ""
