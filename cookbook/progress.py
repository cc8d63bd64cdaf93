"""Rich progress bars and the console every command prints to."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)  # progress, status and errors
out = Console(highlight=False)  # results: summaries, tables, decoded text


class RateBar:
    """A progress bar over bytes of input that also shows docs/s, MB/s and tokens/s."""

    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task
        self.start = time.perf_counter()

    def update(self, completed: int, docs: int = 0, tokens: int = 0, nbytes: int = 0) -> None:
        if self.progress is None:
            return
        dt = max(time.perf_counter() - self.start, 1e-9)
        rates = f"{docs / dt:,.0f} docs/s  {nbytes / dt / 1e6:,.1f} MB/s  {tokens / dt:,.0f} tokens/s"
        self.progress.update(self.task, completed=completed, rates=rates)


@contextlib.contextmanager
def rate_progress(description: str, total: int, enabled: bool = True) -> Iterator[RateBar]:
    if not enabled:
        yield RateBar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rates]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,  # gone when done (the command prints a summary) or failed
    )
    with progress:
        task = progress.add_task(description, total=total, rates="")
        yield RateBar(progress, task)
        progress.update(task, completed=total)


class GenerationBar:
    """Prompts done of a generation run, with this run's prompts/s and generated tokens/s. ``advance(prompts,
    tokens)`` as a backend finishes work (from any thread); ``shard_done(prompts)`` sets the count to what is
    written, so the bar never claims more than the output holds."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True):
        self.total, self.done, self.enabled = total, done, enabled
        self.prompts = self.tokens = 0
        self.progress: Progress | None = None

    def __enter__(self) -> "GenerationBar":
        self.start = time.perf_counter()
        if self.enabled:
            self.progress = Progress(TextColumn("[bold]generate"), BarColumn(), TaskProgressColumn(),
                                     TextColumn("{task.completed:,.0f}/{task.total:,.0f} prompts  {task.fields[rates]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("generate", total=self.total, completed=self.done, rates="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def rates(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return f"{self.prompts / dt:,.2f} prompts/s  {self.tokens / dt:,.0f} tokens/s"

    def advance(self, prompts: int, tokens: int) -> None:
        self.prompts += prompts
        self.tokens += tokens
        if self.progress is not None:
            self.progress.update(self.task, completed=min(self.done + self.prompts, self.total), rates=self.rates())

    def shard_done(self, written: int) -> None:
        """All prompts before ``written`` are in the output."""
        if self.progress is not None:
            self.progress.update(self.task, completed=written, rates=self.rates())
