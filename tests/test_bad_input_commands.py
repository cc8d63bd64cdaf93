"""Bad input across every command: each case is a real ``python -m cookbook`` run that must end with one line
``error: ...`` (exit 2, no traceback) naming what is wrong, leave nothing at its output path and nothing stray in a
folder it refused, and leave its inputs untouched. The table walks issue 15's list (damaged checkpoints, unwritable
outputs, malformed Hugging Face folders, numbers) and sweeps every command for the same classes: non-finite or
negative numbers, files where folders belong and the reverse, read-only places, and damaged files of every format
cookbook reads (idx/bin, safetensors, DCP, Megatron .pt, TOML, jsonl, tokenizer files). ``preprocess``'s own cases
live in tests/test_bad_input.py. ``python tests/test_bad_input_commands.py`` prints the count per command
(docs/errors.md holds it; a test keeps the two equal).

Interrupts (Ctrl-C, SIGTERM, during a checkpoint save) are at the end: exit 130 and one line saying what was kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import stdlib_texts
from helpers_data import assert_one_line_error, cli_env, files_under, run_cli, write_jsonl
from helpers_train import CPU_RUN, SMALL, check

TRAIN = [*CPU_RUN, "--split", "100,0,0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, sp_model) -> dict:
    """The good inputs every case starts from: a run with two saves, its Hugging Face and Megatron conversions, an
    indexed dataset, jsonl, the tokenizer."""
    root = tmp_path_factory.mktemp("world")
    corpus = write_jsonl(root / "corpus.jsonl", stdlib_texts(16, offset=1000))
    check(
        run_cli(
            "preprocess",
            "--input",
            corpus,
            "--output-prefix",
            root / "data" / "corpus",
            "--tokenizer-model",
            sp_model,
            "--append-eod",
        )
    )
    data = root / "data" / "corpus_text_document"
    run = root / "run"
    check(
        run_cli(
            "pretrain",
            *SMALL,
            *TRAIN,
            "--data-path",
            data,
            "--tokenizer-model",
            sp_model,
            "--train-iters",
            "2",
            "--save-interval",
            "1",
            "--keep-last",
            "0",
            "--save",
            run,
            timeout=300,
        )
    )
    check(run_cli("convert", "--from", "cookbook", "--to", "hf", "--load-dir", run, "--save-dir", root / "hf"))
    check(
        run_cli("convert", "--from", "cookbook", "--to", "megatron", "--load-dir", run, "--save-dir", root / "megatron")
    )
    return {
        "root": root,
        "run": run,
        "data": data,
        "jsonl": corpus,
        "tokenizer": Path(sp_model),
        "hf": root / "hf",
        "megatron": root / "megatron",
    }


def copy(src: Path, d: Path, name: str | None = None) -> Path:
    dst = d / (name or src.name)
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return dst


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def scramble(step: Path) -> Path:
    """The same length, garbage at the start of a weight's bytes: what a bad disk or a broken copy leaves. (Garbage
    deeper inside a tensor's raw bytes reads back as other numbers: DCP keeps no checksums; docs/errors.md says so.)"""
    import torch.distributed.checkpoint as dcp

    storage = dcp.FileSystemReader(str(step)).read_metadata().storage_data
    info = next(info for index, info in storage.items() if index.fqn == "model.tok_embeddings.weight")
    path = step / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset : info.offset + 64] = bytes((i * 37 + 11) % 256 for i in range(64))
    path.write_bytes(bytes(data))
    return path


def unwritable_dir() -> Path | None:
    """A folder the system refuses to write in, whoever we are (root ignores permissions); None if there is none."""
    for candidate in (Path("/sys/kernel"), Path("/proc/self")):
        try:
            (candidate / "cookbook-probe").mkdir()
        except OSError:
            return candidate
        (candidate / "cookbook-probe").rmdir()
    return None


def last_step(run: Path) -> Path:
    return sorted(run.glob("step_*"))[-1]


# --------------------------------------------------------------------------- the table
# name -> (command, make(d, world) -> (args, words the message must hold)). Outputs go under d/"out".


