"""``cookbook plot``: the loss curves of several runs in one PNG (e.g. "with PI" against "without PI"), or their
retrieval accuracy against context length.

Each run is a save folder (its ``metrics.jsonl``) or a metrics.jsonl file. Training loss is drawn as a line per
run (optionally smoothed by a moving average), the valid loss of the same run as dots on a dashed line in the
same colour. When every run is instead a retrieval result (``passkey.json`` or ``recall.json`` from
``cookbook eval --passkey/--recall --dump-dir``, or the folder holding one), the figure is accuracy against context
length, a line per run (the mean over depths). ``cookbook eval --plot`` draws one result a line per depth.
matplotlib is imported only here (``pip install 'cookbook[plot]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

from cookbook.engine.metrics import read_metrics
from cookbook.errors import CookbookError
from cookbook.fileio import atomic_paths, check_writable

SPLITS = ("train", "valid", "both")
RETRIEVAL_DUMPS = ("passkey.json", "recall.json")


def metrics_file(run: str | Path) -> Path:
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise CookbookError(
            f"{run} has no metrics.jsonl; give a save folder of cookbook pretrain/extend or a metrics.jsonl file"
        )
    return path


def curves(run: str | Path, metric: str = "loss") -> dict[str, tuple[list[int], list[float]]]:
    """{split: (steps, values)} of one run's ``metric`` (train records have no split field)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in read_metrics(metrics_file(run)):
        if record.get(metric) is None:
            continue
        steps, values = out.setdefault(record.get("split", "train"), ([], []))
        steps.append(int(record["step"]))
        values.append(float(record[metric]))
    return out


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def retrieval_dump(run: str | Path) -> Path | None:
    """The retrieval result ``run`` names (a passkey.json or recall.json, or a folder with exactly one), else None."""
    path = Path(run)
    if path.is_dir():
        found = [path / name for name in RETRIEVAL_DUMPS if (path / name).is_file()]
        if len(found) > 1 and not (path / "metrics.jsonl").is_file():
            raise CookbookError(f"{run} holds both passkey.json and recall.json; name the one to draw")
        return found[0] if len(found) == 1 and not (path / "metrics.jsonl").is_file() else None
    return path if path.suffix == ".json" and path.is_file() else None


def retrieval_curve(dump: Path) -> tuple[list[int], list[float]]:
    """(lengths, accuracy over every depth) of a retrieval result."""
    try:
        rows = json.loads(dump.read_text())["accuracy"]
        groups: dict[int, list[float]] = {}
        for row in rows:
            groups.setdefault(int(row["length"]), []).append(float(row["accuracy"]))
    except (ValueError, KeyError, TypeError):
        raise CookbookError(
            f"{dump} is not a retrieval result; give the passkey.json or recall.json of cookbook eval --dump-dir"
        ) from None
    lengths = sorted(groups)
    return lengths, [sum(groups[n]) / len(groups[n]) for n in lengths]


def accuracy_curves(trials) -> dict[str, tuple[list[int], list[float]]]:
    """A line per depth, then their mean, of one retrieval evaluation's trials."""
    from cookbook.inference.retrieval import accuracy, accuracy_by_length

    acc = accuracy(trials)
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for (length, depth), a in sorted(acc.items()):
        lengths, values = lines.setdefault(f"depth {depth:g}", ([], []))
        lengths.append(length)
        values.append(a)
    mean = sorted(accuracy_by_length(trials).items())
    lines["mean"] = ([n for n, _ in mean], [a for _, a in mean])
    return lines


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CookbookError("cookbook plot needs matplotlib; install it with: pip install 'cookbook[plot]'") from None
    return plt


def _save(plt, fig, output: str | Path) -> Path:
    """Write the figure to ``output`` (PNG) under a temporary name, renamed when complete."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(output) as (tmp,):
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return output


def draw_accuracy(lines: dict[str, tuple[list[int], list[float]]], output: str | Path, title: str) -> Path:
    """Retrieval accuracy against context length, a line per entry of ``lines`` (label: (lengths, accuracy))."""
    check_writable(output, "--output")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, (label, (lengths, values)) in enumerate(lines.items()):
        bold = label == "mean"
        ax.plot(lengths, values, color="black" if bold else f"C{i}", marker="o", markersize=4, label=label,
                linewidth=2.5 if bold else 1.5)  # fmt: skip
    every = sorted({n for lengths, _ in lines.values() for n in lengths})
    ax.set_xscale("log", base=2)
    ax.set_xticks(every, [f"{n:,}" for n in every])
    ax.minorticks_off()
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(plt, fig, output)


def plot(
    runs: list[str],
    output: str | Path,
    labels: list[str] | None = None,
    metric: str = "loss",
    split: str = "both",
    smooth: int = 1,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Draw the runs' curves into ``output`` (PNG), written under a temporary name and renamed."""
    if not runs:
        raise CookbookError("cookbook plot needs at least one run (a save folder or a metrics.jsonl)")
    check_writable(output, "--output")
    if labels and len(labels) != len(runs):
        raise CookbookError(f"{len(labels)} --label for {len(runs)} runs; give one label per run, or none")
    dumps = [retrieval_dump(run) for run in runs]
    if any(dumps):
        if not all(dumps):
            raise CookbookError(
                "cookbook plot draws either training runs or retrieval results (passkey.json, recall.json), not both"
            )
        names = labels or [Path(run).name if Path(run).is_dir() else Path(run).parent.name or run for run in runs]
        lines = {name: retrieval_curve(d) for name, d in zip(names, dumps, strict=True)}
        return draw_accuracy(lines, output, title or "retrieval accuracy by context length")
    if split not in SPLITS:
        raise CookbookError(f"unknown --split {split!r}; choose one of {', '.join(SPLITS)}")
    if smooth < 1:
        raise CookbookError(f"--smooth {smooth} must be at least 1 (1: no smoothing)")
    data = [curves(run, metric) for run in runs]  # read everything before drawing: a bad run fails first
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    drawn = 0
    for i, (run, found) in enumerate(zip(runs, data, strict=True)):
        label, color = (labels[i] if labels else Path(run).name), f"C{i}"
        if split in ("train", "both") and "train" in found:
            steps, values = found["train"]
            ax.plot(steps, moving_average(values, smooth), color=color, label=f"{label} (train)", linewidth=1.5)
            drawn += 1
        if split in ("valid", "both") and "valid" in found:
            steps, values = found["valid"]
            ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=4, label=f"{label} (valid)")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise CookbookError(f"no {split} {metric!r} records in {', '.join(runs)}; check --metric and --split")
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric + (f" (moving average of {smooth})" if smooth > 1 else ""))
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or f"{metric} by iteration")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(plt, fig, output)
