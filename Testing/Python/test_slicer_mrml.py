"""The Slicer side against Slicer's real MRML libraries (PyPI ``slicer-core``, no Qt, no mocks): the
cases of ``LiverTumorSegSlicer.mrml_cases`` (which the module's self-test also runs inside Slicer),
and a real flipped CT from the shared data."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from conftest import REPO

if os.environ.get("CI") == "true":
    import slicer  # noqa: F401 - CI must have slicer-core: fail, never skip
else:
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

sys.path.insert(0, str(REPO / "LiverTumorSeg"))

from LiverTumorSegLib.imageio import read_labels, read_volume  # noqa: E402
from LiverTumorSegSlicer import mrml, mrml_cases  # noqa: E402


@pytest.mark.parametrize("case", mrml_cases.CASES, ids=lambda case: case.__name__[len("case_"):])
def test_mrml_case(case, slicer_scene, tmp_path):
    case(slicer_scene, tmp_path)


def test_real_flipped_ct_lands_on_its_voxels(slicer_scene, shared_data, tmp_path):
    """LiTS volume-0 as Slicer exported it (direction diag(1, -1, -1))."""
    scene = slicer_scene
    ct = read_volume(shared_data("lits-volume0-ct/ct.nii.gz"))
    assert np.allclose(np.diag(ct.direction), (1, -1, -1))
    node = mrml.volume_node_from(scene, ct, "LiTS-0")
    back = mrml.volume_from_node(node)
    assert np.array_equal(back.array, ct.array) and np.allclose(back.ijk_to_lps(), ct.ijk_to_lps())
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[10:40, 200:300, 100:250] = 1  # an asymmetric block: any flip would move it
    labels[20:25, 220:240, 120:130] = 2
    seg = mrml.create_segmentation_node(node)
    mrml.SegmentWriter(seg, node).write(labels)
    storage = seg.CreateDefaultStorageNode()
    scene.AddNode(storage)
    seg.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(tmp_path / "lits0.seg.nrrd"))
    assert storage.WriteData(seg) == 1
    assert np.array_equal(read_labels(tmp_path / "lits0.seg.nrrd", ct).array, labels)
