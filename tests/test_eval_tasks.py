"""``cookbook eval --tasks``: lm-evaluation-harness on a checkpoint gives the same scores three ways on local tasks
(one multiple-choice, one loglikelihood_rolling, one generate_until, over jsonl files written here): our LM in
process, lm-eval's ``local-completions`` against ``cookbook serve``, and lm-eval's own ``hf`` model on the
checkpoint converted with ``cookbook convert --to hf``. Also under torchrun (data parallel), and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model

from helpers_distill import make_teacher, serving  # noqa: E402

TASKS = ["cb_mc", "cb_roll", "cb_gen"]
WORDS = "the a cat dog runs sleeps quickly slowly red blue house tree river stone eats jumps over under".split()


def sentence(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hf_tokenizer):
    """The checkpoint (a Hugging Face tokenizer, so that transformers' AutoTokenizer reads the converted folder), its
    conversion back to HF, and a folder of three local task YAMLs over jsonl files."""
    import random

    from recipes.convert import ConvertConfig, run

    root = tmp_path_factory.mktemp("tasks")
    teacher = make_teacher(root, hf_tokenizer, vocab_size=704)
    run(ConvertConfig("cookbook", "hf", str(teacher["cookbook"]), str(root / "converted")), show_progress=False)
    rng = random.Random(0)
    data = {
        "mc": [
            {
                "question": sentence(rng, 6) + "?",
                "choices": [sentence(rng, 2), sentence(rng, 3), sentence(rng, 2)],
                "answer": rng.randrange(3),
            }
            for _ in range(12)
        ],
        "roll": [{"text": sentence(rng, rng.randrange(5, 30)) + "."} for _ in range(8)],
        "gen": [{"question": "Q: " + sentence(rng, 4) + "\nA:", "answer": " " + sentence(rng, 1)} for _ in range(6)],
    }
    tasks = root / "yaml"
    tasks.mkdir()
    for name, rows in data.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text(
        "task: cb_mc\n"
        + head.format(tasks / "mc.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
    )
    (tasks / "roll.yaml").write_text(
        "task: cb_roll\n" + head.format(tasks / "roll.jsonl") + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n'
    )
    (tasks / "gen.yaml").write_text(
        "task: cb_gen\n"
        + head.format(tasks / "gen.jsonl")
        + 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return {**teacher, "converted": root / "converted", "tasks": tasks, "root": root}


def scores(results: dict) -> dict:
    """{(task, metric): value} of lm-eval's results."""
    return {
        (task, k): v for task, m in results["results"].items() for k, v in m.items() if "," in k and "stderr" not in k
    }


def assert_same_scores(a: dict, b: dict, what: str) -> None:
    """Accuracies equal; perplexities (exponentials of summed loglikelihoods) to a relative 1e-5."""
    assert set(scores(a)) == set(scores(b)), what
    for key, value in scores(a).items():
        if key[1].startswith(("acc", "exact_match")):
            assert value == scores(b)[key], (what, key)
        else:
            assert value == pytest.approx(scores(b)[key], rel=1e-5), (what, key)


def answers(results: dict) -> dict:
    """Per task, per document (in order), the LM's answers: loglikelihoods as floats, generations as strings."""

    def plain(r):
        if isinstance(r, (list, tuple)):
            return [plain(x) for x in r]
        if isinstance(r, str):
            try:
                return float(r)
            except ValueError:
                return {"True": True, "False": False}.get(r, r)
        return r

    return {
        task: [plain(s["resps"]) for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()
    }


def assert_same(a, b, what: str) -> None:
    """Equal, with loglikelihoods within 1e-4 (fp32, different kernels)."""
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for key in a:
            assert_same(a[key], b[key], f"{what} {key}")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) < 1e-4, f"{what}: {a} != {b}"
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def test_the_same_scores_three_ways(setup):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from inference_distill.server import ServeConfig
    from recipes.eval import run_tasks

    common = dict(limit=8, num_fewshot=1)
    include = [str(setup["tasks"])]
    ours, written = run_tasks(
        str(setup["cookbook"]),
        TASKS,
        include_path=include,
        device="cpu",
        add_bos_token=False,
        log_samples=True,
        output_path=str(setup["root"] / "out"),
        **common,
    )
    assert written is not None and set(json.loads(written.read_text())["results"]) == set(TASKS)
    hf = simple_evaluate(
        model="hf",
        model_args=f"pretrained={setup['converted']},dtype=float32,add_bos_token=False",
        tasks=TASKS,
        task_manager=TaskManager(include_path=include, include_defaults=False),
        device="cpu",
        batch_size=4,
        **common,
    )
    with serving(
        ServeConfig(str(setup["cookbook"]), port=0, device="cpu", model_name="tiny", log_requests=False)
    ) as server:
        host, port = server.server_address[:2]
        # tokenizer_backend is auto: lm-eval probes /tokenizer_info and /tokenize and tokenizes on the server. Its
        # remote tokenizer takes "bos_token_id or eos_token_id" as the prefix, so a BOS of id 0 must be named.
        args = f"base_url=http://{host}:{port}/v1/completions,model=tiny,num_concurrent=4,custom_prefix_token_id=0"
        api = simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=TASKS,
            task_manager=TaskManager(include_path=include, include_defaults=False),
            batch_size=2,
            **common,
        )
    for name, other in (("hf", hf), ("local-completions", api)):
        assert_same_scores(other, ours, name)
        assert_same(answers(other), answers(ours), name)
    accuracy = scores(ours)
    assert 0 <= accuracy["cb_mc", "acc,none"] <= 1 and accuracy["cb_roll", "word_perplexity,none"] > 1
    gen = answers(ours)["cb_gen"]
    assert len(gen) == 6 and all(isinstance(g[0][0], str) and "\n" not in g[0][0] for g in gen)


