"""The two-phase schedule of the topology trainers (issue 27, documentation/trainers.md "Schedule").

The papers train in two phases (Fu: "pre-train for 150 epochs [Dice]; (2) fine tuning for the same number of
epochs"; Clough: first "trained in a supervised manner"; TPM: "we first optimize the model using Dice + L_occ before
introducing L_TP"). :class:`TwoPhaseSchedule` (a mixin of ``nnUNetTrainerTopoBase``): nnU-Net's own loss alone until
``topology_start_epoch`` (None: the trainer's :meth:`default_topology_start_epoch`) or an earlier readiness
(:meth:`topology_phase_ready`, the mesh trainers: the meshes fit), then the terms of :meth:`phase_term_names`; in the
first phase their weight is 0 (not computed, logged NaN); the switch is logged and drawn in progress_topology.png;
``--c`` resumes on either side (the epoch and the logged values are checkpointed). nnU-Net glue.
"""
from __future__ import annotations

from typing import Optional, Tuple

from nnunet_topo.losses.combined import TopologyLossWrapper

__all__ = ["TwoPhaseSchedule"]


class TwoPhaseSchedule:
    """Trainer mixin: the two-phase schedule (module docstring)."""

    #: first epoch of the topology phase (None: :meth:`default_topology_start_epoch`); 0 starts with the terms on
    #: (the ``_finetune`` variants, for a start from a trained model with ``-pretrained_weights``)
    topology_start_epoch: Optional[int] = None

    def default_topology_start_epoch(self) -> int:
        """The paper's first phase, in epochs (0 here: a subclass sets its paper's)."""
        return 0

    def topology_start(self) -> int:
        start = self.default_topology_start_epoch() if self.topology_start_epoch is None else self.topology_start_epoch
        return max(int(start), 0)

    def topology_phase_ready(self) -> bool:
        """An earlier switch than ``topology_start`` (the mesh trainers: when the meshes fit); False here."""
        return False

    def topology_active(self) -> bool:
        """Whether the topology terms are on in the current epoch."""
        return self.current_epoch >= self.topology_start() or self.topology_phase_ready()

    def phase_term_names(self) -> Tuple[str, ...]:
        """The terms switched on by the schedule (default: every topology term of the loss)."""
        return self._topology_term_names

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        active = self.topology_active()
        if isinstance(getattr(self, "loss", None), TopologyLossWrapper):
            for name in self.phase_term_names():
                if name in self._full_weights:
                    self.loss.weights[name] = self._full_weights[name] if active else 0.0
        if active and self._switch_epoch is None and self.phase_term_names():
            self._switch_epoch = self.current_epoch
            self.print_to_log_file(f"topology terms {list(self.phase_term_names())} on from epoch {self.current_epoch}"
                                   f" (schedule: start epoch {self.topology_start()})", also_print_to_console=True)

    @property
    def _switch_epoch(self) -> Optional[int]:
        """First epoch with the topology terms on, from the logged term values (restored by ``--c``)."""
        if getattr(self, "_switch_epoch_cache", None) is not None:
            return self._switch_epoch_cache
        local = self.logger.local_logger.my_fantastic_logging
        for name in self.phase_term_names():
            for e, v in enumerate(local.get(f"train_{name}", [])):
                if v == v:  # not NaN
                    return e
        return None

    @_switch_epoch.setter
    def _switch_epoch(self, epoch: Optional[int]) -> None:
        self._switch_epoch_cache = epoch
