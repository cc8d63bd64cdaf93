"""``--partitions N`` gives the bytes of one pass; a run killed at any point and started again reuses the finished
partitions and ends with the same bytes; ``--partition-index i`` for each i, then ``cookbook merge`` of the parts
folder, gives them too."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers_data import (
    assert_one_line_error,
    cli_env,
    files_under,
    jsonl_bytes,
    make_texts,
    preprocess,
    run_cli,
    save_dataset,
    snapshot,
    train_sp,
    write_jsonl,
    write_parquet,
)

from cookbook.errors import CookbookError
from recipes.preprocess import PreprocessConfig, parts_folder, run

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_sp(tmp_path_factory.mktemp("parts_tok"), make_texts(80, seed=1), vocab_size=400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A big plain jsonl (split mid-file), a gzip file (one unit), parquet row groups and a saved dataset."""
    d = tmp_path_factory.mktemp("parts_corpus")
    write_jsonl(d / "a.jsonl", make_texts(600, seed=11) + ["", "tail without newline"])
    (d / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(make_texts(80, seed=12))))
    write_parquet(d / "c.parquet", {"text": make_texts(120, seed=13)}, row_group_size=9)
    save_dataset(d / "d_saved", {"text": make_texts(90, seed=14)}, num_shards=3)
    return d


@pytest.fixture(scope="module")
def one_pass(tmp_path_factory, corpus, tok):
    return snapshot(preprocess([corpus], tmp_path_factory.mktemp("one") / "c", tok, append_eod=True))


@pytest.mark.parametrize("n", [2, 3, 16])
def test_partitions_equal_one_pass(tmp_path, corpus, tok, one_pass, n):
    got = preprocess([corpus], tmp_path / "c", tok, append_eod=True, partitions=n, block_mb=0.002)
    assert snapshot(got) == one_pass
    assert not parts_folder(got).exists(), "the partitions are removed once merged"


def test_partition_index_then_merge(tmp_path, corpus, tok, one_pass):
    n = 5
    for i in reversed(range(n)):  # any order, as SLURM array tasks finish
        s = run(
            PreprocessConfig(
                [str(corpus)],
                str(tmp_path / "c"),
                str(tok),
                append_eod=True,
                partitions=n,
                partition_index=i,
                workers=1,
            ),
            show_progress=False,
        )
        assert s.outputs["text"].endswith(f"c_text_document.parts/{i:05d}-of-{n:05d}")
    folder = parts_folder(tmp_path / "c_text_document")
    proc = run_cli("merge", "--input", folder, "--output-prefix", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path / "merged") == one_pass
    # and the same command without --partition-index reuses all five, writing the merged dataset
    s = run(
        PreprocessConfig([str(corpus)], str(tmp_path / "c"), str(tok), append_eod=True, partitions=n, workers=1),
        show_progress=False,
    )
    assert (s.partitions_reused, s.partitions_done) == (n, 0)
    assert snapshot(s.outputs["text"]) == one_pass


def test_bad_line_in_a_later_partition_is_named_by_its_line(tmp_path, tok):
    src = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"line {i} " * 5}) + "\n" for i in range(3000)]
    lines[2500] = "not json\n"
    src.write_text("".join(lines))
    with pytest.raises(CookbookError, match=r"big\.jsonl:2501: not valid JSON"):
        run(
            PreprocessConfig([str(src)], str(tmp_path / "o"), str(tok), partitions=4, block_mb=0.01, workers=1),
            show_progress=False,
        )


def test_parts_of_another_run_are_refused(tmp_path, corpus, tok):
    run(
        PreprocessConfig([str(corpus)], str(tmp_path / "c"), str(tok), partitions=3, partition_index=0, workers=1),
        show_progress=False,
    )
    before = files_under(tmp_path)
    with pytest.raises(CookbookError, match="partitions of another run"):
        run(
            PreprocessConfig([str(corpus)], str(tmp_path / "c"), str(tok), append_eod=True, partitions=3, workers=1),
            show_progress=False,
        )
    assert files_under(tmp_path) == before


def test_partition_flags_checked(tmp_path, corpus, tok):
    proc = run_cli(
        "preprocess",
        "--input",
        corpus,
        "--output-prefix",
        tmp_path / "c",
        "--tokenizer-model",
        tok,
        "--partitions",
        "4",
        "--partition-index",
        "4",
        "-q",
    )
    assert_one_line_error(proc, "--partition-index")
    proc = run_cli(
        "preprocess",
        "--input",
        "-",
        "--output-prefix",
        tmp_path / "c",
        "--tokenizer-model",
        tok,
        "--partitions",
        "2",
        "-q",
    )
    assert_one_line_error(proc, "standard input")


