"""cookbook checkpoints: one directory per save, complete or absent.

    SAVE/
      latest                  the name of the newest complete save ("step_000100")
      step_000100/
        .metadata, *.distcp   torch.distributed.checkpoint shards: model and optimizer state,
                              keyed by parameter name, so a save loads under any parallel layout
        config.toml           the resolved job config (model, data, optimizer, training, ...); its
                              [data] tokenizer_model names the tokenizer in hf/, relative to the save
        train_state.json      step, consumed samples (the data position), RNG state
        hf/                   the tokenizer the run was trained with (a SentencePiece tokenizer.model,
                              or Hugging Face tokenizer files), and the Hugging Face side files of a
                              model converted from one (config.json, ...): a save is self-contained and
                              works wherever it is copied

A save is written as ``.step_000100.tmp`` by every rank, completed by rank 0 (config, train
state), then renamed; ``latest`` is replaced atomically after the rename, and only then are saves
beyond ``keep_last`` removed. A run killed at any moment leaves the previous saves intact; the
stale temporary directory is removed at the next start.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cookbook.engine.config import dumps_toml, read_toml
from cookbook.engine.distributed import barrier
from cookbook.errors import CookbookError, interrupts_deferred
from cookbook.fileio import write_text_atomic
from cookbook.formats.stream import hf_side_files, tokenizer_files, tokenizer_path

STEP_DIR = re.compile(r"^step_(\d+)$")
SIDE_DIR = "hf"  # inside every save: its tokenizer and Hugging Face side files


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def is_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "config.toml").is_file()


def find_checkpoint(path: str | Path) -> Path | None:
    """The save ``path`` names: a save directory itself, or the one a run folder's ``latest`` names."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not is_checkpoint(target):
            raise CookbookError(f"{latest} names {target.name}, which is not a complete checkpoint")
        return target
    return None


def read_train_state(ckpt: Path) -> dict:
    path = ckpt / "train_state.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(ckpt, path, f"unreadable ({e})") from None


def read_config(ckpt: Path) -> dict[str, dict]:
    """A save's config sections, its tokenizer named by a path that works from here (see ``saved_tokenizer``)."""
    sections = read_toml(ckpt / "config.toml")
    data = sections.get("data")
    if isinstance(data, dict) and data.get("tokenizer_model"):
        data["tokenizer_model"] = saved_tokenizer(ckpt, data["tokenizer_model"])
    return sections


def saved_tokenizer(ckpt: Path, recorded: str) -> str:
    """The tokenizer a save records, as a path that exists here: inside the save (saves record it relative to
    themselves), else as recorded (saves of earlier versions: relative to the folder training ran in, or
    absolute); else the recorded path unchanged, so that loading it fails with one line naming --tokenizer-model."""
    for candidate in (ckpt / recorded, Path(recorded)):
        if candidate.exists():
            return str(candidate.absolute())
    return recorded


def side_files(tokenizer: str | Path | None) -> dict[str, Path]:
    """The files a save carries in hf/ for a tokenizer: a SentencePiece .model, or a Hugging Face tokenizer file
    or folder; a converted model's hf/ folder comes whole (config.json too, so convert --to hf can restore it)."""
    if not tokenizer:
        return {}
    path = Path(tokenizer)
    if path.is_dir() and path.name == SIDE_DIR and (path / "config.json").is_file():
        return hf_side_files(path)
    return tokenizer_files(path)


def store_tokenizer(step_dir: Path, data: dict, files: dict[str, bytes] | None = None) -> dict:
    """Copy the tokenizer ``data`` names (or ``files``: name -> bytes, read earlier, side files and all) into
    ``step_dir/hf``; returns ``data`` naming the tokenizer there, relative to the save."""
    if files is None:
        files = {name: path.read_bytes() for name, path in side_files(data.get("tokenizer_model")).items()}
    if files:
        (step_dir / SIDE_DIR).mkdir(exist_ok=True)
        for name, blob in files.items():
            (step_dir / SIDE_DIR / name).write_bytes(blob)
    inside = tokenizer_path(Path(SIDE_DIR), files, data.get("tokenizer_type"))
    return {**data, "tokenizer_model": str(inside)} if inside is not None else dict(data)


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


