"""``cookbook merge`` against megatron-core: what Megatron-LM's tools/merge_datasets.py writes
(``IndexedDatasetBuilder.add_index`` over the prefixes in ``sorted()`` order, then ``finalize``)
must be byte for byte what we write, for a folder and for a list of prefixes (in the given order).
Bad merges fail with one line, exit 2, and write nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_data import (
    assert_one_line_error,
    documents,
    files_under,
    make_texts,
    megatron_build,
    megatron_merge,
    preprocess,
    run_cli,
    snapshot,
    train_sp,
    write_jsonl,
)

pytest.importorskip("megatron.core.datasets.indexed_dataset")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return train_sp(tmp_path_factory.mktemp("merge_tok"), make_texts(60, seed=2), vocab_size=400)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok) -> Path:
    """A folder of uint16 datasets made by our preprocess and by megatron-core's builder, named so
    that sorted() order differs from creation order (upper case, digits)."""
    root = tmp_path_factory.mktemp("merge_data")
    src = root / "src"
    src.mkdir()
    data = root / "data"
    data.mkdir()
    preprocess([write_jsonl(src / "b.jsonl", make_texts(15, seed=30))], data / "b", tok, append_eod=True)
    preprocess([write_jsonl(src / "A.jsonl", make_texts(9, seed=31))], data / "A", tok)
    # SentencePieceTokenizer adds no BOS, so "" tokenizes to nothing: document indices repeat
    texts = make_texts(8, seed=32)
    texts[0:0] = [""]
    texts[4:4] = ["", ""]
    texts.append("")
    p = preprocess(
        [write_jsonl(src / "a10.jsonl", texts)],
        data / "a10",
        tok,
        tokenizer_type="SentencePieceTokenizer",
        append_eod=True,
    )
    assert documents(p)[0] == []  # "" made an empty document
    rng = np.random.default_rng(0)

    def seq(n):
        return rng.integers(0, 400, n).tolist()

    megatron_build(data / "m_multi", [[seq(5), seq(3)], [], [seq(7)], [], [], [seq(1), seq(2), seq(4)], []])
    megatron_build(data / "m_empty_only", [[], [], []])
    megatron_build(data / "Z_zero", [])  # no documents at all
    return data


def prefixes_in(folder: Path) -> list[str]:
    return sorted({str(folder / p.name[:-4]) for p in folder.iterdir() if p.suffix in (".bin", ".idx")})


def merge_cli(inputs, out_prefix, cwd=None):
    args = ["merge"]
    for i in inputs:
        args += ["--input", i]
    return run_cli(*args, "--output-prefix", out_prefix, cwd=cwd)


def assert_ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- byte-identical merges


def test_fixture_has_the_edge_cases(data_dir):
    names = [Path(p).name for p in prefixes_in(data_dir)]
    assert (
        names
        == sorted(names)
        == [
            "A_text_document",
            "Z_zero",
            "a10_text_document",
            "b_text_document",
            "m_empty_only",
            "m_multi",
        ]
    )
    from cookbook.data.indexed import IndexedDataset

    a10 = IndexedDataset(data_dir / "a10_text_document")
    assert len(np.unique(a10.document_indices)) < len(a10.document_indices)  # repeated indices
    multi = IndexedDataset(data_dir / "m_multi")
    assert len(multi) > multi.num_documents - 4  # documents with several sequences
    assert IndexedDataset(data_dir / "Z_zero").num_documents == 0


def test_merge_folder_matches_megatron(tmp_path, data_dir):
    ref = megatron_merge(prefixes_in(data_dir), tmp_path / "ref")
    proc = merge_cli([data_dir], tmp_path / "ours")
    assert_ok(proc)
    assert snapshot(tmp_path / "ours") == snapshot(ref)
    n_docs = sum(len(documents(p)) for p in prefixes_in(data_dir))
    assert f"{len(prefixes_in(data_dir))} datasets" in proc.stderr + proc.stdout
    assert f"{n_docs:,} documents" in proc.stderr + proc.stdout
    assert sorted(p.name for p in files_under(tmp_path)) == ["ours.bin", "ours.idx", "ref.bin", "ref.idx"]


def test_merge_folder_with_trailing_slash_and_relative_paths(tmp_path, data_dir):
    ref = megatron_merge(prefixes_in(data_dir), tmp_path / "ref")
    (tmp_path / "work").mkdir()
    proc = merge_cli([str(data_dir) + "/"], "out/merged", cwd=tmp_path / "work")
    assert_ok(proc)
    assert snapshot(tmp_path / "work" / "out" / "merged") == snapshot(ref)


def test_merge_list_keeps_the_given_order(tmp_path, data_dir):
    names = ["m_multi", "b_text_document", "Z_zero", "A_text_document", "m_empty_only", "a10_text_document", "m_multi"]
    prefixes = [str(data_dir / n) for n in names]
    ref = megatron_merge(prefixes, tmp_path / "ref")
    # repeated --input, one given by its .idx and one by its .bin path
    given = list(prefixes)
    given[1] += ".idx"
    given[3] += ".bin"
    assert_ok(merge_cli(given, tmp_path / "repeat"))
    assert snapshot(tmp_path / "repeat") == snapshot(ref)
    # comma-separated
    assert_ok(merge_cli([",".join(prefixes)], tmp_path / "comma"))
    assert snapshot(tmp_path / "comma") == snapshot(ref)
    # and not what the sorted order gives
    megatron_merge(sorted(prefixes), tmp_path / "sorted")
    assert snapshot(tmp_path / "sorted") != snapshot(ref)


def test_merged_documents_are_the_inputs_documents(tmp_path, data_dir):
    from recipes.merge import run

    order = list(reversed(prefixes_in(data_dir)))
    s = run(order, str(tmp_path / "m"))
    expected = [d for p in order for d in documents(p)]
    assert documents(tmp_path / "m") == expected
    assert s.documents == len(expected)
    assert s.tokens == sum(map(len, expected))
    assert s.dtype == "uint16"


def test_merge_of_one_dataset_is_a_copy(tmp_path, data_dir):
    for name in ("b_text_document", "a10_text_document", "Z_zero"):
        assert_ok(merge_cli([data_dir / name], tmp_path / name))
        assert snapshot(tmp_path / name) == snapshot(data_dir / name)


def test_merge_int32_datasets_matches_megatron(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "big"
    d.mkdir()
    for name in ("x", "y"):
        megatron_build(
            d / name,
            [[rng.integers(0, 200_000, 9).tolist()], [], [rng.integers(0, 200_000, 4).tolist()]],
            dtype=np.int32,
        )
    ref = megatron_merge(prefixes_in(d), tmp_path / "ref")
    assert_ok(merge_cli([d], tmp_path / "ours"))
    assert snapshot(tmp_path / "ours") == snapshot(ref)


def test_output_inside_the_input_folder(tmp_path, data_dir):
    """The README's example: cookbook merge --input data/ --output-prefix data/all."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    ref = megatron_merge(prefixes_in(data_dir), tmp_path / "ref")
    assert_ok(merge_cli([data], data / "all"))
    assert snapshot(data / "all") == snapshot(ref)
    assert not [p for p in data.iterdir() if "tmp" in p.name]
    # a second run leaves its own output out of the folder's datasets: the same output again (a tour run twice)
    assert_ok(merge_cli([data], data / "all"))
    assert snapshot(data / "all") == snapshot(ref)
    # named as an input, the output is refused, and kept
    proc = merge_cli([*prefixes_in(data_dir), data / "all"], data / "all")
    assert_one_line_error(proc, "all")
    assert snapshot(data / "all") == snapshot(ref)