def test_killed_runs_resume_to_the_same_bytes(tmp_path, tok):
    """SIGKILL at random points (seeded: the seed is in the failure message), then the same command again."""
    rng = random.Random(int(os.environ.get("COOKBOOK_TEST_SEED", "19")))
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "a.jsonl", make_texts(20000, seed=21, max_words=60))  # about 3 s of work in 12 partitions
    write_parquet(src / "b.parquet", {"text": make_texts(10000, seed=22, max_words=60)}, row_group_size=300)
    out = tmp_path / "out" / "c"
    ref = preprocess([src], tmp_path / "ref", tok, append_eod=True)
    args = [
        sys.executable,
        "-m",
        "cookbook",
        "preprocess",
        "--input",
        str(src),
        "--output-prefix",
        str(out),
        "--tokenizer-model",
        str(tok),
        "--append-eod",
        "--partitions",
        "12",
        "-w",
        "1",
        "-q",
    ]
    folder = parts_folder(f"{out}_text_document")

    def records() -> int:
        return len(list(folder.glob("0*.json"))) if folder.exists() else 0

    # once early (importing, planning or in the first partition), then twice once k partitions are done
    # (a random k), a random few ms into the next one
    targets = [None, rng.randint(1, 4), rng.randint(6, 10)]
    kills = []
    for target in targets:
        proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if target is None:
            time.sleep(rng.uniform(0, 1.5))
        else:
            deadline = time.time() + 60
            while records() < target and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(records())
    finished = records()
    assert 0 < finished < 12, f"the kills did not land mid-run: partitions finished after each kill: {kills}"
    proc = subprocess.run(args[:-1], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(f"{out}_text_document") == snapshot(ref), f"partitions finished after each kill: {kills}"
    m = re.search(r"partitions\W+(\d+) written, (\d+) reused", proc.stdout)  # the rerun wrote only what was missing
    assert m and (int(m.group(1)), int(m.group(2))) == (12 - finished, finished), proc.stdout
    assert files_under(tmp_path / "out") == [out.parent / "c_text_document.bin", out.parent / "c_text_document.idx"]


def test_slurm_array_script(tmp_path, corpus, tok, one_pass):
    """scripts/preprocess-slurm-array.sh: --dry-run shows the array and the merge; --local runs every task and the
    merge, which gives the one-pass bytes."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "preprocess-slurm-array.sh"
    env = {
        **cli_env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "INPUT": str(corpus),
        "OUTPUT_PREFIX": str(tmp_path / "c"),
        "TOKENIZER": str(tok),
        "PARTITIONS": "3",
        "WORKERS": "1",
    }
    proc = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--array=0-2" in proc.stdout and "--partition-index $SLURM_ARRAY_TASK_ID" in proc.stdout
    assert "--dependency=afterok:" in proc.stdout and "cookbook merge" in proc.stdout
    proc = subprocess.run(["bash", str(script), "--local"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path / "c_text_document") == one_pass


def test_jobs_write_partitions_in_processes(tmp_path, corpus, tok, one_pass):
    s = run(
        PreprocessConfig(
            [str(corpus)], str(tmp_path / "c"), str(tok), append_eod=True, partitions=4, jobs=2, workers=2
        ),
        show_progress=False,
    )
    assert snapshot(s.outputs["text"]) == one_pass
    assert (s.partitions_done, s.documents) == (4, 600 + 2 + 80 + 120 + 90)


def test_merge_refuses_an_incomplete_parts_folder(tmp_path, corpus, tok):
    for i in (0, 2):
        run(
            PreprocessConfig([str(corpus)], str(tmp_path / "c"), str(tok), partitions=3, partition_index=i, workers=1),
            show_progress=False,
        )
    proc = run_cli("merge", "--input", parts_folder(tmp_path / "c_text_document"), "--output-prefix", tmp_path / "m")
    assert_one_line_error(proc, "lacks 1 of its 3 partitions", "00001-of-00003")
    assert not (tmp_path / "m.bin").exists()


def test_byte_ranges_cover_every_line_once(tmp_path):
    """Cut a file at random offsets: the ranges' lines, in order, are the file's lines, and each range's first line
    number (counted only when asked) is right; long lines, blank lines, CRLF and no final newline included."""
    from cookbook.data.jsonl import count_lines_before, read_lines

    rng = random.Random(5)
    lines = []
    for i in range(400):
        kind = rng.random()
        lines.append(b"" if kind < 0.1 else b"x" * rng.randint(1, 3000) + (b"\r" if kind > 0.9 else b""))
    data = b"\n".join(lines)  # no final newline
    f = tmp_path / "f.jsonl"
    f.write_bytes(data)
    whole = [line for _, block, _ in read_lines(f, 1 << 16) for line in block]
    assert whole == lines
    for trial in range(20):
        cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(rng.randint(1, 12)))})
        got = []
        for lo, hi in zip(cuts, cuts[1:]):
            part = [
                (n, line)
                for first, block, _ in read_lines(f, rng.choice([1 << 16, 100, 7]), lo, hi)
                for n, line in enumerate(block, first)
            ]
            if part:
                assert count_lines_before(f, lo) == len(got), (lo, hi)
            got += [line for _, line in part]
        assert got == lines, cuts
