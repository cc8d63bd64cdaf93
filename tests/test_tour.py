"""The README's tour and scripts/tour.sh (which runs it at tiny scale) hold the same commands, in the same order: the
script's $VARIABLES read back as the README's values they stand for, and the README's `...` stands for any flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_COMMANDS = ("cookbook", "torchrun", "bash")


def logical_lines(text: str) -> list[str]:
    """Lines with their backslash continuations joined, comments (a # after a space, or at the start) removed."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines()]


def readme_tour() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## A short tour\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line) for line in logical_lines(block) if line.split(" ", 1)[0] in README_COMMANDS]


def script_variables(text: str) -> dict[str, list[str]]:
    """NAME -> the README's tokens for it, from lines ``NAME=value  # README: tokens``."""
    found = {}
    for name, readme in re.findall(r"^([A-Z_0-9]+)=.*?#\s*README:\s*(.*)$", text, re.M):
        found[name] = [t for t in shlex.split(readme) if t]  # "" : nothing
    return found


def script_tour() -> list[list[str]]:
    text = (ROOT / "scripts" / "tour.sh").read_text()
    variables = script_variables(text)
    body = text.split("\ntour() {", 1)[1]  # after the definitions
    commands = []
    for line in logical_lines(body):
        words = shlex.split(line, posix=True) if line else []
        if not words or words[0] not in ("tour", "tour_serve"):
            continue
        tokens = []
        for word in words[1:]:
            bare = re.fullmatch(r"\$\{?([A-Z_0-9]+)\}?", word)
            if bare:
                tokens += variables[bare.group(1)]
                continue
            word = re.sub(r"\$\{?([A-Z_0-9]+)\}?", lambda m: " ".join(variables[m.group(1)]), word)
            assert "$" not in word, word
            tokens.append(word)
        commands.append(tokens)
    return commands


def same(readme: list[str], script: list[str]) -> bool:
    """Token for token, the README's ``...`` matching any (possibly empty) run of the script's tokens."""
    if not readme:
        return not script
    if readme[0] == "...":
        return any(same(readme[1:], script[j:]) for j in range(len(script) + 1))
    return bool(script) and readme[0] == script[0] and same(readme[1:], script[1:])


def test_readme_tour_and_script_hold_the_same_commands():
    readme, script = readme_tour(), script_tour()
    assert len(readme) >= 20, readme  # the parse found the tour
    assert len(readme) == len(script), "\n".join(" ".join(c) for c in script)
    for r, s in zip(readme, script):
        assert same(r, s), f"README: {' '.join(r)}\nscript: {' '.join(s)}"


def test_every_scaled_value_is_used():
    """No stale substitution: each variable with a README value appears in a README line of the script (one that is
    missing fails the comparison above with a KeyError)."""
    text = (ROOT / "scripts" / "tour.sh").read_text()
    lines = [
        line for line in logical_lines(text.split("\ntour() {", 1)[1]) if line.startswith(("tour ", "tour_serve "))
    ]
    used = {name for line in lines for name in re.findall(r"\$\{?([A-Z_0-9]+)\}?", line)}
    assert {"CORPUS", "ITERS", "NPROC", "PORT"} <= set(script_variables(text)) == used


def test_the_comparison_can_fail():
    assert not same(["cookbook", "eval", "--load", "ckpt/tiny"], ["cookbook", "eval", "--load", "ckpt/big"])
    assert same(
        ["cookbook", "pretrain", "...", "--kd-ratio", "0.5"],
        ["cookbook", "pretrain", "--preset", "tiny", "--kd-ratio", "0.5"],
    )
    assert not same(["cookbook", "pretrain", "...", "--kd-ratio", "0.5"], ["cookbook", "pretrain", "--kd-ratio", "0.7"])
