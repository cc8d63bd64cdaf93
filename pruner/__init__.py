"""Structured pruning of Llama-family models to any smaller shape (``cookbook prune``; docs/prune.md).

    spec.py         the target shape (hidden, FFN, heads, query groups, layers) and every check on it
    importance.py   which units matter: activation (Minitron), magnitude, random; layers by block influence or
                    by the calibration loss when removed
    slicing.py      keep the best units and cut every tensor a dimension appears in, GQA-aware
    calib.py        calibration samples from an indexed dataset
    save.py         the pruned model as a normal cookbook checkpoint

The recipe that runs them (load, score, slice, evaluate, save, heal) is ``recipes/prune.py``.
"""

from pruner.importance import Scores, calibrate, magnitude_scores, random_scores
from pruner.slicing import Selection, keep_all, prune_model, select, slice_state_dict
from pruner.spec import PruneSpec, target_config

__all__ = [
    "PruneSpec",
    "target_config",
    "Scores",
    "calibrate",
    "magnitude_scores",
    "random_scores",
    "Selection",
    "keep_all",
    "select",
    "slice_state_dict",
    "prune_model",
]
