"""torch pickles (Megatron-LM's model_optim_rng.pt, pytorch_model.bin) read and written one tensor at a time.

Reading: ``torch.load(weights_only=True, map_location="meta")`` gives the structure with meta tensors
whose storages remember where their bytes lie in the file (an older torch does the same under
``FakeTensorMode``); ``materialize`` then reads just the bytes of one tensor with ordinary file reads.
Nothing is memory-mapped, so memory stays at one tensor and a limit on the address space means what
it says. (Where torch records no offsets, the file is memory-mapped instead: ``torch.load(mmap=True)``.)

Safety: ``weights_only=True`` always. Megatron's ``args`` (an ``argparse.Namespace``) is allowed
explicitly; any other class a checkpoint names (Megatron enums in ``args``, TransformerEngine's
``_extra_state`` BytesIO, numpy RNG state) is rebuilt as an inert placeholder that runs no code.

Writing: ``TorchFileWriter`` writes each tensor's bytes into the zip archive as it arrives and the
pickle that refers to them last, in the layout ``torch.load`` reads (mmap included), so a file of
any size is written holding one tensor at a time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import pickle
import re
from pathlib import Path

import torch

from cookbook.errors import CookbookError


class Opaque:
    """An inert stand-in for a class a checkpoint names that we neither need nor trust."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def _safe_globals(path: Path) -> list:
    allowed = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
        if name == "argparse.Namespace":
            allowed.append(argparse.Namespace)
        else:
            allowed.append((type(name, (Opaque,), {}), name))
    return allowed


@contextlib.contextmanager
def _only_our_globals(path: Path):
    """Allow exactly what ``_safe_globals`` says for ``path``, whatever other libraries allowlisted process-wide
    (megatron-core and transformers add real numpy and Megatron classes)."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with torch.serialization.safe_globals(_safe_globals(path)):
            yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


@functools.cache
def _meta_load_keeps_offsets() -> bool:
    """Whether ``torch.load(map_location="meta")`` skips the data and records where it lies (newer torch)."""
    buf = io.BytesIO()
    torch.save(torch.zeros(1), buf)
    buf.seek(0)
    return _lazy(torch.load(buf, map_location="meta", weights_only=True))


def _lazy(tensor: torch.Tensor) -> bool:
    return hasattr(tensor.untyped_storage(), "_checkpoint_offset")


def load_structure(path: Path) -> tuple[object, bool]:
    """The pickle's objects with tensors that hold no data yet; (obj, lazy): lazy when each tensor's storage knows
    its offset in the file (meta tensors, or fake ones on an older torch) for ``materialize``, else memory-mapped."""
    try:
        with _only_our_globals(path):
            if _meta_load_keeps_offsets():
                obj = torch.load(path, map_location="meta", weights_only=True)
            else:
                from torch._subclasses.fake_tensor import FakeTensorMode

                with FakeTensorMode():
                    obj = torch.load(path, weights_only=True)
            lazy = all(_lazy(t) for t in tensors_in(obj))
            if not lazy:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        blocked = re.search(r"GLOBAL (\S+)", str(e))
        if blocked:
            raise CookbookError(
                f"{path} refers to {blocked.group(1)}, which loading with weights_only=True refuses "
                "(a checkpoint is data, never code); it is not a checkpoint to trust"
            ) from e
        raise CookbookError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from e
    return obj, lazy


def tensors_in(obj):
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def materialize(tensor: torch.Tensor, file) -> torch.Tensor:
    """Read a meta tensor's bytes (only the span its view covers) from the open checkpoint ``file``."""
    if not _lazy(tensor):
        return tensor.clone()
    size = tensor.element_size()
    span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())) if tensor.numel() else 0
    buf = torch.empty(span * size, dtype=torch.uint8)
    _read(file, tensor.untyped_storage()._checkpoint_offset + tensor.storage_offset() * size, buf)
    return buf.view(tensor.dtype).as_strided(tensor.shape, tensor.stride())


