"""Base class of every nnunet-topo trainer.

What it adds to ``nnUNetTrainer`` (and nothing else):

* the dataset's topology spec (``dataset.json`` key ``topology``, resolved through nnU-Net's label names)
  is loaded and validated when the trainer is built, so a bad rule fails before any preprocessing is read;
  without a ``topology`` block the defaults of :func:`nnunet_topo.topology_spec.default_topology` are used and the
  log says so;
* ``_build_loss`` keeps nnU-Net's own loss (``super()._build_loss()``, deep supervision untouched) and adds
  the terms a subclass returns from :meth:`build_topology_terms`, on the full-resolution output;
* every term is logged every epoch for training and validation (keys ``train_<term>``, ``val_<term>``
  registered in nnU-Net's logger, so they are checkpointed and restored by ``--c``), printed to the training
  log, and plotted to ``progress_topology.png`` next to nnU-Net's ``progress.png``;
* after nnU-Net's own validation (``summary.json``), the topology evaluator writes
  ``validation/summary_topology.json``;
* the two-phase schedule of the papers (documentation/trainers.md "Schedule"): nnU-Net's own loss alone until
  ``topology_start_epoch`` (a trainer's default: :meth:`default_topology_start_epoch`), then the topology terms;
  during the first phase they are not computed and logged as NaN, the switch is logged and drawn in
  ``progress_topology.png``; ``--c`` resumes on either side of it (the epoch is checkpointed);
* ``-pretrained_weights``: nnU-Net loads the network and re-initialises its segmentation layers (transfer
  learning); the topology trainers take those layers from the checkpoint too when their shapes match
  (``keep_pretrained_seg_layers``), because a fine-tune on the same labels should start from the trained decision
  (the mesh head's placement reads it), and log what was loaded (:meth:`after_pretrained_weights`).

This file is imported by nnU-Net as a top-level module (``nnUNet_extTrainer``), so it uses absolute imports
only. Subclasses import it as ``nnunet_topo.trainers.nnUNetTrainerTopoBase``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_topo.losses.combined import TopologyLossWrapper
from nnunet_topo.pretrained import PretrainedWeights
from nnunet_topo.schedule import TwoPhaseSchedule
from nnunet_topo.topology_spec import TopologySpecError, default_topology, describe, parse_topology, spec_in_patch_frame


class nnUNetTrainerTopoBase(TwoPhaseSchedule, PretrainedWeights, nnUNetTrainer):
    """nnUNetTrainer + topology spec + extra loss terms logged every epoch + topology validation summary."""

    #: run the topology evaluator after nnU-Net's validation (writes validation/summary_topology.json)
    evaluate_topology_after_validation: bool = True
    #: refuse to train when the reference labels (gt_segmentations) violate a rule of the spec: such a rule cannot
    #: be learned and its TVS is meaningless. Betti-prior mismatches are only logged. Subclass to switch off.
    require_rules_hold_on_reference: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise TopologySpecError(
                f"{self.__class__.__name__} does not support region-based training (dataset.json 'labels' with "
                "lists of ids / 'regions_class_order'). Use plain integer labels and express regions in the "
                "'topology' block (e.g. \"outer\": [\"LV\", \"MYO\"]).")
        if "topology" in dataset_json:
            self.topology_spec = parse_topology(dataset_json)
        else:
            self.topology_spec = default_topology(dataset_json["labels"])
            self.print_to_log_file(
                "dataset.json has no 'topology' block: no topology rules, Betti prior (1, 0, 0) per label. "
                "See documentation/topology_spec.md to define rules.")
        self.print_to_log_file("Topology spec:\n" + describe(self.topology_spec))
        #: the spec with slice axes in the order of the preprocessed patches (plans' transpose_forward): what every
        #: loss on patches uses; ``topology_spec`` (image order) is what evaluation on images uses
        self.patch_topology_spec = spec_in_patch_frame(self.topology_spec, self.plans_manager.transpose_forward)
        if self.require_rules_hold_on_reference and self.topology_spec.rules:
            self._check_rules_on_reference()
        self._topology_term_names: Tuple[str, ...] = tuple(self.topology_term_names())
        self._logged_term_names: Tuple[str, ...] = self._topology_term_names + tuple(self.extra_logged_term_names())
        local = self.logger.local_logger.my_fantastic_logging
        for name in self._logged_term_names:
            for split in ("train", "val"):
                local.setdefault(f"{split}_{name}", [])

    def _check_rules_on_reference(self) -> None:
        """Check the spec against the reference labels once; the result is cached in the preprocessed folder."""
        from nnunet_topo.rule_check import (cached_rule_check, reference_exceptions_message,
                                            reference_violations_message)

        gt = os.path.join(self.preprocessed_dataset_folder_base, "gt_segmentations")
        if not os.path.isdir(gt):
            self.print_to_log_file(f"no {gt}: skipping the check of the rules on the reference labels")
            return
        report = cached_rule_check(gt, self.dataset_json, os.path.join(self.preprocessed_dataset_folder_base,
                                                                       "nnunet_topo_reference_check.json"))
        for name, e in report["betti"].items():
            if e["cases_differing"]:
                self.print_to_log_file(f"WARNING: Betti prior {name} {tuple(e['prior'])} differs from the reference in "
                                       f"{e['cases_differing']}/{report['num_cases']} case(s)")
        excepted = reference_exceptions_message(report)
        if excepted:
            self.print_to_log_file("WARNING: " + excepted)
        message = reference_violations_message(report)
        if message:
            raise TopologySpecError(message)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, then the logged terms a checkpoint of an older version lacks get NaN for its epochs (nnU-Net
        replaces the whole log from the checkpoint and refuses to log an unknown key, which would break ``--c``)."""
        super().load_checkpoint(filename_or_checkpoint)
        local = self.logger.local_logger.my_fantastic_logging
        for name in self._logged_term_names:
            for split in ("train", "val"):
                local.setdefault(f"{split}_{name}", [float("nan")] * self.current_epoch)

    # ------------------------------------------------------------------ hooks for subclasses
    def topology_term_names(self) -> Tuple[str, ...]:
        """Names of the extra loss terms (fixed before ``initialize``, used to register logger keys)."""
        return ()

    def extra_logged_term_names(self) -> Tuple[str, ...]:
        """Terms a subclass computes outside the loss wrapper (it puts ``train_<name>`` into train_step's output)."""
        return ()

    def build_topology_terms(self) -> Dict[str, Tuple[nn.Module, float]]:
        """name -> (loss module, weight); each module maps (logits, target label map) to a scalar."""
        return {}

    # ------------------------------------------------------------------ loss
    def _build_loss(self):
        seg_loss = super()._build_loss()
        terms = self.build_topology_terms()
        if set(terms) != set(self._topology_term_names):
            raise RuntimeError(f"build_topology_terms returned {sorted(terms)} but topology_term_names() declared "
                               f"{sorted(self._topology_term_names)}")
        self._full_weights = {name: float(w) for name, (_, w) in terms.items()}
        loss = TopologyLossWrapper(seg_loss, terms)
        if not self.topology_active():
            for name in self.phase_term_names():
                if name in loss.weights:
                    loss.weights[name] = 0.0
        return loss

    def _pop_term_values(self, split: str) -> Dict[str, float]:
        if not isinstance(self.loss, TopologyLossWrapper):
            return {}
        values = self.loss.pop_values()
        return {f"{split}_{k}": v for k, v in values.items() if k in self._topology_term_names}

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        out.update(self._pop_term_values("train"))
        return out

    def validation_step(self, batch: dict) -> dict:
        out = super().validation_step(batch)
        out.update(self._pop_term_values("val"))
        return out

    # ------------------------------------------------------------------ logging
    def _log_term_means(self, outputs: List[dict], split: str) -> None:
        for name in self._logged_term_names:
            key = f"{split}_{name}"
            values = [float(o[key]) for o in outputs if key in o and not np.isnan(o[key])]
            local_mean = float(np.mean(values)) if values else float("nan")
            if self.is_ddp:
                gathered = [None for _ in range(dist.get_world_size())]
                dist.all_gather_object(gathered, local_mean)
                gathered = [g for g in gathered if not np.isnan(g)]
                local_mean = float(np.mean(gathered)) if gathered else float("nan")
            self.logger.log(key, local_mean, self.current_epoch)

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        self._log_term_means(train_outputs, "train")

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        self._log_term_means(val_outputs, "val")

    def on_epoch_end(self):
        for name in self._logged_term_names:
            tr = self.logger.get_value(f"train_{name}", step=-1)
            va = self.logger.get_value(f"val_{name}", step=-1)
            self.print_to_log_file(f"{name}: train {np.round(tr, 5)}, val {np.round(va, 5)}")
        super().on_epoch_end()
        if self.local_rank == 0 and self._logged_term_names:
            try:
                self._plot_topology_progress()
            except Exception as e:  # plotting must never kill a training run
                self.print_to_log_file(f"could not write progress_topology.png: {e}")

    def _plot_topology_progress(self) -> None:
        from nnunet_topo.progress import plot_term_progress

        curves = {name: (self.logger.get_value(f"train_{name}", step=None),
                         self.logger.get_value(f"val_{name}", step=None)) for name in self._logged_term_names}
        plot_term_progress(curves, os.path.join(self.output_folder, "progress_topology.png"),
                           switch_epoch=self._switch_epoch if self.topology_start() > 0 else None)

    # ------------------------------------------------------------------ validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank != 0 or not self.evaluate_topology_after_validation:
            return
        from nnunet_topo.evaluation import compute_topology_metrics_on_folder

        validation_folder = os.path.join(self.output_folder, "validation")
        summary = compute_topology_metrics_on_folder(
            os.path.join(self.preprocessed_dataset_folder_base, "gt_segmentations"),
            validation_folder,
            self.dataset_json,
            self.plans_manager.plans,
            output_file=os.path.join(validation_folder, "summary_topology.json"),
            spec=self.topology_spec,
            chill=True,  # gt_segmentations holds every case, validation/ only this fold's
            show_progress=False,
        )
        topo = summary["topology_mean"]
        self.print_to_log_file(
            "Topology summary of the validation cases (validation/summary_topology.json): "
            f"TVS {topo['TVS']:.5f}, violation rate {topo['VR']:.3f}, "
            f"mean Betti error 3D {topo['betti_error_3d']:.3f}, topologically correct {topo['topologically_correct']:.3f}",
            also_print_to_console=True)
        # beside nnU-Net's final_val/* Dice: its logger's summary (W&B when nnUNet_wandb_enabled=1)
        for key, value in topo.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.logger.log_summary(f"final_val/topology_{key}", float(value))
