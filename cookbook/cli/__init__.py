"""The ``cookbook`` command line: one name, one function.

``COMMANDS`` below maps each command's name to its function. The functions live in one module per group of
commands: data.py (sample-corpus, tokenizer train, preprocess, merge, data info), train.py (pretrain, extend, prune,
plan, and the training flags), convert.py, evaluate.py (eval, plot), inference.py (generate, serve) and distill.py
(distill generate, distill train); common.py holds the options several of them share. This module runs them.

A command is one function. Its parameters are its flags (``Annotated[..., typer.Option(help=...)]``, grouped in help
panels); the training flags come from the fields of the config dataclasses (cookbook/flags.py). Its docstring's first
line says what it does, an example follows. Its body imports what it uses (so that ``cookbook --help`` never waits
for torch), builds the recipe's config from its parameters (``common.config_from``: a field takes the parameter of its
name; only derived values are written out) and calls the recipe.

What a command shows is written in its recipe: the recipe prints as it works (progress, notes, a training run's log),
and its ``render`` turns the result into the tables and lines the command function prints. A command function builds
no table; it prints what ``render`` returns, or one line saying what it wrote.

A ``CookbookError`` is printed as one red line and exits with code 2 (``--debug``, before or after the command, shows
the traceback); so is an output the system cannot write (a read-only or full disk). Ctrl-C and SIGTERM exit with 130
and one line saying what was kept. Every number a flag takes is checked before the command runs (``guarded``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import os
import sys
import traceback
from typing import Annotated, get_args, get_origin

import typer
from rich.markup import escape

from cookbook import __version__
from cookbook import help as help_screens
from cookbook.checks import check_number
from cookbook.cli import convert, data, distill, evaluate, inference, train
from cookbook.cli.train import join_multi_value_flags
from cookbook.errors import (
    CookbookError,
    Interrupted,
    handle_interrupts,
    hold_interrupts_while_importing,
    interrupt_note,
    interrupts_deferred,
)
from cookbook.progress import console, out

help_screens.install()  # flag names never cut at 80 columns (cookbook/help.py)

EXAMPLES = """\
[bold]Examples[/bold]

  cookbook sample-corpus corpus.jsonl
  cookbook tokenizer train --input corpus.jsonl --output tok.model --vocab-size 8000
  cookbook preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer-model tok.model --append-eod
  cookbook merge --input data/ --output-prefix data/all
  cookbook data info data/corpus_text_document --decode 1 --tokenizer tok.model
  cookbook convert --from hf --to cookbook --load-dir Llama-2-7b-hf --save-dir ckpt/llama2-7b
  cookbook pretrain --preset tiny --data-path data/corpus_text_document --tokenizer-model tok.model --save ckpt/tiny
  cookbook prune --load ckpt/tiny --hidden-size-remain 128 --drop-layers 1 --calib-data data/corpus_text_document --save ckpt/tiny-pruned
  cookbook extend --load ckpt/tiny --interp-factor 2 --data-path data/corpus_text_document --train-iters 100 --save ckpt/tiny-2x
  cookbook plan --preset llama-65b --seq-length 4096 --num-gpus 128
  cookbook eval --load ckpt/tiny --ppl-files valid.jsonl --seq-length 256,512
  cookbook generate --load ckpt/tiny --prompt "def main(" --temperature 0
  cookbook serve --load ckpt/tiny --port 8000
  cookbook distill generate --teacher ckpt/big --prompts-from data/corpus_text_document --max-tokens 512 --output synth/
  cookbook distill train --load ckpt/tiny --synthetic synth/ --data-path data/corpus_text_document --save ckpt/tiny-distilled
  cookbook plot ckpt/tiny ckpt/tiny-2x --label base --label extended -o loss.png
