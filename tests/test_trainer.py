"""The Trainer through ``cookbook pretrain`` in real processes: data-parallel equality, exact resume
after SIGKILL, SIGTERM, a non-finite loss, --finetune, checkpoints and metrics."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
from helpers_data import assert_one_line_error
from helpers_train import check, losses, pretrain, start, train_flags, wait_for_step, write_token_dataset

from cookbook.engine.checkpoint import find_checkpoint, read_train_state
from cookbook.engine.config import OptimizerConfig
from cookbook.engine.metrics import read_metrics
from cookbook.engine.optim import LRSchedule

ITERS = 60  # the resume tests' run length


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_token_dataset(folder / "tokens")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """An uninterrupted run that saves every 10 iterations."""
    save = tmp_path_factory.mktemp("reference")
    check(pretrain(train_flags(data, save, ITERS, save_interval=10, global_batch_size=4)))
    return save


def test_loss_falls_and_metrics_are_complete(reference):
    records = read_metrics(reference / "metrics.jsonl")
    train = [r for r in records if r.get("split", "train") == "train"]
    assert [r["step"] for r in train] == list(range(1, ITERS + 1))
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, (train[0]["loss"], train[-1]["loss"])
    first = train[0]
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops", "tflops_megatron", "memory_gib", "consumed_samples"):
        assert first[key] is not None and first[key] >= 0, key
    assert first["mfu"] is None  # no peak for a CPU
    assert train[-1]["consumed_samples"] == ITERS * 4


def test_logged_lr_follows_megatron_schedule(reference):
    schedule = LRSchedule(OptimizerConfig(lr=3e-3, min_lr=3e-4, lr_warmup_iters=2), ITERS, 4)
    for r in read_metrics(reference / "metrics.jsonl"):
        assert r["lr"] == schedule(r["step"] - 1)


def test_checkpoints_keep_last_and_latest(reference):
    saves = sorted(p.name for p in reference.iterdir() if p.name.startswith("step_"))
    assert saves == ["step_000040", "step_000050", "step_000060"]  # keep-last 3
    assert (reference / "latest").read_text().strip() == "step_000060"
    state = read_train_state(find_checkpoint(reference))
    assert state["step"] == ITERS and state["consumed_samples"] == ITERS * 4
    assert not list(reference.glob(".*tmp*"))
    assert "[model]" in (reference / "step_000060" / "config.toml").read_text()


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, data, reference):
    save = tmp_path / "run"
    flags = train_flags(data, save, ITERS, save_interval=10, global_batch_size=4)
    proc = start(flags)
    try:
        killed_at = wait_for_step(proc, save / "metrics.jsonl", 23)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert killed_at < ITERS, "the run finished before it could be killed"
    assert find_checkpoint(save) is not None
    check(pretrain(flags + ["--load", str(save)]))
    assert losses(save) == losses(reference)  # bitwise: == on the floats


def test_sigterm_saves_and_exits_cleanly(tmp_path, data, reference):
    save = tmp_path / "run"
    flags = train_flags(data, save, ITERS, save_interval=0, global_batch_size=4)
    proc = start(flags)
    try:
        wait_for_step(proc, save / "metrics.jsonl", 7)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "SIGTERM" in output and "Traceback" not in output
    stopped = read_train_state(find_checkpoint(save))["step"]
    assert 7 <= stopped < ITERS
    assert max(losses(save)) == stopped
    check(pretrain(flags + ["--load", str(save)]))
    assert losses(save) == losses(reference)


def test_nonfinite_loss_stops_with_the_last_checkpoint_intact(tmp_path, data):
    save = tmp_path / "run"
    proc = pretrain(train_flags(data, save, 20, save_interval=1, lr=1e30, lr_warmup_iters=0, clip_grad=0))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: training diverged at iteration "), err
    bad = int(err.split("at iteration ")[1].split(":")[0])
    ckpt = find_checkpoint(save)
    assert ckpt is not None and read_train_state(ckpt)["step"] == bad - 1
    assert not list(save.glob(".*tmp*"))


def test_two_processes_equal_one(tmp_path, data):
    """FSDP2 over 2 gloo processes (micro 2 each) vs 1 process accumulating 2 micro batches of 2."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = dict(global_batch_size=4, eval_interval=5, eval_iters=2)
    check(pretrain(train_flags(data, one, 20, **flags)))
    check(pretrain(train_flags(data, two, 20, **flags), nproc=2))
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [(r.get("split"), r["step"]) for r in a] == [(r.get("split"), r["step"]) for r in b]
    assert sum(r.get("split") == "valid" for r in a) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x, y)
        if "grad_norm" in x:
            assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-4), (x, y)
    # the 2-process save resumes in 1 process (DCP reshards by name) and continues as the 1-process run does
    check(pretrain(train_flags(data, one, 24, load=one, **flags)))
    check(pretrain(train_flags(data, two, 24, load=two, **flags)))
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    for step in range(21, 25):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def test_finetune_starts_a_new_run_from_the_weights(tmp_path, data, reference):
    save = tmp_path / "ft"
    check(pretrain(train_flags(data, save, 5, load=reference) + ["--finetune"]))
    state = read_train_state(find_checkpoint(save))
    assert state["step"] == 5 and state["consumed_samples"] == 5 * 2
    first = losses(save)[1]
    assert first < losses(reference)[1] - 1.0  # it starts from trained weights