def _ckpt_case(command_args, damage, words):
    def make(d, w):
        run = copy(w["run"], d)
        damage(last_step(run))
        return command_args(run, d, w), words

    return make


def _eval(run, d, w):
    return ["eval", "--load", run, "--data-path", w["data"], "--seq-length", "32", "--device", "cpu"]


def _generate(run, d, w):
    return [
        "generate",
        "--load",
        run,
        "--prompt",
        "x",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
        "-o",
        d / "out" / "g.jsonl",
    ]


def _convert(run, d, w):
    return ["convert", "--from", "cookbook", "--to", "hf", "--load-dir", run, "--save-dir", d / "out" / "hf"]


def _prune(run, d, w):
    return [
        "prune",
        "--load",
        run,
        "--hidden-size-remain",
        "48",
        "--importance",
        "magnitude",
        "--save",
        d / "out" / "p",
    ]


def _distcp(step: Path) -> Path:
    return next(step.glob("*.distcp"))


DAMAGE = {
    "truncated-distcp": (
        lambda s: truncate(_distcp(s)),
        ["__0_0.distcp", "truncated", "step_000001 is intact", "--load"],
    ),
    "scrambled-distcp": (scramble, ["__0_0.distcp", "corrupt", "tok_embeddings", "step_000001 is intact"]),
    "truncated-metadata": (
        lambda s: truncate(s / ".metadata", 0.2),
        [".metadata", "unreadable", "step_000001 is intact"],
    ),
    "missing-distcp": (lambda s: _distcp(s).unlink(), ["__0_0.distcp", "missing"]),
}
COMMANDS = {"eval": _eval, "generate": _generate, "convert": _convert, "prune": _prune}


def _resume_damaged(d, w):
    run = copy(w["run"], d)
    truncate(_distcp(last_step(run)))
    return ["pretrain", *TRAIN, "--data-path", w["data"], "--train-iters", "3", "--load", run, "--save", run], [
        "truncated",
        "step_000001 is intact",
        "latest",
    ]


def _resume_bad_train_state(d, w):
    run = copy(w["run"], d)
    (last_step(run) / "train_state.json").write_text('{"step": 2, "consum')
    return ["pretrain", *TRAIN, "--data-path", w["data"], "--train-iters", "3", "--load", run, "--save", run], [
        "train_state.json",
        "unreadable",
    ]


def _bad_config_toml(d, w):
    run = copy(w["run"], d)
    (last_step(run) / "config.toml").write_text("[model\nnum_layers = 2\n")
    return _generate(run, d, w), ["config.toml", "not valid TOML"]


def _hf_case(edit, words):
    def make(d, w):
        hf = copy(w["hf"], d)
        edit(hf)
        return ["convert", "--from", "hf", "--to", "cookbook", "--load-dir", hf, "--save-dir", d / "out" / "c"], words

    return make


def _generate_hf(edit, words):
    def make(d, w):
        hf = copy(w["hf"], d)
        edit(hf)
        return ["generate", "--load", hf, "--prompt", "x", "-o", d / "out" / "g.jsonl"], words

    return make


def _edit_config(**changes):
    def edit(hf):
        conf = json.loads((hf / "config.json").read_text())
        conf.update(changes)
        (hf / "config.json").write_text(json.dumps(conf))

    return edit


def _megatron_case(edit, words):
    def make(d, w):
        meg = copy(w["megatron"], d)
        edit(next(meg.rglob("model_optim_rng.pt")))
        return ["convert", "--from", "megatron", "--to", "hf", "--load-dir", meg, "--save-dir", d / "out" / "h"], words

    return make


def _dataset_case(edit, command, words):
    def make(d, w):
        for suffix in (".bin", ".idx"):
            shutil.copyfile(f"{w['data']}{suffix}", d / f"corpus{suffix}")
        edit(d / "corpus")
        prefix = d / "corpus"
        args = {
            "eval": ["eval", "--load", w["run"], "--data-path", prefix, "--device", "cpu"],
            "merge": ["merge", "--input", prefix, "--output-prefix", d / "out" / "m"],
            "data info": ["data", "info", prefix],
            "pretrain": [
                "pretrain",
                *SMALL,
                *TRAIN,
                "--data-path",
                prefix,
                "--train-iters",
                "1",
                "--save",
                d / "out" / "r",
            ],
        }[command]
        return args, words

    return make


