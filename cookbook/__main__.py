"""``python -m cookbook`` and the ``cookbook`` command. An interrupt while the CLI is still importing (torch takes
seconds) ends with the same one line as one during a command."""

import os
import sys


def main() -> None:
    try:
        from cookbook.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing written\n")
        sys.stderr.flush()
        os._exit(130)  # not sys.exit: CPython would end by SIGINT had the interrupt passed through exec() of source
    run()


if __name__ == "__main__":
    main()