def test_load_refuses_another_shape(tmp_path, data, reference):
    proc = pretrain(train_flags(data, tmp_path / "x", ITERS + 5, load=reference)[2:] + ["--num-layers", "3"])
    assert_one_line_error(proc, "num_layers=2")


def test_blended_data_path_and_config_file(tmp_path, data):
    other = write_token_dataset(tmp_path / "other", documents=80, seed=3)
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\ndata_path = ["0.25", "{data}", "0.75", "{other}"]\n[training]\nglobal_batch_size = 4\n')
    save = tmp_path / "blend"
    flags = train_flags(data, save, 3)
    i = flags.index("--data-path")
    del flags[i : i + 2]
    check(pretrain(["--config", str(config)] + flags))
    saved = (find_checkpoint(save) / "config.toml").read_text()
    assert f'data_path = ["0.25", "{data}", "0.75", "{other}"]' in saved
    assert json.loads((find_checkpoint(save) / "train_state.json").read_text())["consumed_samples"] == 12


def test_save_refuses_to_overwrite_another_run(tmp_path, data, reference):
    proc = pretrain(train_flags(data, reference, 5))
    assert_one_line_error(proc, "already holds a run", "--load")


def test_multi_value_data_path_is_joined():
    from cookbook.cli import join_multi_value_flags

    argv = ["pretrain", "--data-path", "0.3", "A", "0.7", "B", "--lr", "1"]
    assert join_multi_value_flags(argv) == ["pretrain", "--data-path", "0.3 A 0.7 B", "--lr", "1"]
    assert join_multi_value_flags(["--data-path", "A"]) == ["--data-path", "A"]


def test_tensor_parallel_and_recompute_equal_one_process_and_reshard(tmp_path, data):
    """TP=2 + SP + selective recompute (2 processes) equals one process; its step-6 save resumes under
    FSDP=2 with full recompute (another layout) and continues as the one-process run does."""
    one, tp, re = tmp_path / "one", tmp_path / "tp", tmp_path / "re"
    flags = dict(global_batch_size=4, save_interval=6, adam_eps=1e-6)  # see tests/tp_train.py on eps
    check(pretrain(train_flags(data, one, 10, **flags)))
    check(
        pretrain(
            train_flags(data, tp, 10, tensor_model_parallel_size=2, recompute_granularity="selective", **flags)
            + ["--sequence-parallel"],
            nproc=2,
        )
    )
    check(pretrain(train_flags(data, re, 10, load=tp / "step_000006", recompute_granularity="full", **flags), nproc=2))
    a, b, c = losses(one), losses(tp), losses(re)
    assert sorted(a) == sorted(b) == list(range(1, 11)) and sorted(c) == list(range(7, 11))
    for step in range(1, 11):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    for step in range(7, 11):
        assert abs(a[step] - c[step]) <= 1e-5, (step, a[step], c[step])


