"""Fast checks of the nnU-Net glue: trainer lookup through nnUNet_extTrainer, the loss wrapper on nnU-Net's own
deep-supervised loss, and the trainer-path helper. The full training path runs in test_integration_nnunet.py."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunet_topo.losses.combined import TopologyLossWrapper
from nnunet_topo.losses.projected_pooling import ProjectedPoolingLoss
from nnunet_topo.trainers import TRAINER_DIR


@pytest.mark.parametrize("name", ["nnUNetTrainerProjPool", "nnUNetTrainerProjPool_demo", "nnUNetTrainerTopoBase"])
def test_nnunet_finds_our_trainers_through_extTrainer(name, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_DIR)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(name)
    assert cls.__name__ == name
    assert issubclass(cls, nnUNetTrainer)


def test_unknown_trainer_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_DIR)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer"):
        recursive_find_trainer_class_by_name("nnUNetTrainerDoesNotExist")


def test_trainer_path_cli_keeps_existing_entries():
    env = dict(os.environ, nnUNet_extTrainer=os.pathsep.join(["/some/other", TRAINER_DIR]))
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_topo_trainer_path")
    out = subprocess.run([exe], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(os.pathsep) == ["/some/other", TRAINER_DIR]
    env.pop("nnUNet_extTrainer")
    out = subprocess.run([exe], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == TRAINER_DIR


def _ds_loss():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    w = np.array([1, 0.5, 0.0])
    return DeepSupervisionWrapper(loss, w / w.sum())


def test_wrapper_adds_weighted_term_on_full_resolution_only():
    torch.manual_seed(0)
    seg = _ds_loss()
    outputs = [torch.randn(2, 3, 8, 8, 8, requires_grad=True), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)]
    targets = [torch.randint(0, 3, (2, 1, 8, 8, 8)).float(), torch.randint(0, 3, (2, 1, 4, 4, 4)).float(),
               torch.randint(0, 3, (2, 1, 2, 2, 2)).float()]
    pp = ProjectedPoolingLoss()
    wrapped = TopologyLossWrapper(seg, {"projpool": (pp, 0.7)})
    total = wrapped(outputs, targets)
    expected = seg(outputs, targets) + 0.7 * pp(outputs[0], targets[0])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    values = wrapped.pop_values()
    assert set(values) == {"seg", "projpool"}
    assert values["projpool"] == pytest.approx(pp(outputs[0], targets[0]).item(), rel=1e-6)
    assert wrapped.pop_values() == {}
    total.backward()
    assert outputs[0].grad is not None


def test_wrapper_zero_weight_skips_term_and_negative_weight_is_rejected():
    seg = _ds_loss()
    outputs = [torch.randn(1, 3, 4, 4, 4)] * 3
    targets = [torch.zeros(1, 1, 4, 4, 4)] * 3
    wrapped = TopologyLossWrapper(seg, {"projpool": (ProjectedPoolingLoss(), 0.0)})
    assert wrapped(outputs, targets).item() == pytest.approx(seg(outputs, targets).item())
    with pytest.raises(ValueError, match="must be >= 0"):
        TopologyLossWrapper(seg, {"projpool": (ProjectedPoolingLoss(), -1.0)})


def test_semi_supervised_requires_whole_volume_in_patch():
    from nnunet_topo.patches import check_whole_volume_in_patch

    check_whole_volume_in_patch([("a", (10, 60, 64)), ("b", (12, 64, 64))], [12, 64, 64])
    with pytest.raises(RuntimeError, match=r"whole structure in view.*\('c', \[14, 64, 64\]\)"):
        check_whole_volume_in_patch([("a", (10, 60, 64)), ("c", (14, 64, 64))], [12, 64, 64])


def test_center_pad_to_places_like_nnunet_and_keeps_channels():
    import numpy as np

    from nnunet_topo.patches import cases_larger_than_patch, center_pad_to

    a = np.arange(2 * 3 * 5 * 4).reshape(2, 3, 5, 4)  # (C, Z, Y, X)
    out = center_pad_to(a, (6, 5, 3))
    assert out.shape == (2, 6, 5, 3)
    # Z: need 3 -> 1 before (need // 2), 2 after; Y fits; X is 4 > 3 -> centre crop starting at (4 - 3) // 2 = 0
    assert np.array_equal(out[:, 1:4, :, :], a[:, :, :, 0:3])
    assert not out[:, 0].any() and not out[:, 4:].any()
    assert cases_larger_than_patch([("a", (3, 5, 4)), ("b", (3, 6, 4))], (3, 5, 4)) == [("b", [3, 6, 4])]