def test_data_parallel_under_torchrun_gives_the_single_process_scores(setup, tmp_path):
    from recipes.eval import run_tasks

    single, _ = run_tasks(
        str(setup["cookbook"]), TASKS, include_path=[str(setup["tasks"])], device="cpu", log_samples=True
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "cookbook",
        "eval",
        "--load",
        str(setup["cookbook"]),
        "--tasks",
        ",".join(TASKS),
        "--include-path",
        str(setup["tasks"]),
        "--device",
        "cpu",
        "--dump-dir",
        str(tmp_path),
        "--log-samples",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = list(tmp_path.glob("*/results_*.json"))
    assert len(files) == 1, done.stdout  # rank 0 alone writes
    both = json.loads(files[0].read_text())
    assert_same_scores(both, single, "torchrun")
    samples = {
        task: [json.loads(line) for line in next(tmp_path.glob(f"*/samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in TASKS
    }
    assert_same(answers({"samples": samples}), answers(single), "torchrun")
    assert "cb_mc" in done.stdout and "acc" in done.stdout


def test_tasks_that_need_the_hub_or_do_not_exist_are_one_line(setup, monkeypatch):
    from cookbook.errors import CookbookError
    from recipes.eval import run_tasks

    for task, message in (
        ("hellaswag", "task 'hellaswag' could not load its data here"),
        ("no_such_task", "unknown task"),
    ):
        with pytest.raises(CookbookError, match=message) as e:  # before the model is loaded, nothing downloaded
            run_tasks(str(setup["root"] / "no-model"), [task], include_path=[str(setup["tasks"])], device="cpu")
        assert "--include-path" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CookbookError, match="--include-path .* does not exist"):
        run_tasks(str(setup["cookbook"]), TASKS, include_path=[str(setup["root"] / "missing")], device="cpu")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the eval extra were not installed
    with pytest.raises(CookbookError, match=r"pip install 'cookbook\[eval\]'"):
        run_tasks(str(setup["cookbook"]), TASKS, device="cpu")