def test_bf16_one_and_two_processes_agree(tmp_path, data):
    """bf16: autocast in one process, FSDP2's mixed precision in two; the same run to bf16 accuracy."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = dict(global_batch_size=4, dtype="bf16")
    check(pretrain(train_flags(data, one, 4, **flags)))
    check(pretrain(train_flags(data, two, 4, **flags), nproc=2))
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert math.isfinite(a[step]) and abs(a[step] - b[step]) < 0.05, (step, a[step], b[step])


LAYOUT_FLAGS = dict(num_layers=4, global_batch_size=8, save_interval=6, eval_interval=5, eval_iters=1, adam_eps=1e-6)


@pytest.fixture(scope="module")
def layout_reference(tmp_path_factory, data):
    """One process, 4 layers, 4 micro batches per iteration: the oracle of the pipeline and context parallel runs."""
    save = tmp_path_factory.mktemp("layouts") / "one"
    check(pretrain(train_flags(data, save, 10, **LAYOUT_FLAGS)))
    return save


def assert_same_metrics(want: Path, got: Path) -> None:
    """Every logged train and valid record of two runs equal: loss within 1e-5, grad norm to 1e-5 relative."""
    a, b = read_metrics(want / "metrics.jsonl"), read_metrics(got / "metrics.jsonl")
    assert [(r.get("split"), r["step"]) for r in a] == [(r.get("split"), r["step"]) for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (got.name, x, y)
        if "grad_norm" in x:
            assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-5), (got.name, x, y)


def assert_resumed_as(want: Path, resumed: Path, steps: range) -> None:
    a, c = losses(want), losses(resumed)
    assert sorted(c) == list(steps)
    for step in steps:
        assert abs(a[step] - c[step]) <= 1e-5, (step, a[step], c[step])


def test_pipeline_parallel_equals_one_process_and_reshards(tmp_path, data, layout_reference):
    """PP=2 (1F1B, 2 processes) and interleaved PP=2 x TP=2 + SP + selective recompute (4 processes) equal one
    process in loss, grad norm and valid loss; the PP=2 save at step 6 resumes in one process (another layout:
    the whole model in one place) and continues as the one-process run does."""
    pp, ppx, re = tmp_path / "pp", tmp_path / "ppx", tmp_path / "re"
    check(pretrain(train_flags(data, pp, 10, pipeline_model_parallel_size=2, **LAYOUT_FLAGS), nproc=2))
    check(
        pretrain(
            train_flags(
                data,
                ppx,
                10,
                pipeline_model_parallel_size=2,
                num_layers_per_virtual_pipeline_stage=1,
                tensor_model_parallel_size=2,
                recompute_granularity="selective",
                **LAYOUT_FLAGS,
            )
            + ["--sequence-parallel"],
            nproc=4,
        )
    )
    check(pretrain(train_flags(data, re, 10, load=pp / "step_000006", **LAYOUT_FLAGS)))
    assert_same_metrics(layout_reference, pp)
    assert_same_metrics(layout_reference, ppx)
    assert_resumed_as(layout_reference, re, range(7, 11))


def test_context_parallel_equals_one_process_and_reshards(tmp_path, data, layout_reference):
    """CP=2 (2 processes: each sequence of 32 split into 4 chunks, FSDP over dp x cp) equals one process; its
    step-6 save resumes under TP=2 (another layout) and continues as the one-process run does."""
    cp, re = tmp_path / "cp", tmp_path / "re"
    check(pretrain(train_flags(data, cp, 10, context_parallel_size=2, **LAYOUT_FLAGS), nproc=2))
    check(
        pretrain(
            train_flags(data, re, 10, load=cp / "step_000006", tensor_model_parallel_size=2, **LAYOUT_FLAGS), nproc=2
        )
    )
    assert_same_metrics(layout_reference, cp)
    assert_resumed_as(layout_reference, re, range(7, 11))


def test_pipeline_and_context_parallel_layout_errors_are_one_line(tmp_path, data):
    cases = [
        (dict(num_layers=3), "3 layers do not split evenly over 2 pipeline ranks"),
        (dict(num_layers=4, num_layers_per_virtual_pipeline_stage=3), "choose --num-layers-per-virtual-pipeline-stage"),
        (dict(num_layers=4, global_batch_size=2), "needs at least 2 micro batches per iteration, got 1"),
    ]
    for extra, message in cases:
        flags = train_flags(data, tmp_path / "x", 2, pipeline_model_parallel_size=2, **extra)
        assert_one_line_error(pretrain(flags + ["--dry-run", "--world-size", "2"]), message)
    flags = train_flags(data, tmp_path / "x", 2, pipeline_model_parallel_size=2, num_layers=4, global_batch_size=4)
    assert_one_line_error(
        pretrain(flags + ["--tie-embeddings", "--dry-run", "--world-size", "2"]),
        "tied embeddings are not supported with pipeline parallel",
    )
    cp = train_flags(data, tmp_path / "x", 2, context_parallel_size=3)  # --seq-length 32
    assert_one_line_error(pretrain(cp + ["--dry-run", "--world-size", "3"]), "use a --seq-length divisible by 6")
    assert_one_line_error(
        pretrain(flags + ["--context-parallel-size", "2", "--dry-run", "--world-size", "4"]),
        "context parallel with pipeline parallel is not supported yet",
    )


def test_logit_distillation_from_a_teacher(tmp_path, data, reference):
    """--kd-teacher: with --kd-ratio 0 the run is the plain one; with 0.5 the loss changes, one process equals two
    (the teacher is built and sharded like the student), and a teacher of another vocabulary is refused."""
    base = dict(global_batch_size=4, hidden_size=32, ffn_hidden_size=64)  # a smaller student than the teacher
    plain, zero, kd1, kd2 = (tmp_path / n for n in ("plain", "zero", "kd1", "kd2"))
    check(pretrain(train_flags(data, plain, 6, **base)))
    check(pretrain(train_flags(data, zero, 6, kd_teacher=reference, kd_ratio=0.0, **base)))
    assert losses(zero) == pytest.approx(losses(plain), abs=1e-6)
    check(pretrain(train_flags(data, kd1, 6, kd_teacher=reference, kd_ratio=0.5, kd_temperature=2.0, **base)))
    check(pretrain(train_flags(data, kd2, 6, kd_teacher=reference, kd_ratio=0.5, kd_temperature=2.0, **base), nproc=2))
    a, b = losses(kd1), losses(kd2)
    assert all(abs(a[s] - losses(plain)[s]) > 1e-3 for s in a)
    assert sorted(a) == sorted(b) and all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    proc = pretrain(train_flags(data, tmp_path / "x", 2, kd_teacher=reference, vocab_size=128, **base))
    assert_one_line_error(proc, "has a vocabulary of 96, the student 128")
    assert_one_line_error(
        pretrain(train_flags(data, tmp_path / "y", 2, kd_ratio=1.5)), "--kd-ratio must be in [0, 1], not 1.5"
    )
