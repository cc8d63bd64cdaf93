"""The one way a user-facing failure is raised.

A ``CookbookError`` carries one sentence that says what is wrong and what to do. The CLI
prints it in red on one line and exits with code 2; ``--debug`` shows the traceback too.
"""


class CookbookError(Exception):
    """A failure caused by the user's input or environment, not by a bug in cookbook."""

    exit_code = 2
