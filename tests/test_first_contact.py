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
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output), (
                f"{name} is cut or missing:\n{result.output}"
            )
    assert "…" not in result.output


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) or "cookbook" for p, _ in COMMANDS])
def test_every_help_text_renders_its_brackets(path, command):
    """Help texts are rich markup: an unescaped [fp8] would vanish. What a reader sees is the text as written."""
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    for raw in texts:
        want = STYLE_TAG.sub("", raw).replace("\\[", "[")
        assert Text.from_markup(raw).plain == want, raw


def test_the_fp8_hint_names_the_extra():
    result = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"})
    assert "pip install 'cookbook[fp8]'" in result.output


# --------------------------------------------------------------------------- progress and the training summary


def test_tally_prints_plain_lines_only_when_asked(capsys):
    from cookbook.progress import Tally

    with Tally("calibration", 64, "samples", every=0) as tally:  # every=0: a line per update (in a pipe)
        tally.advance(8)
        tally.update(64)
    with Tally("step", 10, every=None) as tally:  # training: its log lines are the progress
        tally.update(5)
    lines = capsys.readouterr().err.splitlines()
    assert [line.rsplit(",", 1)[0] for line in lines] == ["calibration: 8/64 samples", "calibration: 64/64 samples"]


def test_training_prints_a_summary_logs_its_first_step_and_says_when_it_is_done(tmp_path):
    """A run prints five summary lines (the whole config with --print-config), logs step 1 whatever the interval, and
    the same command once finished says loudly that there is nothing to do."""
    from helpers_data import run_cli
    from helpers_train import check, losses, train_flags, write_token_dataset

    data = write_token_dataset(tmp_path / "data" / "tok")
    save = tmp_path / "run"
    flags = train_flags(data, save, 3, load=save)
    flags[flags.index("--dtype") : flags.index("--dtype") + 2] = []  # auto: fp32 on any CPU here (COOKBOOK_CPU_BF16=0)
    flags[flags.index("--log-interval") + 1] = "2"
    first = check(run_cli("pretrain", *flags, "--print-config", timeout=300)).stderr
    assert "[model]" in first and "[optimizer]" in first  # the whole config, asked for
    assert sorted(losses(save)) == [1, 2, 3]  # the first step, the interval, the last
    assert re.search(r"^step +1/3 +loss", first, re.M)
    again = check(run_cli("pretrain", *flags, timeout=300)).stderr
    assert "[model]" not in again
    for head in ("model", "data", "training", "device", "saves"):
        assert len(re.findall(rf"^{head} +", again, re.M)) == 1, again
    assert "dtype fp32 (auto: this CPU has no bf16 units" in again and "--print-config prints it here" in again
    assert re.search(r"already trained 3 of 3 iterations in .*run: nothing to do; raise --train-iters", again)
