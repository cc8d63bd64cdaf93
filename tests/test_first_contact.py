"""What a newcomer reads first: every help screen at 80 columns with every flag name whole and every bracket
rendered; progress that shows on a terminal and stays plain lines elsewhere."""

from __future__ import annotations

import re

import pytest
import typer
from rich.text import Text
from typer.testing import CliRunner

from cookbook.cli import app

STYLE_TAG = re.compile(r"\[/?(bold|dim|italic|cyan|green|yellow|red)\]")


def commands(group, path: tuple[str, ...] = ()):
    """Every (sub)command of the CLI (typer may run on its own bundled click: no isinstance checks)."""
    yield path, group
    if hasattr(group, "commands"):
        for name, sub in group.commands.items():
            yield from commands(sub, (*path, name))


def is_option(param) -> bool:
    return getattr(param, "param_type_name", "") == "option"


COMMANDS = list(commands(typer.main.get_command(app)))


def test_every_command_is_walked():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"pretrain", "prune", "distill generate", "distill train", "plan", "serve", "tokenizer train"} <= names
    assert len(names) >= 20


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) or "cookbook" for p, _ in COMMANDS])
def test_help_at_80_columns_shows_every_flag_whole(path, command):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    for param in command.params:
        for name in param.opts + param.secondary_opts if is_option(param) else []:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output), f"{name} is cut or missing:\n{result.output}"
    assert "…" not in result.output


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) or "cookbook" for p, _ in COMMANDS])
def test_every_help_text_renders_its_brackets(path, command):
    """Help texts are rich markup: an unescaped [fp8] would vanish. What a reader sees is the text as written."""
    texts = [command.help or ""] + [p.help or "" for p in command.params if is_option(p)]
    for raw in texts:
        want = STYLE_TAG.sub("", raw).replace("\\[", "[")
        assert Text.from_markup(raw).plain == want, raw


def test_the_fp8_hint_names_the_extra():
    result = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"})
    assert "pip install 'cookbook[fp8]'" in result.output
