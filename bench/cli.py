"""Benchmark: how long the command line takes to show its help, against the interpreter alone and ``import torch``.

Each command runs as a new process, the cases taking turns; the table gives the median wall time of ``--runs`` runs:

    python bench/cli.py --runs 10

``cookbook --help`` and the help of a command that trains nothing import no torch (the command bodies import what
they use). A training command's help does: its flags come from the fields of the config dataclasses, whose modules
import torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import torch'": ["-c", "import torch"],
    "cookbook --help": ["-m", "cookbook", "--help"],
    "cookbook preprocess --help": ["-m", "cookbook", "preprocess", "--help"],
    "cookbook pretrain --help": ["-m", "cookbook", "pretrain", "--help"],
}


def wall_seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.runs):
        for name, case in CASES.items():
            times[name].append(wall_seconds(case))
    print("| command | median wall time (s) | min (s) |")
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| `{name}` | {statistics.median(seconds):.2f} | {min(seconds):.2f} |")


if __name__ == "__main__":
    main()