def _tokenizer_case(command, content: bytes, words):
    def make(d, w):
        bad = d / "bad.model"
        bad.write_bytes(content)
        args = {
            "generate": [
                "generate",
                "--load",
                w["run"],
                "--prompt",
                "x",
                "--tokenizer-model",
                bad,
                "-o",
                d / "out" / "g.jsonl",
            ],
            "pretrain": [
                "pretrain",
                *SMALL,
                *TRAIN,
                "--data-path",
                w["data"],
                "--tokenizer-model",
                bad,
                "--save",
                d / "out" / "r",
            ],
            "eval": ["eval", "--load", w["run"], "--ppl-files", w["jsonl"], "--tokenizer-model", bad],
        }[command]
        return args, words

    return make


def _plain(args_of_world, words):
    """``words``: a list, or a function of (d, w) for words that name the case's own folder."""

    def make(d, w):
        return args_of_world(d, w), (words(d, w) if callable(words) else words)

    return make


def _unwritable(args_of, flag):
    def make(d, w):
        place = unwritable_dir()
        if place is None:
            pytest.skip("no folder here refuses writing")
        return args_of(place / "cookbook" / "out", w), [flag, "cannot write"]

    return make


def _a_file(d: Path) -> Path:
    f = d / "a_file"
    f.write_text("x")
    return f