class Checkpointer:
    """Saves into ``root``; every rank calls ``save`` (DCP writes each rank's shards)."""

    def __init__(self, root: str | Path, keep_last: int, is_main: bool):
        self.root, self.keep_last, self.is_main = Path(root), keep_last, is_main
        self._tokenizer: tuple[str, dict[str, bytes]] | None = None  # (path, its files), read at the first save
        if is_main and self.root.is_dir():  # the folder itself is made at the first save
            for stale in self.root.glob(".step_*.tmp"):  # a save cut short by a crash
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def saves(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def _tokenizer_files(self, config: dict[str, dict]) -> dict[str, bytes]:
        """The tokenizer's files, read once: a run continued from a save names the tokenizer inside that save,
        which a later save may remove (--keep-last)."""
        path = config.get("data", {}).get("tokenizer_model")
        if not path:
            return {}
        if self._tokenizer is None or self._tokenizer[0] != path:
            self._tokenizer = path, {name: p.read_bytes() for name, p in side_files(path).items()}
        return self._tokenizer[1]

    def save(self, step: int, model, optimizer, config: dict[str, dict], train_state: dict) -> Path:
        with interrupts_deferred():  # Ctrl-C or SIGTERM during a save acts once the save is complete
            return self._save(step, model, optimizer, config, train_state)

    def _save(self, step: int, model, optimizer, config: dict[str, dict], train_state: dict) -> Path:
        tmp, final = save_paths(self.root, step)
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
        barrier()
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(tmp))
        barrier()
        if self.is_main:
            write_save_files(tmp, config, train_state, self._tokenizer_files(config))
            commit_save(tmp, final, self.keep_last)
        barrier()
        return final


def save_paths(root: Path, step: int) -> tuple[Path, Path]:
    """(the temporary folder a save is written in, its final name) inside the run folder ``root``."""
    return root / f".{step_name(step)}.tmp", root / step_name(step)


def write_save_files(
    folder: Path, sections: dict[str, dict], train_state: dict | None, tokenizer_files: dict[str, bytes] | None = None
) -> None:
    """A save's own files beside its tensors: config.toml (its tokenizer carried into hf/ and named relative to the
    save) and train_state.json."""
    sections = {**sections, "data": store_tokenizer(folder, sections.get("data", {}), tokenizer_files)}
    write_text_atomic(folder / "config.toml", dumps_toml(sections))
    if train_state is not None:
        write_text_atomic(folder / "train_state.json", json.dumps(train_state, indent=1))


def commit_save(tmp: Path, final: Path, keep_last: int = 0) -> Path:
    """Make the complete save ``tmp`` the run's save ``final``: renamed into place (the same step saved again is
    swapped, never losing both), then ``latest`` names it, and only then do saves beyond ``keep_last`` (0: none) go.
    Every writer of a save folder ends here, so a run killed at any moment keeps its previous saves."""
    root = final.parent
    if final.exists():
        old = root / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    if keep_last > 0:
        saves = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
        for _, old in saves[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load(ckpt: Path, model, optimizer=None) -> None:
    """Load model (and optimizer) state from a save into a model of any parallel layout."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        saved = read_metadata(ckpt).state_dict_metadata
        if not any(key.startswith("optimizer") for key in saved):
            raise CookbookError(
                f"{ckpt} holds weights only, no optimizer state (a converted or pruned checkpoint); "
                "start a run from it with --finetune"
            )
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    read_state(state, ckpt)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


# --------------------------------------------------------------------------- damaged saves


def read_metadata(ckpt: Path):
    """A save's DCP metadata, after checking that every file it names is there and long enough."""
    damage = find_damage(ckpt)
    if damage is not None:
        raise damaged(ckpt, *damage)
    return dcp.FileSystemReader(str(ckpt)).read_metadata()


def read_state(state: dict, ckpt: Path, single_process: bool = False) -> None:
    """``dcp.load`` of ``state`` from a save; a damaged file becomes one line naming it (and an intact earlier save)."""
    read_metadata(ckpt)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(ckpt), **({"no_dist": True} if single_process else {}))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        damage = find_damage(ckpt, read_all=True)
        if damage is not None:
            raise damaged(ckpt, *damage) from e
        raise CookbookError(f"cannot load {ckpt}: {_last_line(e)}") from e  # missing keys, shape mismatches


