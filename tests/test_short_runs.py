"""The short-run mixin's CPU threads (``NNUNET_TOPO_CPU_THREADS``): several CPU trainings side by side."""
import pytest
import torch

from nnunet_topo.trainers.nnUNetTrainer_shortRuns import CPU_THREADS_ENV, ShortRunMixin, cpu_threads_from_env


class _Base:  # stands for the trainer the mixin sits on (only its __init__ signature matters here)
    def __init__(self, plans, configuration, fold, dataset_json, device):
        self.device = device


class _Short(ShortRunMixin, _Base):
    short_run = dict(num_epochs=3)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_variable_sets_the_threads_of_a_cpu_training_after_nnunet_set_its_own(threads, monkeypatch):
    monkeypatch.setenv(CPU_THREADS_ENV, "1")
    trainer = _Short({}, "3d_fullres", 0, {}, torch.device("cpu"))
    assert trainer.num_epochs == 3 and torch.get_num_threads() == 1


def test_unset_or_another_device_leaves_the_threads_alone(threads, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    _Short({}, "3d_fullres", 0, {}, torch.device("cpu"))
    assert torch.get_num_threads() == 2
    monkeypatch.setenv(CPU_THREADS_ENV, "1")
    cpu_threads_from_env(torch.device("cuda"))  # a GPU training: nnU-Net's choice (it sets 1 thread itself)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_value_is_refused_by_name(threads, monkeypatch, value):
    monkeypatch.setenv(CPU_THREADS_ENV, value)
    with pytest.raises(ValueError, match=f"{CPU_THREADS_ENV}="):
        cpu_threads_from_env(torch.device("cpu"))
    assert torch.get_num_threads() == 2