CASES = {
    # --- 2. damaged checkpoints, by file, with the intact earlier save
    **{
        f"{command}-{damage}": (command, _ckpt_case(args, DAMAGE[damage][0], DAMAGE[damage][1]))
        for command, args in COMMANDS.items()
        for damage in DAMAGE
        if not (command == "eval" and damage != "truncated-distcp")
    },
    "pretrain-resume-truncated-distcp": ("pretrain", _resume_damaged),
    "pretrain-resume-train-state": ("pretrain", _resume_bad_train_state),
    "generate-bad-config-toml": ("generate", _bad_config_toml),
    # --- 3. outputs the system cannot write, or that name a folder where a file goes (and the reverse)
    "preprocess-prefix-under-a-file": (
        "preprocess",
        _plain(
            lambda d, w: [
                "preprocess",
                "--input",
                w["jsonl"],
                "--output-prefix",
                _a_file(d) / "x",
                "--tokenizer-model",
                w["tokenizer"],
            ],
            ["--output-prefix", "a_file"],
        ),
    ),
    "preprocess-read-only": (
        "preprocess",
        _unwritable(
            lambda p, w: [
                "preprocess",
                "--input",
                w["jsonl"],
                "--output-prefix",
                p,
                "--tokenizer-model",
                w["tokenizer"],
            ],
            "--output-prefix",
        ),
    ),
    "merge-read-only": (
        "merge",
        _unwritable(lambda p, w: ["merge", "--input", w["data"], "--output-prefix", p], "--output-prefix"),
    ),
    "merge-prefix-under-a-file": (
        "merge",
        _plain(
            lambda d, w: ["merge", "--input", w["data"], "--output-prefix", _a_file(d) / "x"],
            ["--output-prefix", "a_file"],
        ),
    ),
    "generate-output-is-a-folder": (
        "generate",
        _plain(
            lambda d, w: ["generate", "--load", w["run"], "--prompt", "x", "--max-new-tokens", "2", "-o", d],
            ["--output", "folder"],
        ),
    ),
    "eval-dump-dir-is-a-file": (
        "eval",
        _plain(
            lambda d, w: ["eval", "--load", w["run"], "--ppl-files", w["jsonl"], "--dump-dir", _a_file(d)],
            ["--dump-dir", "a_file"],
        ),
    ),
    "convert-save-dir-under-a-file": (
        "convert",
        _plain(
            lambda d, w: [
                "convert",
                "--from",
                "cookbook",
                "--to",
                "hf",
                "--load-dir",
                w["run"],
                "--save-dir",
                _a_file(d) / "x",
            ],
            ["--save-dir", "a_file"],
        ),
    ),
    "convert-read-only": (
        "convert",
        _unwritable(
            lambda p, w: ["convert", "--from", "cookbook", "--to", "hf", "--load-dir", w["run"], "--save-dir", p],
            "--save-dir",
        ),
    ),
    "pretrain-save-is-a-file": (
        "pretrain",
        _plain(
            lambda d, w: ["pretrain", *SMALL, *TRAIN, "--data-path", w["data"], "--save", _a_file(d)],
            ["--save", "a_file"],
        ),
    ),
    "pretrain-read-only": (
        "pretrain",
        _unwritable(lambda p, w: ["pretrain", *SMALL, *TRAIN, "--data-path", w["data"], "--save", p], "--save"),
    ),
    "plot-output-under-a-file": (
        "plot",
        _plain(lambda d, w: ["plot", w["run"], "-o", _a_file(d) / "loss.png"], ["--output", "a_file"]),
    ),
    "tokenizer-train-output-under-a-file": (
        "tokenizer train",
        _plain(
            lambda d, w: ["tokenizer", "train", "--input", w["jsonl"], "--output", _a_file(d) / "tok.model"],
            ["--output", "a_file"],
        ),
    ),
    "sample-corpus-output-is-a-folder": ("sample-corpus", _plain(lambda d, w: ["sample-corpus", d], ["folder"])),
    # inputs of the wrong kind
    "generate-load-is-a-file": (
        "generate",
        _plain(lambda d, w: ["generate", "--load", w["jsonl"], "--prompt", "x"], ["corpus.jsonl"]),
    ),
    "eval-ppl-files-is-a-folder": (
        "eval",
        _plain(lambda d, w: ["eval", "--load", w["run"], "--ppl-files", d], lambda d, w: [str(d)]),
    ),
    "convert-load-dir-is-a-file": (
        "convert",
        _plain(
            lambda d, w: [
                "convert",
                "--from",
                "hf",
                "--to",
                "cookbook",
                "--load-dir",
                w["jsonl"],
                "--save-dir",
                d / "out" / "c",
            ],
            ["corpus.jsonl"],
        ),
    ),
    "pretrain-data-path-is-a-folder": (
        "pretrain",
        _plain(
            lambda d, w: ["pretrain", *SMALL, *TRAIN, "--data-path", d, "--save", d / "out" / "r"],
            lambda d, w: [str(d)],
        ),
    ),
    # --- 4. malformed Hugging Face folders
    "hf-config-heads-a-string": (
        "convert",
        _hf_case(_edit_config(num_attention_heads="four"), ["num_attention_heads", "'four'"]),
    ),
    "hf-config-an-array": (
        "convert",
        _hf_case(lambda hf: (hf / "config.json").write_text("[1, 2]"), ["config.json", "list"]),
    ),
    "hf-config-not-json": (
        "convert",
        _hf_case(lambda hf: (hf / "config.json").write_text("{oops"), ["config.json", "JSON"]),
    ),
    "hf-config-nan-theta": ("convert", _hf_case(_edit_config(rope_theta=float("nan")), ["rope_theta", "finite"])),
    "hf-config-rope-scaling-a-number": ("convert", _hf_case(_edit_config(rope_scaling=2), ["rope_scaling"])),
    "hf-safetensors-random-bytes": (
        "convert",
        _hf_case(
            lambda hf: (hf / "model.safetensors").write_bytes(bytes(range(256)) * 64),
            ["model.safetensors", "safetensors"],
        ),
    ),
    "hf-safetensors-truncated": (
        "convert",
        _hf_case(lambda hf: truncate(hf / "model.safetensors"), ["model.safetensors", "truncated"]),
    ),
    "generate-hf-heads-a-string": (
        "generate",
        _generate_hf(_edit_config(num_attention_heads="four"), ["num_attention_heads"]),
    ),
    # --- damaged files of the other formats
    "megatron-pt-truncated": ("convert", _megatron_case(truncate, ["model_optim_rng.pt"])),
    "megatron-pt-random-bytes": (
        "convert",
        _megatron_case(lambda p: p.write_bytes(os.urandom(4096)), ["model_optim_rng.pt"]),
    ),
    "eval-truncated-bin": ("eval", _dataset_case(lambda p: truncate(Path(f"{p}.bin")), "eval", ["corpus.bin"])),
    "merge-truncated-idx": ("merge", _dataset_case(lambda p: truncate(Path(f"{p}.idx")), "merge", ["corpus.idx"])),
    "data-info-garbage-idx": (
        "data info",
        _dataset_case(lambda p: Path(f"{p}.idx").write_bytes(b"not an index" * 10), "data info", ["corpus.idx"]),
    ),
    "pretrain-truncated-bin": (
        "pretrain",
        _dataset_case(lambda p: truncate(Path(f"{p}.bin")), "pretrain", ["corpus.bin"]),
    ),
    "pretrain-config-not-toml": (
        "pretrain",
        _plain(
            lambda d, w: ["pretrain", "--config", (d / "run.toml", (d / "run.toml").write_text("[training\n"))[0]],
            ["run.toml", "TOML"],
        ),
    ),
    "pretrain-config-nan": (
        "pretrain",
        _plain(
            lambda d, w: [
                "pretrain",
                "--config",
                (d / "run.toml", (d / "run.toml").write_text("[optimizer]\nlr = nan\n"))[0],
            ],
            ["lr", "finite"],
        ),
    ),
    "pretrain-config-wrong-type": (
        "pretrain",
        _plain(
            lambda d, w: [
                "pretrain",
                "--config",
                (d / "run.toml", (d / "run.toml").write_text('[model]\nnum_layers = "two"\n'))[0],
            ],
            ["num_layers", "'two'"],
        ),
    ),
    "generate-tokenizer-garbage": ("generate", _tokenizer_case("generate", b"\x00\x01garbage" * 50, ["bad.model"])),
    "pretrain-tokenizer-garbage": ("pretrain", _tokenizer_case("pretrain", b"\x00\x01garbage" * 50, ["bad.model"])),
    "eval-tokenizer-empty": ("eval", _tokenizer_case("eval", b"", ["bad.model"])),
    "eval-jsonl-bad-line": (
        "eval",
        _plain(
            lambda d, w: [
                "eval",
                "--load",
                w["run"],
                "--ppl-files",
                (d / "x.jsonl", (d / "x.jsonl").write_text('{"text": "a"}\n{oops\n'))[0],
            ],
            ["x.jsonl:2", "fix it"],
        ),
    ),
    # --- 5. numbers: NaN, infinity, sign (every numeric flag is swept in test_every_numeric_flag_refuses_nan)
    "pretrain-negative-lr": (
        "pretrain",
        _plain(
            lambda d, w: [
                "pretrain",
                *SMALL,
                *TRAIN,
                "--data-path",
                w["data"],
                "--lr",
                "-1e-3",
                "--save",
                d / "out" / "r",
            ],
            ["--lr", "-0.001"],
        ),
    ),
    "pretrain-beta2-one": (
        "pretrain",
        _plain(
            lambda d, w: [
                "pretrain",
                *SMALL,
                *TRAIN,
                "--data-path",
                w["data"],
                "--adam-beta2",
                "1",
                "--save",
                d / "out" / "r",
            ],
            ["--adam-beta2"],
        ),
    ),
    "generate-temperature-nan": (
        "generate",
        _plain(
            lambda d, w: ["generate", "--load", w["run"], "--prompt", "x", "--temperature", "nan"],
            ["--temperature", "finite"],
        ),
    ),
    "generate-temperature-inf": (
        "generate",
        _plain(
            lambda d, w: ["generate", "--load", w["run"], "--prompt", "x", "--temperature", "inf"],
            ["--temperature", "finite"],
        ),
    ),
    "extend-factor-negative": (
        "extend",
        _plain(
            lambda d, w: ["extend", "--load", w["run"], "--interp-factor", "-2", "--save", d / "out" / "e"],
            ["--interp-factor"],
        ),
    ),
    "distill-generate-top-p-nan": (
        "distill generate",
        _plain(
            lambda d, w: [
                "distill",
                "generate",
                "--teacher",
                w["run"],
                "--prompts-from",
                w["jsonl"],
                "--top-p",
                "nan",
                "--output",
                d / "out" / "s",
            ],
            ["--top-p", "finite"],
        ),
    ),
    "serve-port-negative": ("serve", _plain(lambda d, w: ["serve", "--load", w["run"], "--port", "-1"], ["--port"])),
    "plan-negative-gpus": (
        "plan",
        _plain(lambda d, w: ["plan", "--preset", "tiny", "--num-gpus", "-8"], ["--num-gpus"]),
    ),
    # --- 8, 9. lengths and vocabularies, checked before any work
    "pretrain-seq-beyond-context": (
        "pretrain",
        _plain(
            lambda d, w: [
                "pretrain",
                *SMALL,
                "--data-path",
                w["data"],
                "--seq-length",
                "128",
                "--save",
                d / "out" / "r",
            ],
            ["--seq-length 128", "--max-position-embeddings 64", "cookbook extend"],
        ),
    ),
    "pretrain-vocab-below-tokenizer": (
        "pretrain",
        _plain(
            lambda d, w: [
                "pretrain",
                *SMALL,
                *TRAIN,
                "--data-path",
                w["data"],
                "--tokenizer-model",
                w["tokenizer"],
                "--vocab-size",
                "96",
                "--save",
                d / "out" / "r",
            ],
            ["--vocab-size 96", "tokenizer"],
        ),
    ),
}


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory) -> dict:
    """case -> (process, its folder); every run at once, the world's files hashed before and after."""
    root = tmp_path_factory.mktemp("bad_runs")
    before = _hashes(world["root"])
    specs = {}
    for name, (_, make) in CASES.items():
        d = root / name
        d.mkdir()
        try:
            specs[name] = (make(d, world), d)
        except pytest.skip.Exception as e:
            specs[name] = (e, d)
    todo = {name: spec for name, spec in specs.items() if not isinstance(spec[0], BaseException)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run, args, d) for name, ((args, _), d) in todo.items()}
    done = {name: (futures[name].result(), d, words) for name, ((_, words), d) in todo.items()}
    skipped = {name: spec for name, spec in specs.items() if name not in done}
    return {"done": done, "skipped": skipped, "untouched": _hashes(world["root"]) == before}


