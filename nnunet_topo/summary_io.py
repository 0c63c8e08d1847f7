"""Shared by the folder evaluators (``evaluation.py``, ``mesh_evaluation.py``): JSON input, JSON-safe values, means.

Kept apart so that neither evaluator imports the other's internals (no import circle).
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Tuple, Union

import numpy as np

__all__ = ["EvaluationError", "ignore_label_of", "load_json_arg", "mean_and_count", "nanmean", "to_builtin",
           "write_json_atomic"]


class EvaluationError(ValueError):
    """Bad input to the evaluator (missing files, mismatching shapes or spacings, NaNs)."""


def to_builtin(x):
    """``x`` with numpy scalars and arrays (also nested in dicts, lists, tuples) turned into Python builtins."""
    if isinstance(x, dict):
        return {k: to_builtin(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_builtin(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return to_builtin(x.tolist())
    return x


def mean_and_count(values: Iterable) -> Tuple[float, int]:
    """Mean over the values that are neither None nor NaN (NaN when none is left), and how many those were."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return (float(np.mean(vals)) if vals else math.nan), len(vals)


def nanmean(values: Iterable) -> float:
    """Mean over the values that are neither None nor NaN; NaN when none is left."""
    return mean_and_count(values)[0]


def load_json_arg(x: Union[str, os.PathLike, dict], what: str) -> dict:
    """A dict given as itself or as the path of a JSON file (:class:`EvaluationError` naming ``what`` if missing)."""
    if isinstance(x, dict):
        return x
    if not os.path.isfile(x):
        raise EvaluationError(f"{what} not found: {x}")
    from nnunet_topo.paths import read_json

    return read_json(x, what)


def ignore_label_of(dataset_json: dict):
    """nnU-Net's ``ignore`` label id of a dataset.json (sparse annotation: such voxels are unknown), or None."""
    value = dataset_json.get("labels", {}).get("ignore")
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None


def write_json_atomic(path: str, obj, **dump_kwargs) -> None:
    """``json.dump(obj)`` to ``path`` through a temporary file renamed over it, so a reader never sees half a file
    and a crash leaves the old file (the temporary one is removed)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, **dump_kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
