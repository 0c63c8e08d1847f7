"""``nnUNetv2_topo_export``: nnU-Net's model export plus the files nnunet-topo writes beside a model.

nnU-Net's ``nnUNetv2_export_model_to_zip`` (``nnunetv2.model_sharing.model_export.export_pretrained_model``) packs a
fixed list per fold (checkpoints, debug.json, progress.png, validation/summary.json) and per model folder (plans,
fingerprint, dataset.json, the cross-validation summary). A topology trainer also writes

* ``fold_k/progress_topology.png`` (the topology terms per epoch and the two-phase switch),
* ``fold_k/validation/summary_topology.json`` (the validation's TVS, Betti and component errors),
* ``summary_topology_cv.json`` in the model folder (``nnUNetv2_topo_summarize_cv``),

which that list leaves out. This command calls nnU-Net's export unchanged and appends those files, with the same
paths relative to ``nnUNet_results``, so that nnU-Net's own ``nnUNetv2_install_pretrained_model_from_zip`` puts them
back where ``nnUNetv2_topo_summarize_cv`` and ``nnUNetv2_topo_report`` look for them. The mesh head and its settings
travel inside ``checkpoint_final.pth`` (nnU-Net exports it), so ``nnUNetv2_topo_predict_meshes`` works on an
installed model as on the trained one. An existing output file is never replaced without ``--overwrite``; the zip is
written to a temporary name and moved into place when complete.
"""
from __future__ import annotations

import os
import zipfile
from typing import List, Sequence

#: per fold folder, relative to it
TOPOLOGY_FOLD_FILES = ("progress_topology.png", os.path.join("validation", "summary_topology.json"))
#: per model folder (trainer__plans__configuration)
TOPOLOGY_MODEL_FILES = ("summary_topology_cv.json",)


def export_model(dataset: str, output_file: str, configurations: Sequence[str], trainer: str = "nnUNetTrainer",
                 plans: str = "nnUNetPlans", folds: Sequence[str] = ("0", "1", "2", "3", "4"),
                 checkpoints: Sequence[str] = ("checkpoint_final.pth",), strict: bool = True,
                 export_cv_predictions: bool = False, overwrite: bool = False) -> List[str]:
    """nnU-Net's ``export_pretrained_model`` into ``output_file`` plus the topology files that exist; returns the
    added archive names. Raises FileExistsError (``output_file`` exists, no ``overwrite``) or ValueError (not a
    ``.zip`` name)."""
    from nnunetv2.model_sharing.model_export import export_pretrained_model
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if not output_file.endswith(".zip"):
        raise ValueError(f"-o {output_file}: the model archive must be a .zip file")
    if os.path.exists(output_file) and not overwrite:
        raise FileExistsError(f"-o {output_file} exists; give --overwrite to replace it or choose another name")
    if nnUNet_results is None:
        raise ValueError("nnUNet_results is not set: export reads the trained models from there")
    partial = output_file + ".partial"
    export_pretrained_model(dataset, partial, tuple(configurations), trainer, plans, tuple(folds), strict,
                            tuple(checkpoints), export_cv_predictions)
    name = maybe_convert_to_dataset_name(dataset)
    added: List[str] = []
    with zipfile.ZipFile(partial, "a", zipfile.ZIP_DEFLATED) as zipf:
        present = set(zipf.namelist())
        for conf in configurations:
            folder = get_output_folder(name, trainer, plans, conf)
            if not os.path.isdir(folder):
                continue  # nnU-Net's export has already refused it when strict
            files = [os.path.join(folder, f) for f in TOPOLOGY_MODEL_FILES]
            for fold in folds:
                fold_dir = os.path.join(folder, "fold_all" if str(fold) == "all" else f"fold_{fold}")
                files += [os.path.join(fold_dir, f) for f in TOPOLOGY_FOLD_FILES]
            for path in files:
                arc = os.path.relpath(path, nnUNet_results)
                if os.path.isfile(path) and arc not in present:
                    zipf.write(path, arc)
                    added.append(arc)
    os.replace(partial, output_file)
    return added
