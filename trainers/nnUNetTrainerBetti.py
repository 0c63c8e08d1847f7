"""nnUNetTrainerBetti: nnU-Net's Dice+CE plus the persistent-homology Betti prior loss (Clough et al., TPAMI 2020).

``L = L_seg + betti_weight * L_betti`` on the full-resolution output. On training *patches* the target Betti
numbers come from the reference patch (``betti_target = "patch"``): a patch cuts structures, so the whole-organ
prior of ``dataset.json`` would be wrong there (DESIGN §6). The dataset priors are used where the whole structure
is in view: test-time refinement (``nnUNetv2_topo_refine``).

Cost control (persistence is CPU work, also when the network trains on a GPU): the probability map is max-pooled
by ``betti_downsample`` before the persistence computation — by default (None) the smallest factor whose pooled map
has at most ``betti_max_pooled_voxels`` (32^3) voxels, so the cost per step is bounded whatever patch nnU-Net
planned (``betti_downsample_for_patch``) —; the term is evaluated every ``betti_every`` iterations (a
graph-connected zero in between); persistence runs in ``betti_num_workers`` threads, by default the cores left after
nnU-Net's data-augmentation workers and the main process. Measured costs: documentation/benchmarks.md ("Betti loss
cost per step"). Variants are subclasses.

Schedule (Clough et al.: the network "is first trained in a supervised manner", then the topological loss): nnU-Net's
loss alone for the first half of ``num_epochs`` (as Fu's 150 + 150; Clough gives no length), then with L_betti.
``nnUNetTrainerBetti_finetune`` starts with the term on (for ``-pretrained_weights`` of a trained nnU-Net).

Sparse references (nnU-Net's ``ignore`` label): a unit whose reference holds ignored voxels gets the dataset's 3D
prior where the structure is in view, else no target (documentation/betti_loss.md); the units per step that used
the prior and that were skipped are logged as ``betti_prior_used`` and ``betti_skipped`` (NaN on steps where the
term did not run).
"""
import os

import torch

from nnunet_topo.losses.betti import DEFAULT_MAX_POOLED_VOXELS, BettiPriorLoss, betti_downsample_for_patch
from nnunet_topo.losses.combined import EveryKCalls
from nnunet_topo.patches import center_pad_to, check_whole_volume_in_patch
from nnunet_topo.topology_spec import label_priors
from nnunet_topo.trainers.nnUNetTrainerTopoBase import nnUNetTrainerTopoBase


class nnUNetTrainerBetti(nnUNetTrainerTopoBase):
    betti_weight: float = 0.01
    betti_downsample = None  # None: betti_downsample_for_patch(patch, betti_max_pooled_voxels)
    betti_max_pooled_voxels: int = DEFAULT_MAX_POOLED_VOXELS
    betti_every: int = 1
    betti_target: str = "patch"
    betti_num_workers = None  # None: the cores left after nnU-Net's data-augmentation workers

    def betti_factor(self) -> int:
        if self.betti_downsample is not None:
            return int(self.betti_downsample)
        return betti_downsample_for_patch(self.configuration_manager.patch_size, self.betti_max_pooled_voxels)

    def betti_workers(self) -> int:
        if self.betti_num_workers is not None:
            return int(self.betti_num_workers)
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        from nnunet_topo.persistence import persistence_workers
        return persistence_workers(reserved=get_allowed_n_proc_DA() + 1)

    def default_topology_start_epoch(self) -> int:
        return self.num_epochs // 2

    def topology_term_names(self):
        return ("betti",)

    def betti_class_ids(self):
        """Label ids that get the loss: those with a 3D Betti prior in the spec, else every foreground label."""
        priors_3d, _ = label_priors(self.topology_spec)
        return sorted(priors_3d) or [int(i) for i in self.label_manager.foreground_labels]

    def extra_logged_term_names(self):
        return super().extra_logged_term_names() + ("betti_skipped", "betti_prior_used")

    def build_topology_terms(self):
        ids = self.betti_class_ids()
        priors = {c: v for c, v in label_priors(self.topology_spec)[0].items() if c in ids}
        loss = self._betti_loss = BettiPriorLoss(
            class_ids=ids, priors=priors or None, target=self.betti_target, downsample=self.betti_factor(),
            softmax=True, ignore_label=self.label_manager.ignore_label, num_workers=self.betti_workers())
        self.print_to_log_file(f"Betti loss: downsample {self.betti_factor()}, every {self.betti_every} step(s), "
                               f"{self.betti_workers()} persistence thread(s)")
        if self.betti_every > 1:
            loss = EveryKCalls(loss, self.betti_every)
        return {"betti": (loss, self.betti_weight)}

    def _pop_term_values(self, split: str):
        values = super()._pop_term_values(split)
        inner = getattr(self, "_betti_loss", None)
        counts = inner.last_counts if inner is not None else None  # None: the term did not run in this step
        if inner is not None:
            inner.last_counts = None
        for name, key in (("betti_skipped", "skipped"), ("betti_prior_used", "prior")):
            values[f"{split}_{name}"] = float(counts[key]) if counts else float("nan")
        return values


class nnUNetTrainerBetti_lambda005(nnUNetTrainerBetti):
    betti_weight = 0.005