# --------------------------------------------------------------------------- failures


@pytest.fixture
def mixed_dtypes(tmp_path, data_dir) -> Path:
    d = tmp_path / "mixed"
    d.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(f"{data_dir / 'b_text_document'}{ext}", d / f"a_uint16{ext}")
    megatron_build(d / "b_int32", [[[1, 2, 3]], [[70_000, 5]]], dtype=np.int32)
    return d


def test_mismatched_dtypes_folder(tmp_path, mixed_dtypes):
    out = tmp_path / "out"
    proc = merge_cli([mixed_dtypes], out / "all")
    assert_one_line_error(proc, "b_int32", "int32", "uint16")
    assert files_under(out) == []
    assert len(files_under(mixed_dtypes)) == 4


def test_mismatched_dtypes_list_keeps_an_earlier_output(tmp_path, mixed_dtypes, data_dir):
    out = tmp_path / "out"
    assert_ok(merge_cli([data_dir / "A_text_document"], out / "all"))
    before, listing = snapshot(out / "all"), files_under(out)
    proc = merge_cli([mixed_dtypes / "b_int32", mixed_dtypes / "a_uint16"], out / "all")
    assert_one_line_error(proc, "int32", "uint16")
    assert snapshot(out / "all") == before
    assert files_under(out) == listing


@pytest.mark.parametrize("missing", [".idx", ".bin"])
def test_half_a_dataset_in_the_folder(tmp_path, data_dir, missing):
    d = tmp_path / "half"
    shutil.copytree(data_dir, d)
    (d / f"m_multi{missing}").unlink()
    out = tmp_path / "out"
    proc = merge_cli([d], out / "all")
    assert_one_line_error(proc, "m_multi", missing)
    assert files_under(out) == []


def test_output_prefix_is_an_input(tmp_path, data_dir):
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    before = snapshot(d / "b_text_document")
    listing = files_under(d)
    for out in (d / "b_text_document", f"{d}/../d/b_text_document"):
        proc = merge_cli([d / "A_text_document", d / "b_text_document"], out)
        assert_one_line_error(proc, "b_text_document", "--output-prefix")
        assert snapshot(d / "b_text_document") == before
        assert files_under(d) == listing
    # the same, spelled relative to the working directory
    proc = merge_cli(["A_text_document", "b_text_document"], "b_text_document", cwd=d)
    assert_one_line_error(proc, "b_text_document")
    assert snapshot(d / "b_text_document") == before


def _corrupt_magic(d: Path):
    p = d / "A_text_document.idx"
    p.write_bytes(b"NOTMAGIC!" + p.read_bytes()[9:])
    return "A_text_document.idx"


def _truncated_bin(d: Path):
    p = d / "b_text_document.bin"
    p.write_bytes(p.read_bytes()[:-2])
    return "b_text_document.bin"


def _truncated_idx(d: Path):
    p = d / "m_multi.idx"
    p.write_bytes(p.read_bytes()[:40])
    return "m_multi.idx"


@pytest.mark.parametrize(
    "corrupt", [_corrupt_magic, _truncated_bin, _truncated_idx], ids=["bad-magic", "short-bin", "short-idx"]
)
def test_corrupt_input(tmp_path, data_dir, corrupt):
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    name = corrupt(d)
    out = tmp_path / "out"
    assert_one_line_error(merge_cli([d], out / "all"), name)
    assert files_under(out) == []


def test_missing_prefix_and_empty_folder(tmp_path, data_dir):
    out = tmp_path / "out"
    assert_one_line_error(merge_cli([data_dir / "A_text_document", tmp_path / "nope"], out / "all"), "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no datasets here")
    assert_one_line_error(merge_cli([empty], out / "all"), "empty")
    assert files_under(out) == []
