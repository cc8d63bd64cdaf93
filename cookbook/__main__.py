"""``python -m cookbook`` and the ``cookbook`` command.

Until a command starts nothing has been written, so an interrupt (Ctrl-C, SIGTERM) while the CLI still imports (torch
takes seconds) ends the process at once with the line a command prints. Once the CLI runs, an interrupt unwinds the
command (which removes its partial outputs) and the process ends with exit code 130. It ends by ``os._exit`` after
Python's exit functions: CPython would otherwise end by SIGINT when the interrupt passed through ``exec()`` of source
text (as ``dataclasses`` and ``typing`` do while modules import), even once it was handled."""

import atexit
import os
import sys

from cookbook.errors import handle_interrupts


def _end_while_importing(signum, frame) -> None:
    os.write(2, b"interrupted: nothing written\n")
    os._exit(130)


def main() -> None:
    handle_interrupts(_end_while_importing)
    from cookbook.cli import main as run  # its main() takes the signals over before it does anything

    try:
        run()
    except SystemExit as e:
        if e.code != 130:
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()  # temporary folders' finalizers, multiprocessing's clean-up
        os._exit(130)


if __name__ == "__main__":
    main()
