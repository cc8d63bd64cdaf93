"""Help screens that stay readable at 80 columns: flag names are never cut.

Typer lays each options panel out as a table of six equal-rights columns (long names, short names, negative long
names, negative short names, type, help) and lets rich shrink them to the width; rich then cuts the long flag names
(Megatron-LM's ``--num-layers-per-virtual-pipeline-stage`` is 39 characters) with an ellipsis, even at 100 columns.
``install()`` replaces typer's one panel function with this module's ``options_panel``, which keeps typer's look and
its help cells (defaults, required) but puts every name of an option in one column that never wraps, each name
whole: its aliases on the same line while they fit the panel's longest name (or ``SHORT``), else one per line; the negative
name of a ``--x/--no-x`` flag on its own line. The help text wraps in what is left; where fewer than
``MIN_HELP`` columns are left it goes under the names instead, indented.

Help texts are plain text: a literal ``[`` in one is written ``\\[`` (rich markup), which
tests/test_first_contact.py checks for every option of every command.
"""

from __future__ import annotations

from rich import box
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

MIN_HELP = 24  # columns of help text below which the help goes under the names
SHORT = 20  # aliases share a line up to this width, or the panel's longest name


def _names(param) -> tuple[list[str], list[str]]:
    """(names, negative names) of an option; an argument's display name."""
    if getattr(param, "param_type_name", "") == "argument":
        name = getattr(param, "display_name_raw", None) or param.human_readable_name
        return [name], []
    key = lambda o: (not o.startswith("--"), 0)  # noqa: E731 - long names first, in their order
    return sorted(param.opts, key=key), sorted(param.secondary_opts, key=key)


def _type(param, ctx) -> str:
    for get in (
        lambda: param.display_type_rich(ctx=ctx),
        lambda: param.make_metavar(ctx),
        lambda: param.make_metavar(),
    ):
        try:
            value = get()
        except (AttributeError, TypeError):
            continue
        return value or ""
    return ""


def _lines(names: list[str], width: int) -> list[str]:
    """``names`` joined with ", " into lines no wider than ``width`` (a longer single name has a line of its own)."""
    lines: list[str] = []
    for name in names:
        if lines and len(lines[-1]) + 2 + len(name) <= width:
            lines[-1] += ", " + name
        else:
            lines.append(name)
    return lines


def _help(cell):
    """Typer's help cell (a ``Columns`` of the help, default and required texts) as one text that wraps at spaces and
    folds a word too long for the column (a flag named in the help) instead of cutting it."""
    items = getattr(cell, "renderables", None)
    if not items or not all(isinstance(i, Text) for i in items):
        return cell
    text = Text(" ").join(items)
    text.overflow = "fold"
    return text


def options_panel(*, name: str, params: list, ctx, markup_mode, console, **_) -> None:
    """Typer's ``_print_options_panel`` with names never cut (the module's docstring)."""
    from typer import rich_utils

    if not params:
        return
    rows = []
    for param in params:
        names, negative = _names(param)
        rows.append(
            (
                param,
                names,
                negative,
                _type(param, ctx),
                _help(rich_utils._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode)),
            )
        )
    fit = max(SHORT, *(len(n) for _, names, negative, _, _ in rows for n in names + negative))
    cells = []
    for param, names, negative, kind, help_cell in rows:
        text = Text(no_wrap=True, overflow="ignore")
        for i, line in enumerate(_lines(names, fit)):
            text.append(("\n" if i else "") + line, style=rich_utils.STYLE_OPTION)
        for line in _lines(negative, fit):
            text.append("\n" + line, style=rich_utils.STYLE_NEGATIVE_OPTION)
        required = (
            Text(rich_utils.REQUIRED_SHORT_STRING, style=rich_utils.STYLE_REQUIRED_SHORT)
            if param.required
            else Text("")
        )
        cells.append((required, text, Text(kind, style=rich_utils.STYLE_TYPES), help_cell))
    any_required = any(c[0].plain for c in cells)
    longest = max(len(line) for c in cells for line in c[1].plain.splitlines())
    kind_width = max(len(c[2].plain) for c in cells)
    used = 4 + (2 if any_required else 0) + longest + 2 + kind_width + 1  # panel border and padding, the columns
    if console.width - used >= MIN_HELP:
        table = Table(
            show_header=False, expand=True, box=None, pad_edge=False, padding=(0, 1), show_lines=False, leading=0
        )
        if any_required:
            table.add_column(no_wrap=True, width=1)
        table.add_column(no_wrap=True, min_width=longest, max_width=longest, overflow="ignore")
        table.add_column(no_wrap=True, min_width=kind_width)
        table.add_column(ratio=1)
        for required, text, kind, help_cell in cells:
            table.add_row(*([required] if any_required else []), text, kind, help_cell)
        body = table
    else:  # too narrow for three columns: the names and type on a line, the help under them
        body = Table.grid()
        body.add_column()
        for required, text, kind, help_cell in cells:
            body.add_row(Text.assemble(required, " " if any_required else "", text, "  ", kind))
            body.add_row(Padding(help_cell, (0, 0, 0, 4)))
    console.print(
        Panel(
            body,
            border_style=rich_utils.STYLE_OPTIONS_PANEL_BORDER,
            title=name,
            title_align=rich_utils.ALIGN_OPTIONS_PANEL,
            box=box.ROUNDED,
        )
    )


def install() -> None:
    """Use ``options_panel`` for every command's help (where typer has the function this replaces; otherwise typer's
    own layout stays, which tests/test_first_contact.py would catch)."""
    try:
        from typer import rich_utils
    except ImportError:  # typer without rich: click's plain help, which never cuts names
        return
    if hasattr(rich_utils, "_print_options_panel") and hasattr(rich_utils, "_get_parameter_help"):
        rich_utils._print_options_panel = options_panel


__all__ = ["install", "options_panel"]
