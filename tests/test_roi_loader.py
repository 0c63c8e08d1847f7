"""The ROI data loader: nnU-Net's nnUNetDataLoader with patch placement on the mesh structures.

The loader is nnU-Net's (loading, cropping, padding, batching); the dataset is an in-memory stand-in with the
interface nnU-Net's datasets have (``identifiers``, ``load_case``)."""
import pickle

import numpy as np
import pytest

from nnunet_topo.roi import structure_box

LABELS = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}
MESH_IDS = [1, 2, 3]


class ArrayDataset:
    def __init__(self, cases):
        self.cases = cases
        self.identifiers = sorted(cases)

    def load_case(self, identifier):
        data, seg = self.cases[identifier]
        locs = {c: np.argwhere(seg == c)[:50] for c in (1, 2, 3)}  # nnU-Net samples class locations like this
        return data, seg, None, {"class_locations": locs}


def _cases(rng, n=6):
    cases = {}
    for i in range(n):
        shape = rng.integers([12, 50, 60], [30, 90, 100])
        seg = np.zeros((1, *shape), np.int16)
        size = rng.integers([3, 8, 8], [9, 20, 20])
        lo = [int(rng.integers(0, s - z + 1)) for s, z in zip(shape, size)]  # anywhere, corners included
        sl = tuple(slice(a, a + z) for a, z in zip(lo, size))
        block = rng.integers(1, 4, size=size)
        seg[(0,) + sl] = block
        seg[0, 0, 0, 0] = 0
        data = rng.normal(size=(1, *shape)).astype(np.float32)
        cases[f"case{i}"] = (data, seg)
    return cases


@pytest.mark.parametrize("initial_patch", [(10, 24, 24), (14, 32, 30)])
def test_patches_never_cut_a_mesh_structure(initial_patch):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_topo.roi_loader import MeshROIDataLoader

    rng = np.random.default_rng(0)
    cases = _cases(rng)
    boxes = {k: structure_box(s, MESH_IDS) for k, (_, s) in cases.items()}
    boxes.pop("case3")  # computed from the loaded segmentation when the trainer did not supply it
    final = (10, 24, 24)
    dl = MeshROIDataLoader(ArrayDataset(cases), 2, initial_patch, final, LabelManager(LABELS, None),
                           oversample_foreground_percent=0.33, mesh_boxes=boxes, mesh_label_ids=MESH_IDS)
    off = [(i - f) // 2 for i, f in zip(initial_patch, final)]
    np.random.seed(0)
    starts = {k: set() for k in cases}
    for _ in range(60):
        batch = dl.generate_train_batch()
        for j, key in enumerate(batch["keys"]):
            seg = batch["target"][j].numpy()
            assert seg.shape == (1, *initial_patch)
            central = seg[(0,) + tuple(slice(o, o + f) for o, f in zip(off, final))]
            whole = cases[key][1]
            # every mesh-structure voxel of the case, label by label, is inside the final (network) patch
            for c in MESH_IDS:
                assert (central == c).sum() == (whole == c).sum(), (key, c)
            starts[key].add(tuple(np.argwhere(np.isin(central, MESH_IDS)).min(0)))
    # the placement is random (not always centred), for every case drawn
    assert all(len(s) > 3 for s in starts.values() if s)
    # a structure that cannot fit is a clear error naming the case
    big = dict(cases)
    seg = np.zeros((1, 20, 60, 60), np.int16)
    seg[0, 2:18, 5:55, 5:20] = 1
    big["huge"] = (np.zeros((1, 20, 60, 60), np.float32), seg)
    dl2 = MeshROIDataLoader(ArrayDataset({"huge": big["huge"]}), 1, final, final, LabelManager(LABELS, None),
                            mesh_boxes={}, mesh_label_ids=MESH_IDS)
    with pytest.raises(ValueError, match="case huge.*patch \\[10, 24, 24\\].*nnUNetv2_topo_plan_mesh"):
        dl2.generate_train_batch()
    pickle.loads(pickle.dumps(dl))  # multiprocessing augmenters may pickle the loader


def test_case_without_mesh_structures_keeps_nnunet_placement():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_topo.roi_loader import MeshROIDataLoader

    seg = np.zeros((1, 12, 30, 30), np.int16)
    ds = ArrayDataset({"empty": (np.zeros((1, 12, 30, 30), np.float32), seg)})
    dl = MeshROIDataLoader(ds, 2, (8, 16, 16), (8, 16, 16), LabelManager(LABELS, None), mesh_boxes={},
                           mesh_label_ids=MESH_IDS)
    assert dl.generate_train_batch()["target"].shape == (2, 1, 8, 16, 16)


def test_roi_data_loaders_rebinds_and_restores_nnunet_name():
    import functools

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as m

    from nnunet_topo.roi_loader import MeshROIDataLoader, roi_data_loaders

    original = m.nnUNetDataLoader
    with pytest.raises(KeyError):
        with roi_data_loaders({"a": None}, MESH_IDS):
            assert isinstance(m.nnUNetDataLoader, functools.partial)
            assert m.nnUNetDataLoader.func is MeshROIDataLoader
            raise KeyError("boom")
    assert m.nnUNetDataLoader is original
