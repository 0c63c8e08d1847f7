"""Which trained model: the nnU-Net model folder of (dataset, trainer, plans, configuration) and its folds.

The model folder is nnU-Net's ``nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>``
(``nnunetv2.utilities.file_path_utilities.get_output_folder``); its ``fold_N`` (and ``fold_all``) folders hold the
checkpoints. :func:`resolve_folds` picks the folds as ``nnUNetv2_predict -f`` does, for the commands that load a
model (refinement, mesh prediction).
"""
from __future__ import annotations

import os
from typing import List, Union

__all__ = ["model_folder", "resolve_folds"]


def model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's model folder of a dataset (ID or name), trainer, plans identifier and configuration. Raises
    ``RuntimeError`` (nnU-Net's) when the dataset is not found or ``nnUNet_results`` is unset."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return get_output_folder(maybe_convert_to_dataset_name(dataset), trainer, plans, configuration)


def resolve_folds(model_folder: str, folds, checkpoint: str = "checkpoint_final.pth") -> List[Union[int, str]]:
    """The folds to use, as ``nnUNetPredictor.initialize_from_trained_model_folder`` takes them.

    ``folds`` None (the default of ``-f``): every ``fold_N`` folder of ``model_folder`` that holds ``checkpoint``
    (as ``nnUNetPredictor.auto_detect_available_folds``, which also skips ``fold_all``). Otherwise a fold or a
    sequence of folds: integers, or ``"all"`` (the model trained on all cases). Raises ``ValueError`` naming the
    missing folder or checkpoint, a fold that is neither an integer nor ``all``, a repeated fold, or no fold found.
    """
    if folds is None:
        found = []
        if os.path.isdir(model_folder):
            for d in os.listdir(model_folder):
                if d.startswith("fold_") and d != "fold_all" and d[5:].isdigit() and \
                        os.path.isfile(os.path.join(model_folder, d, checkpoint)):
                    found.append(int(d[5:]))
        if not found:
            raise ValueError(f"no fold_N folder with {checkpoint} in {model_folder}; train a fold first, pass -f (e.g. "
                             "-f all), or choose the checkpoint with -chk")
        return sorted(found)
    if isinstance(folds, (str, int)):
        folds = [folds]
    out: List[Union[int, str]] = []
    for f in folds:
        text = str(f).strip()
        if text != "all" and not text.lstrip("-").isdigit():
            raise ValueError(f"fold {f!r} is neither an integer nor 'all'")
        fold: Union[int, str] = "all" if text == "all" else int(text)
        if fold in out:
            raise ValueError(f"fold {fold} is given twice in {list(folds)}")
        folder = os.path.join(model_folder, f"fold_{fold}")
        if not os.path.isdir(folder):
            raise ValueError(f"fold {fold}: no folder {folder}; train that fold first or leave it out of -f")
        if not os.path.isfile(os.path.join(folder, checkpoint)):
            raise ValueError(f"fold {fold}: no checkpoint {checkpoint} in {folder} (unfinished training? pass -chk "
                             "checkpoint_best.pth or checkpoint_latest.pth, or leave the fold out of -f)")
        out.append(fold)
    if not out:
        raise ValueError("no fold given")
    return out