def _run(args, d: Path) -> subprocess.CompletedProcess:
    """A bad input must fail fast: a run still going after a minute did work it should have refused up front."""
    try:
        return run_cli(*args, cwd=d, timeout=120)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -9, "", f"timed out: {e.cmd}")


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files_under(folder)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(runs, case):
    if case in runs["skipped"]:
        pytest.skip(str(runs["skipped"][case][0]))
    proc, d, words = runs["done"][case]
    assert_one_line_error(proc, *words)
    assert files_under(d / "out") == [], "a failed run left files behind"
    stray = [p.name for p in d.rglob("*") if re.search(r"\.tmp|\.lock|probe", p.name)]
    assert not stray, f"stray files: {stray}"


def test_the_inputs_are_untouched(runs):
    assert runs["untouched"], "a failing run changed the files it read"


def test_every_numeric_flag_refuses_nan_infinity_and_sign():
    """Every int and float flag of every command goes through one check before the command runs."""
    from cookbook import cli
    from cookbook.errors import CookbookError

    def commands(group, prefix=""):
        for info in group.registered_commands:
            yield prefix + (info.name or info.callback.__name__), info.callback
        for sub in group.registered_groups:
            yield from commands(sub.typer_instance, prefix + sub.name + " ")

    seen = 0
    for name, callback in commands(cli.app):
        for param, flag in cli.numeric_flags(callback).items():
            for value in (
                (float("nan"), float("inf"), -1) if flag not in cli.SIGNED_FLAGS else (float("nan"), float("-inf"))
            ):
                with pytest.raises(CookbookError, match=re.escape(flag)):
                    callback(**{param: value})
            seen += 1
    assert seen > 100  # every command's numbers, the training flags of the four training commands among them


