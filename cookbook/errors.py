"""The one way a user-facing failure is raised, and what an interrupt says was kept.

A ``CookbookError`` carries one sentence that says what is wrong and what to do. The CLI
prints it in red on one line and exits with code 2; ``--debug`` shows the traceback too.

Ctrl-C and SIGTERM end a command with one line and exit code 130. By default that line says
"nothing written" (every output is written under a temporary name and renamed when complete);
work that keeps what it has done (training saves, generated shards) says what it kept and how
to continue, through ``on_interrupt``.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class CookbookError(Exception):
    """A failure caused by the user's input or environment, not by a bug in cookbook."""

    exit_code = 2


@contextlib.contextmanager
def on_interrupt(note: Callable[[], str]) -> Iterator[None]:
    """An interrupt inside the block reports ``note()`` (what was kept, how to continue); the innermost wins."""
    try:
        yield
    except KeyboardInterrupt as e:
        if not getattr(e, "note", None):
            e.note = note()
        raise


def interrupt_note(e: BaseException) -> str:
    return getattr(e, "note", None) or "nothing written"


class Interrupted(Exception):
    """A command stopped by Ctrl-C or SIGTERM, carrying what it kept. The CLI raises it in place of the
    KeyboardInterrupt, which click would otherwise swallow into a bare exit code."""

    exit_code = 130

    def __init__(self, note: str):
        super().__init__(note)
        self.note = note


INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def handle_interrupts(handler: Callable) -> None:
    """``handler`` for Ctrl-C and SIGTERM, but for a signal the process was started ignoring (``nohup``, a
    background job), which it goes on ignoring as Python itself does."""
    for s in INTERRUPTS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then act as they would have (a checkpoint save is never cut
    in half). Only the main thread can hold signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in INTERRUPTS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)  # the handlers restored above act on it now


class _LoaderHoldingInterrupts:
    """A module's own loader, loading it with interrupts held (``interrupts_deferred``)."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):
        with interrupts_deferred():
            return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            with interrupts_deferred():
                self.loader.exec_module(module)
        finally:  # once loaded, the module names its own loader again
            module.__loader__ = module.__spec__.loader = self.loader


class _HoldInterruptsWhileImporting(importlib.abc.MetaPathFinder):
    def __init__(self, names: frozenset[str]):
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderHoldingInterrupts(spec.loader)
        return spec


def hold_interrupts_while_importing(*names: str) -> None:
    """An interrupt while one of the top-level modules ``names`` imports waits until it has imported. torch's C
    module imports numpy and goes on without it if that import fails, so an interrupt landing there would be lost,
    and numpy left half imported ("cannot load module more than once per process") for the rest of the process."""
    if not any(isinstance(f, _HoldInterruptsWhileImporting) for f in sys.meta_path):
        sys.meta_path.insert(0, _HoldInterruptsWhileImporting(frozenset(names)))
