"""``cookbook convert``: Hugging Face <-> cookbook <-> Megatron-LM checkpoints, any direction, any TP/PP.

Every reader (``cookbook.formats.{hf,cookbook,megatron}.read``) yields one stream of
(our parameter name, tensor) in a fixed order; every writer consumes it. Between them the stream is
checked against the config (names, order, shapes) and cast to ``--dtype``. Memory stays at about
one layer whatever the model's size (docs/convert.md has the measurements).

The output is written in a temporary folder beside ``--save-dir`` and renamed into place when complete;
an existing ``--save-dir`` is refused unless ``--overwrite``, and then replaced only after the new
one is complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cookbook.engine import cookbook_format
from cookbook.errors import CookbookError
from cookbook.fileio import check_writable
from cookbook.formats import hf, megatron, megatron_dist
from cookbook.formats.stream import DTYPES, Checkpoint, Tensors, cast, checked
from cookbook.progress import console

FORMATS = ("hf", "cookbook", "megatron")


def read_megatron(path: Path) -> Checkpoint:
    """A Megatron-LM checkpoint of either format: ``torch`` (mp_rank_* files) or ``torch_dist``."""
    it_dir, iteration = megatron.iteration_dir(Path(path))
    return megatron_dist.read(path, it_dir, iteration) if megatron.is_dist(it_dir) else megatron.read(path)


READERS = {"hf": hf.read, "cookbook": cookbook_format.read, "megatron": read_megatron}
MEGATRON_WRITERS = {"torch": megatron.write, "torch_dist": megatron_dist.write}  # --ckpt-format
HINTS = {  # the output holds no optimizer state
    "cookbook": "it holds no optimizer state: train from it with cookbook pretrain --load {save} --finetune ...",
    "megatron": "it holds no optimizer or RNG state: load it in Megatron-LM with --ckpt-format {ckpt_format} --load {save} "
    "--finetune (or --no-load-optim --no-load-rng to keep its iteration)",
}


@dataclass
class ConvertConfig:
    source: str  # --from
    target: str  # --to
    load_dir: str
    save_dir: str
    tp: int = 1  # Megatron target: tensor-parallel size
    pp: int = 1  # Megatron target: pipeline-parallel size
    dtype: str | None = None  # bf16 | fp16 | fp32; None keeps the source's
    make_vocab_size_divisible_by: int = 128
    transformer_impl: str = "transformer_engine"  # Megatron target: transformer_engine or local layer names
    ckpt_format: str = (
        "torch"  # Megatron target: torch (mp_rank_* files) or torch_dist (megatron-core's distributed format)
    )
    max_shard_size: str = "5GB"  # Hugging Face target: the largest safetensors shard
    overwrite: bool = False


@dataclass
class ConvertResult:
    save_dir: Path
    source: str  # what was read, in words
    params: int
    tensors: int
    bytes: int  # bytes of tensors written (after the cast)
    seconds: float
    notes: list[str] = field(default_factory=list)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise CookbookError(f"--max-shard-size {text!r} is not a size such as 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }[unit]
    return max(1, int(float(m.group(1)) * scale))


def check(cfg: ConvertConfig) -> None:
    """Refuse bad flags before anything is read."""
    for flag, value in (("--from", cfg.source), ("--to", cfg.target)):
        if value not in FORMATS:
            raise CookbookError(f"{flag} {value!r} is not a format; use one of {', '.join(FORMATS)}")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise CookbookError(f"unknown --dtype {cfg.dtype!r}; use {', '.join(DTYPES)}")
    if cfg.target != "megatron" and (cfg.tp, cfg.pp) != (1, 1):
        raise CookbookError(
            f"--tp and --pp split a Megatron-LM checkpoint; --to {cfg.target} takes neither "
            "(cookbook checkpoints reshard when loaded)"
        )
    if cfg.tp < 1 or cfg.pp < 1 or cfg.make_vocab_size_divisible_by < 1:
        raise CookbookError("--tp, --pp and --make-vocab-size-divisible-by must be positive integers")
    if cfg.transformer_impl not in megatron.IMPLS:
        raise CookbookError(f"unknown --transformer-impl {cfg.transformer_impl!r}; use {' or '.join(megatron.IMPLS)}")
    if cfg.ckpt_format not in megatron.CKPT_FORMATS:
        raise CookbookError(f"unknown --ckpt-format {cfg.ckpt_format!r}; use {' or '.join(megatron.CKPT_FORMATS)}")
    if cfg.target != "megatron" and cfg.ckpt_format != "torch":
        raise CookbookError(
            f"--ckpt-format chooses the Megatron-LM format written; --to {cfg.target} takes none "
            "(--from megatron reads either format as it finds it)"
        )
    parse_size(cfg.max_shard_size)
    load, save = Path(cfg.load_dir), Path(cfg.save_dir)
    if not load.exists():
        raise CookbookError(f"--load-dir {load} does not exist")
    if save.resolve() == load.resolve() or load.resolve() in save.resolve().parents:
        raise CookbookError(f"--save-dir {save} is or lies inside --load-dir {load}; choose a folder elsewhere")
    if save.exists() and not cfg.overwrite:
        raise CookbookError(
            f"--save-dir {save} already exists; pass --overwrite to replace it, or choose another folder"
        )
    check_writable(save.parent, "--save-dir", folder=True)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final``, renamed to ``final`` when the block succeeds (an existing
    ``final`` is replaced only then); removed when it fails."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _write(cfg: ConvertConfig, tmp: Path, ckpt: Checkpoint, tensors: Tensors, dtypes: dict) -> None:
    final = Path(cfg.save_dir)
    if cfg.target == "hf":
        hf.write(tmp, ckpt, tensors, dtypes, parse_size(cfg.max_shard_size))
    elif cfg.target == "cookbook":
        cookbook_format.write(tmp, final, ckpt, tensors, dtypes)
    else:
        args = megatron.arguments(
            final, ckpt, dtypes, cfg.tp, cfg.pp, cfg.make_vocab_size_divisible_by, cfg.transformer_impl, cfg.ckpt_format
        )
        MEGATRON_WRITERS[cfg.ckpt_format](tmp / f"iter_{args.iteration:07d}", ckpt.config, args, tensors, cfg.tp)
        megatron.finish(tmp, args.iteration, ckpt)


def return_freed_memory() -> None:
    """Keep glibc's mmap threshold at its default 128 KiB: every tensor above it gets its own mapping, which goes
    back to the system when the tensor is freed. Left alone, glibc raises the threshold after the first large
    free and serves later tensors from the heap, where tensors of slightly different sizes, freed and allocated
    in turn, fragment it: resident memory then creeps towards the model's size although about one layer is alive."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def run(cfg: ConvertConfig, show_progress: bool = True) -> ConvertResult:
    check(cfg)
    return_freed_memory()
    start = time.perf_counter()
    ckpt = READERS[cfg.source](Path(cfg.load_dir))
    if cfg.target == "megatron":  # refuse a layout or RoPE Megatron cannot hold before writing anything
        megatron.check(ckpt.config, cfg.tp, cfg.pp)
    dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    dtypes = {name: dtype or d for name, d in ckpt.dtypes.items()}
    stream = cast(checked(ckpt.tensors(), ckpt.config, f"--load-dir {cfg.load_dir}"), dtype)
    counted = {"tensors": 0, "bytes": 0}
    progress = Progress(
        TextColumn("[bold]convert"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[name]}"),
        console=console,
        transient=True,
        disable=not (show_progress and console.is_terminal),
    )

    def shown(tensors: Tensors) -> Tensors:
        for name, tensor in tensors:
            progress.update(task, advance=1, name=name)
            counted["tensors"] += 1
            counted["bytes"] += tensor.numel() * tensor.element_size()
            yield name, tensor

    with progress, staged_dir(Path(cfg.save_dir)) as tmp:
        task = progress.add_task("convert", total=len(dtypes), name="")
        _write(cfg, tmp, ckpt, shown(stream), dtypes)
    notes = list(ckpt.notes)
    if cfg.target in HINTS:
        notes.append(HINTS[cfg.target].format(save=cfg.save_dir, ckpt_format=cfg.ckpt_format))
    return ConvertResult(
        Path(cfg.save_dir),
        ckpt.description,
        ckpt.config.num_params(),
        counted["tensors"],
        counted["bytes"],
        time.perf_counter() - start,
        notes,
    )


def render(r: ConvertResult, target: str) -> list[str]:
    """What ``cookbook convert`` prints: one line, then a line per note."""
    done = (
        f"[green]converted[/green] {escape(r.source)} ({r.params / 1e6:,.1f}M parameters) to {target} in "
        f"{escape(str(r.save_dir))}: {r.tensors:,} tensors, {r.bytes / 1e9:,.2f} GB in {r.seconds:,.1f} s"
    )
    return [done, *(f"[yellow]note:[/yellow] {escape(note)}" for note in r.notes)]
