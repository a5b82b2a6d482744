"""Rich progress bars for the model tooling's long commands (gate-fit, gate-evaluate, drift-reference,
proxy-eval), as `model evaluate` and `model deploy` show them. The work functions take an optional
`progress`; `tracked` wraps an iteration in a task of it (or yields as is without one), so the work
and its order (random draws included) are the same with or without a bar."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def progress_bar(console: Console | None = None) -> Progress:
    """A bar per step: description, bar, done/total, elapsed, remaining (cleared when done)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def tracked(progress: Progress | None, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, advancing a task of `progress` by one per item (total: len(items) if it has one)."""
    if progress is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    task = progress.add_task(description, total=total)
    for item in items:
        yield item
        progress.advance(task)
    progress.update(task, total=progress.tasks[task].completed)  # ends full even when total was a guess