def read_rows(tensor: torch.Tensor, file, out: torch.Tensor) -> None:
    """Read the first ``len(out)`` rows of ``tensor`` (meta, or memory-mapped) into the contiguous ``out``."""
    rows = out.shape[0]
    if not _lazy(tensor):
        out.copy_(tensor[:rows])
    elif not tensor.is_contiguous():
        out.copy_(materialize(tensor, file)[:rows])
    else:
        offset = tensor.untyped_storage()._checkpoint_offset + tensor.storage_offset() * tensor.element_size()
        _read(file, offset, out.view(-1).view(torch.uint8))


def _read(file, offset: int, buf: torch.Tensor) -> None:
    file.seek(offset)
    if file.readinto(buf.numpy()) != buf.numel():
        raise CookbookError(f"{file.name} is truncated")


def _dcp_class(module: str, name: str):
    """What a DCP ``.metadata`` pickle may name: torch's checkpoint dataclasses and enums, ``torch.Size`` and
    dtypes; megatron-core's old ``MCoreMetadata`` (a ``Metadata`` with one more field) reads as a ``Metadata``;
    anything else becomes an inert placeholder."""
    import dataclasses
    import enum
    import importlib

    if module == "megatron.core.dist_checkpointing.strategies.torch" and name == "MCoreMetadata":
        module, name = "torch.distributed.checkpoint.metadata", "Metadata"
    if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if (module, name) in (("torch.serialization", "_get_layout"), ("collections", "OrderedDict")):
        return getattr(importlib.import_module(module), name)
    if module in (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.planner",
        "torch.distributed.checkpoint.filesystem",
    ):
        obj = getattr(importlib.import_module(module), name, None)
        if obj is not None and (
            dataclasses.is_dataclass(obj) or (isinstance(obj, type) and issubclass(obj, enum.Enum))
        ):
            return obj
    return type(name, (Opaque,), {"__module__": "cookbook.opaque"})


class _DcpUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _dcp_class(module, name)


def read_dcp_metadata(path: Path):
    """A torch.distributed.checkpoint ``.metadata`` file, unpickled without running code (torch's own reader
    unpickles it with plain ``pickle``, and megatron-core's older files name its classes)."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = _DcpUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise CookbookError(
            f"cannot read {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
        ) from e
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise CookbookError(f"{path} is not a torch.distributed.checkpoint metadata file")
    return metadata


class TorchFileWriter:
    """``torch.save(obj, path)`` for an ``obj`` whose tensors are written one by one beforehand:
    ``ref = writer.add(tensor)`` stores the bytes now and returns a placeholder to put in ``obj``;
    ``writer.close(obj)`` writes the pickle."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.zip = torch._C.PyTorchFileWriter(str(path))
        self.count = 0

    def add(self, tensor: torch.Tensor) -> _Stored:
        t = tensor.detach().cpu().contiguous()
        key, nbytes = str(self.count), t.numel() * t.element_size()
        self.count += 1
        start = t.storage_offset() * t.element_size()
        try:
            self.zip.write_record(f"data/{key}", t.untyped_storage()[start : start + nbytes], nbytes)  # a view, no copy
        except TypeError:  # a torch without the storage overload takes the address
            self.zip.write_record(f"data/{key}", t.data_ptr(), nbytes)
        return _Stored(key, t.dtype, tuple(t.shape), t.stride(), t.numel())

    def close(self, obj) -> None:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        self.zip.write_record("data.pkl", data, len(data))
        self.zip.write_record("byteorder", "little", len("little"))
        self.zip.write_end_of_file()


class _Stored:
    """A tensor already written to the archive: pickled as torch.save pickles a tensor."""

    def __init__(self, key, dtype, shape, stride, numel):
        self.key, self.dtype, self.shape, self.stride, self.numel = key, dtype, shape, stride, numel


class _StorageRef:
    def __init__(self, stored: _Stored):
        self.stored = stored


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if type(obj) is _Stored:
            return torch._utils._rebuild_tensor_v2, (
                _StorageRef(obj),
                0,
                obj.shape,
                obj.stride,
                False,
                collections.OrderedDict(),
            )
        return NotImplemented

    def persistent_id(self, obj):
        if type(obj) is _StorageRef:
            s = obj.stored
            storage_type = getattr(torch, torch.empty(0, dtype=s.dtype)._typed_storage()._pickle_storage_type())
            return ("storage", storage_type, s.key, "cpu", s.numel)
        return None
