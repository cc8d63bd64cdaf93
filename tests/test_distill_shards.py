"""Sharded distillation output: a killed run resumes without duplicates or gaps, and a changed run is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cookbook.errors import CookbookError
from inference_distill.shards import ShardWriter

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"teacher": "t", "seed": 1, "sampling": {"temperature": 0.7, "stop": ("</s>",)}}

# A driver loop as recipes/distill.py runs it, with a fake teacher: prompt i's completion is a pure function of i,
# with duplicates across shards (12 repeats 0) and short completions (i % 5 == 4) for the filter to drop.
# argv: folder total per_shard sleep_seconds crash_at_rename filter(0/1)
DRIVER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from inference_distill.filters import Filter, FilterConfig
from cookbook.inference.sampling import Completion
from inference_distill.shards import ShardWriter

folder, total, per_shard, sleep, crash_at, filtering = sys.argv[1], *map(int, sys.argv[2:4]), float(sys.argv[4]), *map(int, sys.argv[5:7])
if crash_at:  # die (as with SIGKILL: no cleanup) just before the crash_at-th rename
    real, calls = os.replace, [0]
    def replace(a, b):
        calls[0] += 1
        if calls[0] == crash_at:
            os._exit(9)
        real(a, b)
    os.replace = replace

with ShardWriter(folder, {identity!r}, total, per_shard) as writer:
    filt = Filter(FilterConfig(min_tokens=1 if filtering else 0, dedup=bool(filtering)), seen=writer.seen_hashes())
    for k in writer.pending():
        start, stop = writer.bounds(k)
        records = []
        for i in range(start, stop):
            text = f"answer {{i % 4}}" if i % 3 == 0 else f"answer {{i}} é"
            completion = Completion(text=text, tokens=0 if i % 5 == 4 else 3, finish_reason="stop")
            if filt.keep("prompt " + text, completion) is None:
                records.append({{"prompt": i, "text": "prompt " + text}})
        stats, hashes = filt.end_shard()
        time.sleep(sleep)
        writer.write(k, records, stats, hashes)
    writer.finish()
"""


@pytest.fixture
def driver(tmp_path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER.format(repo=str(REPO), identity=IDENTITY))
    return path


def run_driver(driver: Path, folder: Path, total=23, per_shard=5, sleep=0.0, crash_at=0, filtering=1, wait=True):
    args = [
        sys.executable,
        str(driver),
        str(folder),
        str(total),
        str(per_shard),
        str(sleep),
        str(crash_at),
        str(filtering),
    ]
    if not wait:
        return subprocess.Popen(args)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (9 if crash_at else 0), proc.stderr
    return proc


