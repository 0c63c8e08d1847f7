"""What every command shares: how a user error ends a command, and the arguments that name a trained model.

A user error (bad input the user can fix: :data:`nnunet_topo.paths.USER_ERRORS` plus the errors a command names,
e.g. ``TopologySpecError``) ends a command with one line ``error: <message>`` on stderr and exit code 2
(:data:`EXIT_USER_ERROR`), as argparse ends on bad arguments; anything else is a bug and keeps its traceback.
Exit code 1 is each command's own "written, but some cases failed" (its docstring says which).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, NoReturn, Tuple, Type

from nnunet_topo.model_folder import model_folder
from nnunet_topo.paths import USER_ERRORS

__all__ = ["EXIT_USER_ERROR", "print_error", "fail", "user_errors", "exit_on_user_errors", "add_model_arguments",
           "model_folder_from_args"]

#: exit code of a command ended by a user error (argparse's code for bad arguments)
EXIT_USER_ERROR = 2


def print_error(message: object) -> int:
    """Print ``error: <message>`` on stderr; returns :data:`EXIT_USER_ERROR` (for commands that return their code)."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def fail(message: object) -> NoReturn:
    """End the command: ``error: <message>`` on stderr, exit code :data:`EXIT_USER_ERROR`."""
    raise SystemExit(print_error(message))


def user_errors(*extra: Type[BaseException]) -> Tuple[Type[BaseException], ...]:
    """The exceptions a command reports as user errors: :data:`~nnunet_topo.paths.USER_ERRORS` plus ``extra``."""
    return (*USER_ERRORS, *extra)


@contextlib.contextmanager
def exit_on_user_errors(*extra: Type[BaseException], prefix: str = "") -> Iterator[None]:
    """Inside the block, a user error (:func:`user_errors` of ``extra``) ends the command by :func:`fail` with
    ``prefix`` before its message."""
    try:
        yield
    except user_errors(*extra) as e:
        fail(f"{prefix}{e}")


def add_model_arguments(parser: argparse.ArgumentParser, default_trainer: str, output_help: str) -> None:
    """The arguments that name a trained model and its inputs, as nnUNetv2_predict spells them."""
    parser.add_argument("-i", required=True, help="input folder with images (nnU-Net naming, CASE_0000.nii.gz)")
    parser.add_argument("-o", required=True, help=output_help)
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    parser.add_argument("-tr", default=default_trainer, help=f"trainer of the model (default {default_trainer})")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-f", nargs="+", default=None,
                        help="folds of the model, e.g. -f 0 1 2 3 4 or -f all; several folds are an ensemble, as in "
                             "nnUNetv2_predict (default: every fold_N folder of the model folder with the checkpoint "
                             "-chk)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")


def model_folder_from_args(args: argparse.Namespace) -> str:
    """The model folder of the parsed ``-d``, ``-tr``, ``-p``, ``-c``
    (:func:`nnunet_topo.model_folder.model_folder`)."""
    return model_folder(args.d, args.tr, args.p, args.c)
