"""Command-line flags declared on the fields of the config dataclasses, so that a setting is written once::

    lr: float = field(default=3e-4, metadata=flag("--lr", help="Peak learning rate.", panel="Optimizer"))

gives every command that trains (pretrain, extend, prune, distill train) the flag ``--lr`` for the field ``lr``, shown
in the help's Optimizer panel. More names are aliases; ``--x/--no-x`` is an on/off switch. The option's type is the
field's; a help text is plain text. cookbook/cli/train.py builds the options from the fields that declare a flag.
"""

from __future__ import annotations


def flag(*names: str, help: str, panel: str) -> dict:
    """A config field's ``metadata``: its flag ``names`` (the first is the one messages name), ``help`` and ``panel``."""
    return {"flags": names, "help": help, "panel": panel}
