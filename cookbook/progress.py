"""The consoles every command prints to, and rich progress bars.

On a terminal, output is rich: colours, tables, progress bars. Anywhere else (a pipe, a log file, CI, ``nohup``)
every message is one plain line: nothing is wrapped, truncated or padded, whatever the line width, so paths and
numbers stay whole and logs can be grepped; a table becomes a line per row, a rule a short title line, and
progress bars and spinners are not drawn.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


class PlainWhenPiped(Console):
    """A rich ``Console`` that prints plain lines when its stream is not a terminal (see the module's docstring)."""

    def print(self, *objects, **kwargs) -> None:
        if self.is_terminal:
            return super().print(*objects, **kwargs)
        kwargs["soft_wrap"] = True  # never wrap a message to the (unknown) width of a pipe
        kwargs.pop("width", None)
        parts = []
        for obj in objects:
            if isinstance(obj, Table):
                if parts:
                    super().print(*parts, **kwargs)
                    parts = []
                for line in self.table_lines(obj):
                    super().print(line, **{**kwargs, "markup": False, "highlight": False})
            else:
                parts.append(obj)
        if parts or not objects:
            super().print(*parts, **kwargs)

    def rule(self, title="", **kwargs) -> None:
        if self.is_terminal:
            return super().rule(title, **kwargs)
        super().print(f"--- {self.plain(title)}" if title else "---", soft_wrap=True, markup=False, highlight=False)

    def plain(self, cell) -> str:
        """A cell's text without markup or styles."""
        if isinstance(cell, Text):
            return cell.plain
        if isinstance(cell, str):
            return self.render_str(cell).plain
        return str(cell)

    def table_lines(self, table: Table) -> list[str]:
        """One line per row: ``key: value`` for a table without headers, else a header line, then
        cells separated by `` | ``; the title first."""
        columns = [[self.plain(c) for c in column.cells] for column in table.columns]
        rows = [[col[i] if i < len(col) else "" for col in columns] for i in range(table.row_count)]
        lines = [self.plain(table.title)] if table.title else []
        if table.show_header:
            lines.append(" | ".join(self.plain(c.header) for c in table.columns))
            lines += [" | ".join(row) for row in rows]
        else:
            lines += [f"{row[0]}: {' | '.join(row[1:])}" if len(row) > 1 else row[0] for row in rows]
        return [line.rstrip() for line in lines]


console = PlainWhenPiped(stderr=True, highlight=False)  # progress, status and errors
out = PlainWhenPiped(highlight=False)  # results: summaries, tables, decoded text


class RateBar:
    """A progress bar over bytes of input that also shows documents, MB/s, tokens/s and the time left;
    ``advance(nbytes, docs, tokens)`` with the bytes, documents and tokens just done."""

    def __init__(self, progress: Progress | None, task, total: int | None):
        self.progress, self.task, self.total = progress, task, total
        self.start = time.perf_counter()
        self.bytes = self.docs = self.tokens = 0

    def advance(self, nbytes: int, docs: int = 0, tokens: int = 0) -> None:
        self.bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        if self.progress is None:
            return
        dt = max(time.perf_counter() - self.start, 1e-9)
        of = f"/{self.total / 1e6:,.0f}" if self.total else ""
        rates = (
            f"{self.bytes / 1e6:,.0f}{of} MB  {self.docs:,} docs  {self.bytes / dt / 1e6:,.1f} MB/s  "
            f"{self.tokens / dt:,.0f} tokens/s"
        )
        self.progress.update(self.task, completed=self.bytes, rates=rates)


@contextlib.contextmanager
def rate_progress(description: str, total: int | None, enabled: bool = True) -> Iterator[RateBar]:
    """A RateBar on the terminal; none (a silent one) when ``enabled`` is false or stderr is not a terminal."""
    if not (enabled and console.is_terminal):
        yield RateBar(None, None, total)
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
        yield RateBar(progress, task, total)
        if total:
            progress.update(task, completed=total)


class GenerationBar:
    """Prompts done of a generation run, with this run's prompts/s and generated tokens/s. ``advance(prompts,
    tokens)`` as a backend finishes work (from any thread); ``shard_done(prompts)`` sets the count to what is
    written, so the bar never claims more than the output holds."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True):
        self.total, self.done, self.enabled = total, done, enabled
        self.prompts = self.tokens = 0
        self.progress: Progress | None = None

    def __enter__(self) -> GenerationBar:
        self.start = time.perf_counter()
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]generate"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} prompts  {task.fields[rates]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
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


class Tally:
    """Work done out of a known total (training steps, calibration samples). On a terminal a transient bar; elsewhere,
    with ``every`` seconds, one plain line at most that often ("calibration: 256/1024 samples, 31 s"), none with
    ``every=None`` (training, whose log lines are its progress). ``advance(n)`` or ``update(done)``; ``close()``."""

    def __init__(
        self,
        description: str,
        total: int,
        unit: str = "",
        done: int = 0,
        every: float | None = 10.0,
        enabled: bool = True,
    ):
        self.description, self.total, self.unit, self.done, self.every = description, total, unit, done, every
        self.enabled = enabled
        self.start = self.last = time.perf_counter()
        self.progress: Progress | None = None
        if enabled and console.is_terminal:
            self.progress = Progress(
                TextColumn(f"[bold]{escape(description)}"),
                BarColumn(),
                TextColumn(f"{{task.completed:,.0f}}/{{task.total:,.0f}} {escape(unit)}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.task = self.progress.add_task(description, total=total, completed=done)
            self.progress.start()

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        if self.progress is not None:
            self.progress.update(self.task, completed=done)
        elif self.enabled and self.every is not None and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            console.print(
                f"{self.description}: {done:,}/{self.total:,} {self.unit}, {self.last - self.start:,.0f} s",
                markup=False,
                highlight=False,
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
