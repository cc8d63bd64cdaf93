"""``cookbook merge``: several indexed datasets into one, byte-identical to Megatron-LM's
``tools/merge_datasets.py`` (prefixes in ``sorted()`` order; ``.bin`` copied byte for byte)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cookbook.data.indexed import IndexedDataset, IndexedDatasetWriter, dataset_prefix, dataset_prefixes, part_name
from cookbook.errors import CookbookError
from cookbook.fileio import check_writable


@dataclass
class MergeSummary:
    prefixes: list[str]
    output_prefix: str
    documents: int
    sequences: int
    tokens: int
    dtype: str


def resolve_prefixes(inputs: list[str], output_prefix: str | None = None) -> list[str]:
    """One folder (every .bin/.idx pair in it, sorted, but ``output_prefix``: a merge into the folder it reads can
    run again and makes the same output) or a list of prefixes (kept in the order given)."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        output = Path(output_prefix).resolve() if output_prefix else None
        prefixes = [p for p in dataset_prefixes(inputs[0]) if Path(p).resolve() != output]
        if not prefixes:
            raise CookbookError(
                f"the folder {inputs[0]} holds no .bin/.idx datasets" + (" but the output" if output else "")
            )
        _check_partitions(Path(inputs[0]))
        return prefixes
    prefixes = []
    for item in inputs:
        prefix = dataset_prefix(item)
        if Path(prefix).is_dir():
            raise CookbookError(f"{prefix} is a folder; give either one folder or a list of dataset prefixes")
        prefixes.append(prefix)
    if not prefixes:
        raise CookbookError("nothing to merge; pass --input FOLDER or --input PREFIX --input PREFIX ...")
    return prefixes


def _check_partitions(folder: Path) -> None:
    """A folder of ``preprocess --partitions N`` parts (it has their plan.json) must hold all N, each finished."""
    plan = folder / "plan.json"
    if not plan.is_file():
        return

    n = json.loads(plan.read_text(encoding="utf-8"))["partitions"]
    missing = [i for i in range(n) if not (folder / f"{part_name(i, n)}.json").is_file()]
    if missing:
        raise CookbookError(
            f"{folder} lacks {len(missing)} of its {n} partitions (first: {part_name(missing[0], n)}); "
            "run their preprocess --partition-index tasks first"
        )


def run(inputs: list[str], output_prefix: str) -> MergeSummary:
    check_writable(Path(output_prefix).parent, "--output-prefix", folder=True)
    prefixes = resolve_prefixes(inputs, output_prefix)
    out = str(Path(output_prefix))
    for p in prefixes:
        if Path(p).resolve() == Path(out).resolve():
            raise CookbookError(f"the output prefix {out} is one of the inputs; choose another --output-prefix")
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every input before writing anything
    dtype = datasets[0].dtype
    for p, d in zip(prefixes, datasets):
        if d.dtype != dtype:
            raise CookbookError(
                f"{p} holds {d.dtype.name} tokens but {prefixes[0]} holds {dtype.name}; "
                "datasets made with tokenizers of different vocabulary sizes cannot be merged"
            )
    del datasets
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(out, dtype) as writer:
        for p in prefixes:
            writer.add_dataset(p)
    return MergeSummary(prefixes, out, writer.documents, writer.sequences, writer.tokens, dtype.name)


def render(s: MergeSummary) -> str:
    """What ``cookbook merge`` prints: one line."""
    datasets = f"{len(s.prefixes)} dataset{'s' if len(s.prefixes) != 1 else ''}"
    return (
        f"[green]merged[/green] {datasets} into {s.output_prefix}.bin/.idx: "
        f"{s.documents:,} documents, {s.sequences:,} sequences, {s.tokens:,} tokens ({s.dtype})"
    )
