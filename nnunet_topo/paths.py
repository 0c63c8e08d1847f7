"""What the commands write and read: one output-path guard, one reader wrapper, one label-value check.

Nothing the user gave is overwritten or silently ignored. Every command that writes (``nnUNetv2_topo_check_rules``,
``_evaluate_folder``, ``_report``, ``_refine``, ``_predict_meshes``, ``_summarize_cv``, ``_plan_mesh``,
``_plan_whole_volume``) passes its output through :func:`check_output` before any work:

* paths are resolved (``os.path.realpath``: symlinks, ``..``) before they are compared, so a symlink to an input
  folder is that input folder;
* an output may not be an input file or folder, lie inside an input folder, or contain an input (a folder that
  holds inputs is never written into or replaced);
* a file output needs its documented extension (``.json`` for reports and plans);
* an existing output needs ``--overwrite`` where the command has that flag.

A refusal is an :class:`OutputPathError` whose message has one shape everywhere,
``-o X: <reason>; <how to fix>``; the commands print it as ``error: ...`` and exit with code 2.

Every reader path (images, label maps, meshes, plans, dataset.json, summaries) goes through :func:`reading`, which
turns a reader's exception (SimpleITK's ``RuntimeError``, ``OSError``, ``json.JSONDecodeError``, a mesh reader's
``ValueError``) into one line naming the file and the reader's reason (:class:`InputReadError`, exit code 2 in the
commands). :func:`check_label_values` refuses a label map holding a value that dataset.json does not define.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["OutputPathError", "InputReadError", "UndefinedLabelError", "real_path", "check_output", "reading",
           "read_json", "defined_label_values", "check_label_values", "USER_ERRORS"]

PathLike = Union[str, os.PathLike]


class OutputPathError(ValueError):
    """An output path that would overwrite or write into an input, has the wrong extension, or exists."""


class OutputExistsError(OutputPathError, FileExistsError):
    """An existing output without ``--overwrite``: also a ``FileExistsError``, as the plan writers raised before
    the guard (callers that reuse an existing plans file catch that)."""


class InputReadError(ValueError):
    """An input file that its reader cannot read (message: the file and the reader's reason, one line)."""


class UndefinedLabelError(ValueError):
    """A label map holding a value that dataset.json does not define."""


#: the errors of this module, for the commands' ``except`` clauses (printed as ``error: ...``, exit code 2)
USER_ERRORS = (OutputPathError, InputReadError, UndefinedLabelError)


def real_path(p: PathLike) -> str:
    """``p`` absolute, with symlinks and ``..`` resolved."""
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(output: PathLike, inputs: Union[Mapping[str, Optional[PathLike]], Iterable[Optional[PathLike]]],
                 kind: str = "file", extensions: Sequence[str] = (), overwrite: Optional[bool] = None,
                 option: str = "-o", may_lie_in: Iterable[Optional[PathLike]] = ()) -> str:
    """Refuse an output path that would overwrite or write into an input; returns the resolved output path.

    Args:
        output: the file or folder the command will write.
        inputs: the input files and folders, ``{what: path}`` (``what`` names it in the message) or a sequence of
            paths; ``None`` entries are skipped.
        kind: ``"file"`` (the output is one file) or ``"folder"`` (the command writes into it).
        extensions: for a file output, the accepted endings (e.g. ``(".json",)``); empty: any.
        overwrite: ``None``: the command has no ``--overwrite`` flag (an existing output is replaced, as documented by
            the command); ``False``: an existing file output, or a non-empty folder output, is refused;
            ``True``: allowed.
        option: the option that named the output, for the message (``-o``, ``--report``).
        may_lie_in: input folders an output *file* may lie inside (e.g. nnU-Net's own
            ``pred_folder/summary.json`` convention); it may still not be or contain them, nor be an input file.

    Raises:
        OutputPathError: ``<option> <output>: <reason>; <how to fix>``.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    if output is None or os.fspath(output) == "":
        raise OutputPathError(f"{option}: no output given; name a {kind}")
    shown = os.fspath(output)

    def fail(reason: str, fix: str, error: type = OutputPathError) -> "NoReturn":  # noqa: F821
        raise error(f"{option} {shown}: {reason}; {fix}")

    out = real_path(output)
    if os.path.abspath(shown) != out:  # a symlink or ".." on the way: say where it leads
        shown = f"{shown} (resolves to {out})"
    items = list(inputs.items()) if isinstance(inputs, Mapping) else [("input", p) for p in inputs]
    allowed_parents = {real_path(p) for p in may_lie_in if p is not None}
    for what, p in items:
        if p is None:
            continue
        inp = real_path(p)
        suffix = "" if os.path.abspath(os.fspath(p)) == inp else f" (resolves to {inp})"
        if out == inp:
            fail(f"is the {what} {os.fspath(p)}{suffix}",
                 "inputs are never overwritten: choose a path outside the input folders and files")
        if _inside(out, inp) and not (kind == "file" and inp in allowed_parents):
            fail(f"lies inside the {what} {os.fspath(p)}{suffix}",
                 "an input folder is never written into: choose a path outside the inputs")
        if _inside(inp, out):
            fail(f"contains the {what} {os.fspath(p)}",
                 "an output folder must not hold an input (it may be replaced): choose a new path")
    if kind == "file":
        if extensions and not any(os.fspath(output).lower().endswith(e.lower()) for e in extensions):
            fail(f"not a {' or '.join(extensions)} file", f"name the output file ...{extensions[0]}")
        if os.path.isdir(out):
            fail("is a folder", "name a file")
        if overwrite is False and os.path.exists(out):
            fail("exists", "pass --overwrite to replace it, or choose another path", OutputExistsError)
    else:
        if os.path.exists(out) and not os.path.isdir(out):
            fail("exists and is not a folder", "name a folder")
        if overwrite is False and os.path.isdir(out) and os.listdir(out):
            fail("exists and is not empty", "pass --overwrite to replace its files, or choose a new folder",
                 OutputExistsError)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # SimpleITK: "Exception thrown in SimpleITK ...\n<file>:<line>:\nsitk::ERROR: <reason>": keep the reason
    for ln in reversed(lines):
        m = re.search(r"(?:sitk::)?ERROR:\s*(.*)", ln)
        if m and m.group(1):
            return m.group(1)
    return " ".join(lines)[:400]


@contextlib.contextmanager
def reading(what: str, path: PathLike) -> Iterator[None]:
    """Run a reader; turn its exception into :class:`InputReadError` ``cannot read <what> <path>: <reason>``.

    Converts ``RuntimeError`` (SimpleITK, nibabel, torch.load), ``OSError``, ``ValueError`` (``json.JSONDecodeError``,
    mesh readers), ``KeyError``/``IndexError``/``TypeError``/``EOFError`` raised while parsing. Our own
    :class:`InputReadError` and :class:`UndefinedLabelError` pass unchanged.
    """
    try:
        yield
    except (InputReadError, UndefinedLabelError, OutputPathError):
        raise
    except (RuntimeError, OSError, ValueError, KeyError, IndexError, TypeError, EOFError) as e:
        raise InputReadError(f"cannot read {what} {os.fspath(path)}: {_one_line(e)}") from e


def read_json(path: PathLike, what: str = "JSON file") -> dict:
    """``json.load`` of ``path`` with the errors of :func:`reading`; also refuses a file whose top level is not an
    object."""
    with reading(what, path):
        with open(path) as f:
            obj = json.load(f)
    if not isinstance(obj, dict):
        raise InputReadError(f"cannot read {what} {os.fspath(path)}: expected a JSON object at the top level, got "
                             f"{type(obj).__name__}")
    return obj


def defined_label_values(dataset_json: Mapping) -> Tuple[int, ...]:
    """Every label value dataset.json defines (``labels``: ints, region lists flattened; the ``ignore`` label)."""
    values = set()
    for v in dict(dataset_json.get("labels", {})).values():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
                values.add(int(x))
    return tuple(sorted(values))


def check_label_values(seg: np.ndarray, defined: Sequence[int], path: PathLike, what: str = "label map") -> None:
    """Refuse a label map holding a value not in ``defined``: ``UndefinedLabelError`` naming the file, the values
    and the defined labels. One pass: a bincount bounded by the maximum for non-negative integers, else
    ``np.unique``."""
    seg = np.asarray(seg)
    if seg.size == 0:
        return
    if np.issubdtype(seg.dtype, np.floating):
        if not np.all(np.isfinite(seg)):
            raise UndefinedLabelError(f"{what} {os.fspath(path)} holds NaN or infinite values; a label map holds "
                                      f"the integer labels of dataset.json {list(defined)}")
        values = np.unique(seg)
        nonint = values[values != np.round(values)]
        if nonint.size:
            raise UndefinedLabelError(f"{what} {os.fspath(path)} holds non-integer value(s) {nonint[:5].tolist()}; "
                                      f"dataset.json defines the labels {list(defined)}")
        present = values.astype(np.int64)
    else:
        lo, hi = int(seg.min()), int(seg.max())
        if lo >= 0 and hi < 1 << 16:
            present = np.nonzero(np.bincount(seg.ravel().astype(np.int64, copy=False), minlength=hi + 1))[0]
        else:
            present = np.unique(seg)
    bad = sorted(set(int(v) for v in present) - set(int(d) for d in defined))
    if bad:
        raise UndefinedLabelError(f"{what} {os.fspath(path)} holds label value(s) {bad} that dataset.json does not "
                                  f"define (defined: {list(defined)}); fix the file or add the label to dataset.json "
                                  "'labels'")