class nnUNetTrainerBettiSemi(nnUNetTrainerBetti):
    """nnUNetTrainerBetti + Clough's semi-supervised prior on unlabelled images.

    Unlabelled images live in ``$nnUNet_raw/DatasetXXX_Name/imagesUnlabelled`` (nnU-Net naming,
    ``CASE_0000.nii.gz``); they are preprocessed once with the configuration's own nnU-Net preprocessor and cached
    in ``$nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabelled/``. After every ``unlabelled_every``-th
    labelled step, one extra optimiser step is taken on a batch of unlabelled images with the loss
    ``unlabelled_weight * L_betti(prior)`` (the dataset's 3D priors and, if given, its per-slice priors): the
    alternating form of Clough's ``L_sup + lambda L_topo(unlabelled)``, chosen so that nnU-Net's ``train_step`` is
    reused, not copied. Unlabelled batches are not augmented and are zero-padded to the patch size; every
    unlabelled case must fit in the patch (checked at the start), because a whole-structure prior is wrong on a
    patch that cuts the structure. Logged as ``train_unlabelled_betti`` (``val_unlabelled_betti`` is NaN: there
    is no unlabelled validation set).
    """

    unlabelled_folder_name: str = "imagesUnlabelled"
    unlabelled_weight: float = 0.01
    unlabelled_every: int = 1

    def extra_logged_term_names(self):
        return super().extra_logged_term_names() + ("unlabelled_betti",)

    def on_train_start(self):
        super().on_train_start()
        self._unlabelled = self._load_unlabelled()
        spec = self.topology_spec
        priors_3d, priors_2d = label_priors(spec)
        if not priors_3d and not priors_2d:
            raise RuntimeError("nnUNetTrainerBettiSemi needs Betti priors of single labels in the dataset.json "
                               "topology block ('betti' and/or 'betti_2d')")
        self._unlabelled_losses = []
        if priors_3d:
            self._unlabelled_losses.append(BettiPriorLoss(sorted(priors_3d), priors=priors_3d, target="prior",
                                                          downsample=self.betti_factor()))
        if priors_2d:
            axis = self.patch_topology_spec.betti_2d_axis  # slice axis in the preprocessed order
            self._unlabelled_losses.append(BettiPriorLoss(sorted(priors_2d), priors=priors_2d, target="prior",
                                                          downsample=self.betti_factor(), slice_axis=axis))
        self._unlabelled_calls = 0
        self.print_to_log_file(f"semi-supervised priors: {len(self._unlabelled)} unlabelled case(s), 3D priors "
                               f"{priors_3d}, 2D priors {priors_2d}, weight {self.unlabelled_weight}")

    def _load_unlabelled(self):
        import numpy as np
        from nnunetv2.paths import nnUNet_raw
        from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

        if not nnUNet_raw.is_set():
            raise RuntimeError("nnUNetTrainerBettiSemi reads the unlabelled images from $nnUNet_raw, which is not set")
        folder = os.path.join(str(nnUNet_raw), self.plans_manager.dataset_name, self.unlabelled_folder_name)
        if not os.path.isdir(folder):
            raise RuntimeError(f"no unlabelled images: {folder} does not exist. Put images there with nnU-Net's naming "
                               f"(CASE_0000{self.dataset_json['file_ending']}) or use nnUNetTrainerBetti.")
        cases = create_lists_from_splitted_dataset_folder(folder, self.dataset_json["file_ending"], num_processes=1)
        if not cases:
            raise RuntimeError(f"no images ending in _0000{self.dataset_json['file_ending']} in {folder}")
        cache = os.path.join(self.preprocessed_dataset_folder_base,
                             self.configuration_manager.data_identifier + "_unlabelled")
        os.makedirs(cache, exist_ok=True)
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        arrays = []
        for files in cases:
            name = os.path.basename(files[0])[: -len("_0000" + self.dataset_json["file_ending"])]
            path = os.path.join(cache, name + ".npy")
            if not os.path.isfile(path):
                data, _, _ = preprocessor.run_case(files, None, self.plans_manager, self.configuration_manager,
                                                   self.dataset_json)
                tmp = f"{path}.{os.getpid()}.tmp.npy"
                np.save(tmp, data.astype(np.float32))
                os.replace(tmp, path)
            arrays.append((name, np.load(path, mmap_mode="r")))
        check_whole_volume_in_patch([(n, a.shape[1:]) for n, a in arrays], self.configuration_manager.patch_size)
        return arrays

    def _unlabelled_batch(self):
        import numpy as np

        patch = [int(p) for p in self.configuration_manager.patch_size]
        idx = np.random.choice(len(self._unlabelled), self.batch_size, replace=True)
        batch = np.stack([center_pad_to(np.asarray(self._unlabelled[j][1], dtype=np.float32), patch) for j in idx])
        return torch.from_numpy(batch).to(self.device, non_blocking=True)

    def _unlabelled_step(self) -> float:
        from nnunetv2.utilities.helpers import dummy_context
        from torch import autocast

        x = self._unlabelled_batch()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(x)
            logits = output[0] if isinstance(output, (list, tuple)) else output
            term = sum(loss(logits) for loss in self._unlabelled_losses)
            loss = self.unlabelled_weight * term
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return float(term.detach())

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        self._unlabelled_calls += 1
        if (self._unlabelled_calls - 1) % self.unlabelled_every == 0:
            out["train_unlabelled_betti"] = self._unlabelled_step()
        return out


class nnUNetTrainerBetti_finetune(nnUNetTrainerBetti):
    """The topology phase from the first epoch: for ``-pretrained_weights`` of a trained nnU-Net (its first phase)."""

    topology_start_epoch = 0