def count_per_command() -> dict[str, int]:
    return dict(sorted(Counter(command for command, _ in CASES.values()).items()))


def test_docs_give_the_count_per_command():
    docs = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    for command, n in count_per_command().items():
        assert re.search(rf"^\| `cookbook {command}` \| {n} \|", docs, re.M), f"docs/errors.md: {command} {n}"


# --------------------------------------------------------------------------- interrupts


def _start(args, cwd=None) -> subprocess.Popen:
    """A command whose Ctrl-C works as a user's does (a test run in the background starts with SIGINT ignored)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cookbook", *map(str, args)],
        cwd=cwd,
        env=cli_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    assert path.exists(), proc.communicate()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_during_a_save_finishes_the_save_then_says_what_was_kept(world, tmp_path, sig):
    """Ctrl-C as the second save is being written: the save completes, exit 130 (Ctrl-C) or a clean stop (SIGTERM,
    the preemption signal: the run saves and stops), one line, and the same command continues from it."""
    run = tmp_path / "run"
    args = [
        "pretrain",
        *SMALL,
        *TRAIN,
        "--data-path",
        world["data"],
        "--train-iters",
        "400",
        "--save-interval",
        "3",
        "--load",
        run,
        "--save",
        run,
    ]
    proc = _start(args)
    _wait_for(run / ".step_000006.tmp", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert (run / "step_000006" / ".metadata").is_file() and (run / "latest").read_text().strip() >= "step_000006"
    last = err.strip().splitlines()[-1]
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert re.fullmatch(
            r"interrupted: after step 6; the last save is .*step_000006; run the same command to continue", last
        ), last
    else:  # the preemption signal: the loop saves the step it is in and stops
        assert proc.returncode == 0, err
        step = int(re.fullmatch(r"SIGTERM: stopped after step (\d+); resume with --load .*", last).group(1))
        assert step >= 6 and (run / f"step_{step:06d}" / ".metadata").is_file()
    check(run_cli(*[a if a != "400" else "8" for a in args], timeout=300))  # the same command continues


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_command_says_nothing_was_written(world, tmp_path, sig):
    """Wherever the interrupt lands (the CLI importing, torch importing numpy, the conversion writing), the command
    ends with one line and exit code 130, leaving nothing; or it had finished."""
    for delay in (0.2, 0.5, 0.8, 1.2, 2.0):
        out = tmp_path / f"hf_{delay}"
        args = ["convert", "--from", "cookbook", "--to", "hf", "--load-dir", world["run"], "--save-dir", out]
        proc = _start(args)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0 or (proc.returncode == -sig and not err and out.is_dir()):
            continue  # finished before the signal, or as it exited
        if proc.returncode == -sig and not err:
            continue  # the signal came before Python had started
        assert proc.returncode == 130 and "Traceback" not in err, (delay, proc.returncode, err)
        assert err.strip().splitlines() == ["interrupted: nothing written"], (delay, err)
        assert not out.exists() and not list(tmp_path.glob(f".hf_{delay}*")), delay


def test_debug_works_after_the_command_too(world):
    proc = run_cli("generate", "--load", world["jsonl"], "--prompt", "x", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "error:" in proc.stderr


def test_a_pretrain_that_fails_its_checks_leaves_no_run_folder(world, tmp_path):
    """The data hold ids beyond --vocab-size (no tokenizer given to check it up front): the run fails before its
    first step and leaves no folder (no empty metrics.jsonl)."""
    save = tmp_path / "never"
    proc = run_cli(
        "pretrain",
        *SMALL,
        *TRAIN,
        "--data-path",
        world["data"],
        "--vocab-size",
        "64",
        "--train-iters",
        "2",
        "--save",
        save,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "token id" in proc.stderr
    assert not save.exists()


if __name__ == "__main__":
    print("| command | bad inputs tried |\n|---|---|")
    for command, n in count_per_command().items():
        print(f"| `cookbook {command}` | {n} |")