"""

COMMANDS = {
    "sample-corpus": data.sample_corpus,
    "preprocess": data.preprocess,
    "merge": data.merge,
    "convert": convert.convert,
    "pretrain": train.pretrain,
    "extend": train.extend,
    "prune": train.prune,
    "plan": train.plan,
    "eval": evaluate.eval_,
    "plot": evaluate.plot,
    "generate": inference.generate,
    "serve": inference.serve,
    "data info": data.data_info,
    "tokenizer train": data.tokenizer_train,
    "distill generate": distill.generate,
    "distill train": distill.train,
}
GROUPS = {  # the first word of a two-word command, and what `cookbook --help` says of it
    "data": "Inspect indexed datasets: cookbook data info PREFIX",
    "tokenizer": "Train a tokenizer: cookbook tokenizer train --input X --output Y",
    "distill": "Distil a teacher: cookbook distill generate ..., then cookbook distill train ...",
}
TRAINING_COMMANDS = ("pretrain", "extend", "prune", "distill train")  # with --config and the training flags

_debug = bool(os.environ.get("COOKBOOK_DEBUG"))


def _version(value: bool) -> None:
    if value:
        out.print(f"cookbook {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails.")] = False,
) -> None:
    global _debug
    _debug = _debug or debug


def build(training_flags: bool = True) -> typer.Typer:
    """The ``cookbook`` app: every command of ``COMMANDS``, each ``guarded``. The training commands' flags come from
    the config dataclasses, whose modules import torch (seconds); ``training_flags=False`` leaves them out, for a
    command line that runs no training command (``main``)."""
    app = typer.Typer(
        name="cookbook",
        help="The whole life of a Llama-family model on one PyTorch-native engine.\n\n" + EXAMPLES,
        rich_markup_mode="rich",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    groups = {name: typer.Typer(no_args_is_help=True, rich_markup_mode="rich") for name in GROUPS}
    flags = train.training_flags() if training_flags else []
    for name, fn in COMMANDS.items():
        if name in TRAINING_COMMANDS:
            fn = train.training_command(fn, flags)
        *group, command = name.split()
        (groups[group[0]] if group else app).command(command)(guarded(fn))
    for name, group in groups.items():
        app.add_typer(group, name=name, help=GROUPS[name])
    return app


@functools.cache
def __getattr__(name: str):
    """``cookbook.cli.app``: the whole app (what tests and ``typer.main.get_command`` take), built when first asked."""
    if name == "app":
        return build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _runs_training(args: list[str]) -> bool:
    """Whether the command line ``args`` runs a training command (or asks for its help)."""
    words = list(itertools.takewhile(lambda arg: not arg.startswith("-"), args))
    return " ".join(words[:1]) in TRAINING_COMMANDS or " ".join(words[:2]) in TRAINING_COMMANDS


# --------------------------------------------------------------------------- numbers
# Every number a flag takes is finite and, but for these, not negative (OpenAI's penalties are signed); what else a
# value must be (positive, at most 1, ...) its config checks.
SIGNED_FLAGS = {"--frequency-penalty", "--presence-penalty"}


def numeric_flags(fn) -> dict[str, str]:
    """Parameter name -> its flag (the first long name), for every int and float option of the command ``fn``."""
    flags = {}
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        if get_origin(p.annotation) is not Annotated:
            continue
        kind, *meta = get_args(p.annotation)
        if not {kind, *get_args(kind)} & {int, float}:
            continue
        info = next((m for m in meta if isinstance(m, typer.models.ParameterInfo)), None)
        # in Annotated, typer keeps the first name where a default would go
        decls = ([info.default] if isinstance(info.default, str) else []) + list(info.param_decls or ()) if info else []
        names = [d.split("/")[0] for d in decls if d.startswith("--")]
        flags[p.name] = names[0] if names else "--" + p.name.replace("_", "-")
    return flags


def guarded(fn):
    """The command ``fn``, refusing NaN, infinity and negative numbers in its flags before it runs, and turning an
    interrupt into ``Interrupted`` (which keeps what the command says it kept)."""
    flags = numeric_flags(fn)

    @functools.wraps(fn)
    def command(**kwargs):
        for name, flag in flags.items():
            value = kwargs.get(name)
            if value is not None and not isinstance(value, bool):
                check_number(flag, value, low=None if flag in SIGNED_FLAGS else 0)
        try:
            return fn(**kwargs)
        except KeyboardInterrupt as e:
            raise Interrupted(interrupt_note(e)) from None

    return command


# --------------------------------------------------------------------------- entry point


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The exception ``name`` of the click typer runs on: its own bundled copy (typer >= 0.29) or click."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_CLICK_ERRORS = _click_exceptions("ClickException")
_CLICK_ABORT = _click_exceptions("Abort")


_signalled: list[int] = []  # the interrupts received (Ctrl-C, SIGTERM)


def _interrupt(signum, frame):
    _signalled.append(signum)
    raise KeyboardInterrupt  # so that partial outputs are removed on SIGTERM as on Ctrl-C


def _take_debug(args: list[str]) -> list[str]:
    """``--debug`` anywhere before ``--`` (``cookbook --debug eval ...`` or ``cookbook eval ... --debug``)."""
    global _debug
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        _debug = True
        args = [a for i, a in enumerate(args) if a != "--debug" or i >= end]
    return args


def _interrupt_behind(e: BaseException) -> BaseException | None:
    """The interrupt (Ctrl-C, SIGTERM) during whose handling ``e`` was raised, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (KeyboardInterrupt, Interrupted)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _fail(message: str, code: int) -> None:
    if _debug:
        traceback.print_exc()
    console.print(message, highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user-facing errors become one red line and exit code 2."""
    handle_interrupts(_interrupt)
    _signalled.clear()
    hold_interrupts_while_importing("numpy", "torch")
    try:
        args = join_multi_value_flags(_take_debug(sys.argv[1:] if argv is None else list(argv)))
        # Building the app evaluates the commands' annotations; an interrupt waits until it is built (nothing is
        # written before), so that it never lands inside an exec() of source (see cookbook/__main__.py)
        with interrupts_deferred():
            command = typer.main.get_command(build(training_flags=_runs_training(args)))
        code = command.main(args=args, prog_name="cookbook", standalone_mode=False)
    except CookbookError as e:
        _fail(f"[bold red]error:[/bold red] {escape(str(e))}", e.exit_code)
    except (Interrupted, KeyboardInterrupt, *_CLICK_ABORT) as e:  # in a command, while parsing, in a prompt
        _fail(f"[red]interrupted:[/red] {escape(interrupt_note(e))}", 130)
    except _CLICK_ERRORS as e:  # usage errors: click's own message and exit code (2)
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:
        interrupt = _interrupt_behind(e) or (KeyboardInterrupt() if _signalled else None)
        if interrupt is not None:  # raised as an interrupt unwound (numpy interrupted as it imports fails to import)
            _fail(f"[red]interrupted:[/red] {escape(interrupt_note(interrupt))}", 130)
        if isinstance(e, OSError):  # an output the system refuses (read-only, full, a folder for a file): no traceback
            where = f" {e.filename}" if e.filename else ""
            _fail(f"[bold red]error:[/bold red] cannot write or read{escape(where)}: {escape(e.strerror or str(e))}", 2)
        raise
    if code == 130:  # typer turned an interrupt outside a command into its exit code
        _fail("[red]interrupted:[/red] nothing written", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
