"""``cookbook plot``: the loss curves of several runs in one PNG (e.g. "with PI" against "without PI").

Each run is a save folder (its ``metrics.jsonl``) or a metrics.jsonl file. Training loss is drawn as a line per
run (optionally smoothed by a moving average), the valid loss of the same run as dots on a dashed line in the
same colour. matplotlib is imported only here (``pip install 'cookbook[plot]'``).
"""

from __future__ import annotations

from pathlib import Path

from cookbook.engine.metrics import read_metrics
from cookbook.errors import CookbookError
from cookbook.fileio import atomic_paths, check_writable

SPLITS = ("train", "valid", "both")


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
    if split not in SPLITS:
        raise CookbookError(f"unknown --split {split!r}; choose one of {', '.join(SPLITS)}")
    if smooth < 1:
        raise CookbookError(f"--smooth {smooth} must be at least 1 (1: no smoothing)")
    data = [curves(run, metric) for run in runs]  # read everything before drawing: a bad run fails first
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CookbookError("cookbook plot needs matplotlib; install it with: pip install 'cookbook[plot]'") from None

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
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(output) as (tmp,):
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return output
