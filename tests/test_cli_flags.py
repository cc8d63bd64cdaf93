"""Every command keeps its flags: each name and alias of every option and argument, with its panel, type and
whether it is required or repeatable, the examples in each help text, and the commands each group lists, as
tests/cli_flags.json holds them.

After a deliberate change to the command line, write the file again and review its diff:

    python tests/test_cli_flags.py --write
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

FILE = Path(__file__).with_name("cli_flags.json")


def commands(group, path: tuple[str, ...] = ()):
    """(path, command) for the CLI and every group and command under it (typer may run on its own bundled click:
    no isinstance checks)."""
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from commands(sub, (*path, name))


def type_name(param) -> str:
    """The Python type a value is converted to (typer >= 0.29 keeps it in type_descriptor; older typer, click's type)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return descriptor.annotation.__name__
    return {"integer": "int", "boolean": "bool", "text": "str", "path": "Path"}.get(param.type.name, param.type.name)


def describe(command) -> dict:
    params = {}
    for p in command.params:
        names = sorted([*p.opts, *p.secondary_opts])
        params[" ".join(names)] = {
            "kind": p.param_type_name,
            "panel": getattr(p, "rich_help_panel", None),
            "type": type_name(p),
            "required": p.required,
            "multiple": p.multiple,
        }
    lines = (command.help or "").splitlines()
    entry = {
        "params": dict(sorted(params.items())),
        "examples": [line.strip() for line in lines if "cookbook " in line or "torchrun " in line],
    }
    if hasattr(command, "commands"):
        entry["commands"] = list(command.commands)
    return entry


@functools.cache
def live() -> dict[str, dict]:
    from cookbook.cli import app

    return {" ".join(("cookbook", *path)): describe(c) for path, c in commands(typer.main.get_command(app))}


RECORDED = json.loads(FILE.read_text()) if FILE.exists() else {}


def test_the_same_commands():
    assert sorted(live()) == sorted(RECORDED)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_the_same_flags_panels_and_examples(name):
    assert live()[name] == RECORDED[name]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    text = json.dumps(live(), indent=1, ensure_ascii=False)
    one_line = re.sub(
        r"\{\n([^{}\[\]]*?)\n\s*\}",
        lambda m: "{" + " ".join(line.strip() for line in m.group(1).splitlines()) + "}",
        text,
    )
    FILE.write_text(one_line + "\n")  # one line per flag: a diff shows what changed
    print(f"wrote {FILE}")


def test_the_training_flags_import_no_torch():
    """`cookbook pretrain --help` reads the flags from the config dataclasses without importing torch (seconds)."""
    code = "import sys, cookbook.cli.train as t; t.training_flags(); assert 'torch' not in sys.modules, 'torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
