"""Throughput, TFLOP/s, MFU and memory; one log line per interval, the same record in metrics.jsonl.

TFLOP/s per device = ``ModelConfig.flops_per_token(seq) x tokens / seconds / devices`` (the exact
matmul count, attention without a causal discount; see docs/model.md). MFU divides it by the
device's dense bf16 peak. ``tflops_megatron`` in metrics.jsonl is the figure by the formula the
Megatron Cookbook reported, for comparison with its 161-177 TFLOP/s per A100.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from cookbook.errors import CookbookError
from cookbook.fileio import write_text_atomic
from cookbook.progress import console

# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets; SXM parts)
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            if key == "H100" and "PCIe" in name:
                return 756.0
            return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class MetricsLogger:
    """Rank 0 prints a line per record and appends it to ``metrics.jsonl`` (and TensorBoard). The file is opened at
    the first record, so a run that fails before it logs anything leaves no empty file behind."""

    def __init__(self, folder: str | Path | None, enabled: bool, tensorboard_dir: str | None = None):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl" if enabled and folder is not None else None
        self.file = None
        self.tb = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise CookbookError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(tensorboard_dir)

    def log(self, record: dict, line: str) -> None:
        if not self.enabled:
            return
        console.print(line, highlight=False, soft_wrap=True)
        if self.path is not None:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()  # a killed run keeps every line it printed
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def activation_memory(forward) -> tuple[int, int]:
    """Bytes of CPU memory ``forward()`` (which returns a loss) allocates and still holds when it ends (what is kept
    for backward), and the peak over forward + backward, from the profiler's allocation events. Memory that exists
    before (the parameters) is not counted; gradients are. ``cookbook plan``'s activation model is checked against
    it (tests/test_plan.py, bench/plan.py)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward()
        with torch.profiler.record_function("cookbook_backward"):
            loss.backward()
    events = list(prof.profiler.kineto_results.events())
    backward_at = min(e.start_ns() for e in events if e.name() == "cookbook_backward")
    held, now, peak = None, 0, 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if held is None and e.start_ns() >= backward_at:
            held = now
        now += e.nbytes()
        peak = max(peak, now)
    return held, peak


def metrics_records(path: str | Path) -> list[dict]:
    """Every complete record of a metrics.jsonl in file order. A line that is not a JSON object is skipped: a killed
    run can leave its last line half-written."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl, sorted by split and step. A step logged twice (a run resumed from an earlier save,
    written by a version that did not trim the file on resume) keeps its last record; a partial line is skipped."""
    records = {(r.get("split", "train"), r["step"]): r for r in metrics_records(path)}
    return [records[k] for k in sorted(records)]


def trim_metrics(folder: str | Path, step: int) -> None:
    """On resume from the save of ``step``: drop the records of later steps (they will be logged again) and any
    partial last line, so that metrics.jsonl reads as one run."""
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [r for r in metrics_records(path) if r["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
