"""Tables of the CPU experiments over seeds (scripts/prune_demo.sh, distill_demo.sh, extend_experiment.sh).

``mean_sd`` summarises one variant over seeds (sample standard deviation). ``paired`` compares two variants run on
the same seeds: the per-seed relative difference of ``a`` against ``b`` in percent, its mean and standard deviation,
and a two-sided paired t-test at 5% (``exceeds``: the difference is larger than the seed-to-seed spread allows by
chance). With 3 seeds the test needs |t| > 4.30, so only differences that are large against their spread pass.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

# two-sided 5% critical values of Student's t by degrees of freedom
T_CRIT = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: list[float], b: list[float]) -> dict:
    """``a`` against ``b`` seed by seed: relative differences in percent (negative: ``a`` lower), their mean, sd, t
    and whether the mean exceeds the spread (paired t-test, 5%, two-sided; never with fewer than 2 seeds)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired comparisons need the same seeds for both variants")
    diffs = [100.0 * (x / y - 1.0) for x, y in zip(a, b)]
    mean, sd = mean_sd(diffs)
    n = len(diffs)
    t = mean / (sd / math.sqrt(n)) if n > 1 and sd > 0 else (math.inf if n > 1 and mean else 0.0)
    crit = T_CRIT.get(n - 1, 1.96)
    return {
        "diffs_pct": diffs,
        "mean_pct": mean,
        "sd_pct": sd,
        "t": t,
        "t_crit": crit if n > 1 else None,
        "exceeds": n > 1 and abs(t) > crit,
        "same_sign": all(d < 0 for d in diffs) or all(d > 0 for d in diffs),
    }


def fmt(values: list[float], digits: int = 2) -> str:
    """``mean ± sd`` of a variant over seeds."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def verdict(p: dict) -> str:
    """One cell: the mean relative difference ± its sd, and whether it exceeds the spread."""
    word = "yes" if p["exceeds"] else "no"
    return f"{p['mean_pct']:+.1f}% ± {p['sd_pct']:.1f} (t {p['t']:.1f}, {word})"


def ppl(folder: str | Path, seq_length: int | None = None) -> float:
    """A perplexity from ``cookbook eval --dump-dir FOLDER`` (at ``seq_length``, else the first)."""
    results = json.loads((Path(folder) / "perplexity.json").read_text())["results"]
    return next(r["ppl"] for r in results if seq_length is None or r["seq_length"] == seq_length)


def write_json(path: str | Path, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
