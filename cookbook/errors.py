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
import signal
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


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then act as they would have (a checkpoint save is never cut
    in half). Only the main thread can hold signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)  # the handlers restored above act on it now
