"""``python -m cookbook`` and the ``cookbook`` command. An interrupt while the CLI is still importing (torch takes
seconds) ends with the same one line as one during a command."""

import sys


def main() -> None:
    try:
        from cookbook.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing written\n")
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