def _last_line(e: BaseException) -> str:
    """The message of an error DCP raised on some rank (it wraps each rank's traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def find_damage(ckpt: Path, read_all: bool = False) -> tuple[Path, str] | None:
    """(file, what is wrong) when a save is damaged: .metadata unreadable, a file missing or shorter than .metadata
    says; with ``read_all``, also an item whose bytes do not load back (read one at a time)."""
    try:
        metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
        storage = list(metadata.storage_data.items())
    except Exception as e:
        return ckpt / ".metadata", f"unreadable ({_last_line(e)})"
    ends: dict[str, int] = {}
    for _, info in storage:
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in ends.items():
        path = ckpt / name
        if not path.is_file():
            return path, "missing"
        size = path.stat().st_size
        if size < end:
            return path, f"truncated ({size:,} of {end:,} bytes)"
    if not read_all:
        return None
    for index, info in sorted(storage, key=lambda item: (item[1].relative_path, item[1].offset)):
        if getattr(info, "transform_descriptors", None):
            continue  # stored transformed (compressed): DCP alone reads it
        with open(ckpt / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception:
            return ckpt / info.relative_path, f"corrupt (the bytes of {index.fqn} do not read back)"
    return None


def damaged(ckpt: Path, path: Path, what: str) -> CookbookError:
    """One line: the damaged file, and the newest other save of the run that is intact, with how to use it."""
    others = (
        sorted(
            (int(m.group(1)), p)
            for p in ckpt.parent.iterdir()
            if (m := STEP_DIR.match(p.name)) and p != ckpt and is_checkpoint(p)
        )
        if ckpt.parent.is_dir()
        else []
    )
    intact = next((p for _, p in reversed(others) if find_damage(p) is None), None)
    if intact is not None:
        hint = (
            f"the save {intact} is intact: load it with --load {intact}, or continue the run from it by writing "
            f"{intact.name} into {ckpt.parent / 'latest'}"
        )
    elif others:
        hint = f"no other save in {ckpt.parent} is intact either"
    else:
        hint = "the run folder holds no other save; copy the checkpoint again from where it came"
    return CookbookError(f"checkpoint {ckpt} is damaged: {path} is {what}; {hint}")


# --------------------------------------------------------------------------- any checkpoint's format and config


def model_format(path: str | Path) -> str:
    """ "cookbook" (a save folder or one step_* directory) or "hf" (a Hugging Face model folder); a missing path is
    named as missing first."""
    where = Path(path)
    if not where.exists():
        raise CookbookError(f"{path} does not exist; pass a cookbook checkpoint or a Hugging Face model folder")
    if find_checkpoint(where) is not None:
        return "cookbook"
    if (where / "config.json").is_file():
        return "hf"
    raise CookbookError(
        f"{path} holds no cookbook checkpoint (no 'latest' file and no .metadata/config.toml) and "
        "is no Hugging Face model folder (no config.json); pass one of those"
    )


def model_sections(path: str | Path) -> dict[str, dict]:
    """A checkpoint's config sections without its weights: a save's config.toml, or a Hugging Face folder's
    config.json as ``[model]`` and its tokenizer as ``[data]``."""
    from cookbook.formats import hf

    if model_format(path) == "cookbook":
        return read_config(find_checkpoint(path))
    cfg, _ = hf.model_config(hf.read_config_json(Path(path)), str(Path(path) / "config.json"))
    tok = tokenizer_path(Path(path), hf_side_files(Path(path)))
    return {
        "model": {k: v for k, v in cfg.to_dict().items() if v is not None},
        "data": {"tokenizer_model": str(tok)} if tok is not None else {},
    }