def contents(folder: Path) -> dict[str, bytes]:
    """Every file a reader sees (dotfiles, the lock and temporaries, left out)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def records(folder: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted(folder.glob("shard_*.jsonl"))
        for line in p.read_text(encoding="utf-8").splitlines()
    ]


def write_some(folder: Path, shards, total=23, per_shard=5) -> ShardWriter:
    w = ShardWriter(folder, IDENTITY, total, per_shard)
    for k in shards:
        start, stop = w.bounds(k)
        w.write(
            k,
            [{"prompt": i} for i in range(start, stop)],
            {"generated_tokens": 10 * (stop - start), "filtered": {"short": 1}},
            [bytes([k]) * 16],
        )
    return w


def test_layout_and_summary_with_a_partial_last_shard(tmp_path):
    folder = tmp_path / "out"
    w = write_some(folder, range(5))
    assert w.pending() == [] and w.bounds(4) == (20, 23)
    summary = w.finish()
    assert summary == {"shards": 5, "prompts": 23, "records": 23, "generated_tokens": 230, "filtered": {"short": 5}}
    assert json.loads((folder / "summary.json").read_text()) == summary
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["identity"] == json.loads(json.dumps(IDENTITY)) and (
        manifest["prompts"],
        manifest["prompts_per_shard"],
        manifest["shards"],
    ) == (23, 5, 5)
    assert sorted(contents(folder)) == [
        "manifest.json",
        *[f"shard_{k:05d}.{e}" for k in range(5) for e in ("jsonl", "stats.json")],
        "summary.json",
    ]
    assert [r["prompt"] for r in records(folder)] == list(range(23))
    assert json.loads((folder / "shard_00004.stats.json").read_text())["prompts"] == 3


def test_reopen_after_a_crash_lists_the_missing_shards_and_removes_leftovers(tmp_path):
    folder = tmp_path / "out"
    write_some(folder, range(3)).close()
    (folder / f".shard_00003.jsonl.tmp-{os.getpid() + 1}").write_text(
        '{"prompt": 15}\n'
    )  # killed while writing shard 3
    (folder / "shard_00003.stats.json").write_text(
        '{"shard": 3, "records": 5, "hashes": ["ff"]}'
    )  # or just after its stats
    (folder / ".summary.json.tmp-1").write_text("{")
    w = ShardWriter(folder, IDENTITY, 23, 5)
    assert w.pending() == [3, 4]
    assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == [
        "manifest.json",
        *[f"shard_{k:05d}.{e}" for k in range(3) for e in ("jsonl", "stats.json")],
    ]
    assert sorted(w.done_stats()) == [0, 1, 2] and w.done_stats()[1]["records"] == 5
    assert w.totals() == {"shards": 3, "prompts": 15, "records": 15, "generated_tokens": 150, "filtered": {"short": 3}}
    assert w.seen_hashes() == {bytes([k]) * 16 for k in range(3)}
    with pytest.raises(ValueError, match="not written yet"):
        w.finish()
    w.close()


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"identity": {**IDENTITY, "seed": 2}}, "seed = 1 but this run has seed = 2"),
        ({"identity": {**IDENTITY, "sampling": {"temperature": 1.0}}}, "sampling = "),
        ({"identity": {**IDENTITY, "extra": "x"}}, 'extra = null but this run has extra = "x"'),
        ({"total": 24}, "prompts = 23 but this run has prompts = 24"),
        ({"prompts_per_shard": 4}, "prompts_per_shard = 5 but this run has prompts_per_shard = 4"),
    ],
)
def test_a_changed_run_is_refused(tmp_path, change, needle):
    folder = tmp_path / "out"
    write_some(folder, [0]).close()
    before = contents(folder)
    kw = {"identity": IDENTITY, "total": 23, "prompts_per_shard": 5, **change}
    with pytest.raises(CookbookError) as e:
        ShardWriter(folder, **kw)
    assert needle in str(e.value) and "--output" in str(e.value) and "\n" not in str(e.value)
    assert contents(folder) == before
    with ShardWriter(folder, IDENTITY, 23, 5) as w:  # and the lock was let go
        assert w.pending() == [1, 2, 3, 4]


def test_a_folder_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "data.txt").write_text("mine")
    with pytest.raises(CookbookError, match="not empty and holds no manifest.json"):
        ShardWriter(tmp_path, IDENTITY, 10, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]  # not even a lock file


def test_a_first_run_that_fails_before_a_shard_leaves_nothing(tmp_path):
    """A teacher that fails to load (or Ctrl-C) after the manifest is written: the folder is gone, so the next run
    may use other flags; once a shard is written, a failure keeps the run for a resume."""
    folder = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(folder, IDENTITY, 10, 5):
            raise KeyboardInterrupt
    assert not folder.exists()
    folder.mkdir()  # a folder the user made stays, empty
    with pytest.raises(CookbookError):
        with ShardWriter(folder, IDENTITY, 10, 5):
            raise CookbookError("the teacher failed to load")
    assert folder.is_dir() and list(folder.iterdir()) == []
    with pytest.raises(RuntimeError):
        with ShardWriter(folder, {**IDENTITY, "teacher": "another"}, 10, 5) as w:  # other flags: not refused
            w.write(0, [{"text": "a"}])
            raise RuntimeError("a failure after a shard")
    assert (folder / "manifest.json").is_file() and (folder / "shard_00000.jsonl").is_file()
    with pytest.raises(RuntimeError):
        with ShardWriter(folder, {**IDENTITY, "teacher": "another"}, 10, 5):
            raise RuntimeError("a failure after a shard of an earlier run")
    assert (folder / "manifest.json").is_file() and (folder / "shard_00000.jsonl").is_file()


def test_two_writers_on_one_folder_are_refused(tmp_path):
    with ShardWriter(tmp_path / "out", IDENTITY, 10, 5):
        with pytest.raises(CookbookError, match="another run is writing"):
            ShardWriter(tmp_path / "out", IDENTITY, 10, 5)


def test_a_crash_at_every_rename_resumes_to_the_uninterrupted_output(tmp_path, driver):
    """Die before each rename in turn (manifest, each shard's stats and records, summary), leaving temporary files
    behind, then run again: the output, dedup across shards included, is byte for byte the uninterrupted run's."""
    total, per_shard = 13, 5
    run_driver(driver, tmp_path / "whole", total, per_shard)
    expected = contents(tmp_path / "whole")
    assert [r["prompt"] for r in records(tmp_path / "whole")] == [
        0,
        1,
        2,
        3,
        5,
        6,
        7,
        8,
        10,
        11,
    ]  # 4, 9 short; 12 repeats 0
    assert json.loads(expected["summary.json"])["filtered"] == {"short": 2, "repetitive": 0, "duplicate": 1}
    renames = 1 + 2 * 3 + 1
    for crash_at in range(1, renames + 1):
        folder = tmp_path / f"crash{crash_at}"
        run_driver(driver, folder, total, per_shard, crash_at=crash_at)
        assert not (folder / "summary.json").exists()
        for shard in folder.glob("shard_*.jsonl"):  # a shard a reader can see is complete, its stats beside it
            assert shard.with_suffix(".stats.json").exists() and shard.read_bytes() == expected[shard.name]
        run_driver(driver, folder, total, per_shard)
        assert contents(folder) == expected, f"crash before rename {crash_at}"
        assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [".lock"]


def test_sigkill_mid_run_then_resume_gives_every_prompt_once(tmp_path, driver):
    total, per_shard = 40, 4
    run_driver(driver, tmp_path / "whole", total, per_shard, filtering=0)
    folder = tmp_path / "killed"
    proc = run_driver(driver, folder, total, per_shard, sleep=0.1, filtering=0, wait=False)
    deadline = time.monotonic() + 30
    while len(list(folder.glob("shard_*.jsonl"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # somewhere inside the next shard
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    written = len(list(folder.glob("shard_*.jsonl")))
    assert 3 <= written < total // per_shard
    with ShardWriter(folder, IDENTITY, total, per_shard) as w:
        assert w.pending() == list(range(written, total // per_shard))
    run_driver(driver, folder, total, per_shard, filtering=0)
    assert [r["prompt"] for r in records(folder)] == list(range(total))  # each prompt once, none missing
    assert contents(folder) == contents(tmp_path / "whole")
