"""The scripted module without the Slicer application: the Logic and the self-test class run on
slicer-core (real MRML, no Qt); every widget name the code uses exists in the .ui file."""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import REPO

if os.environ.get("CI") == "true":
    import slicer  # noqa: F401
else:
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

MODULE_DIR = REPO / "LiverTumorSeg"
sys.path.insert(0, str(MODULE_DIR))


def test_module_imports_without_qt_and_its_self_test_passes(slicer_scene, monkeypatch):
    import LiverTumorSeg

    monkeypatch.setenv("LIVERTUMORSEG_PYTHON", sys.executable)
    assert LiverTumorSeg.qt is None  # Logic and Test work without the Slicer application
    test = LiverTumorSeg.LiverTumorSegTest("test_segment_phantom_and_tune_live")
    result = test.defaultTestResult()
    test.run(result)
    assert result.wasSuccessful(), result.failures + result.errors


def test_the_self_test_runs_the_mrml_cases(slicer_scene):
    """The cases pytest runs on slicer-core (test_slicer_mrml.py) run through the module's self-test too,
    as they do inside Slicer, each on an emptied scene."""
    import LiverTumorSeg
    from LiverTumorSegSlicer import mrml_cases

    ran = []
    cases = mrml_cases.CASES
    try:
        mrml_cases.CASES = [lambda scene, folder, case=case: (ran.append(scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")),
                                                                   case(scene, folder)) for case in cases]
        test = LiverTumorSeg.LiverTumorSegTest("test_mrml_cases")
        result = test.defaultTestResult()
        test.run(result)
    finally:
        mrml_cases.CASES = cases
    assert result.wasSuccessful(), result.failures + result.errors
    assert ran == [0] * len(cases) and len(cases) >= 16


def test_failed_run_leaves_the_scene_as_it_was(slicer_scene, monkeypatch):
    import numpy as np

    import LiverTumorSeg
    from LiverTumorSegLib.phantom import generate_case
    from LiverTumorSegSlicer import mrml

    ct, _ = generate_case(7, spacing=(3.0, 3.0, 6.0), matrix=96)
    node = mrml.volume_node_from(slicer_scene, ct, "CT")
    logic = LiverTumorSeg.LiverTumorSegLogic()
    before = slicer_scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="Unknown model"):
        logic.segment(node, timeout=120, model="no-such-model", device="cpu", fast=True, python=sys.executable)
    assert slicer_scene.GetNumberOfNodes() == before and logic.work_dir is None
    labelmap = slicer_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    assert "labelmap" in logic.input_problem(labelmap)
    flat = mrml.volume_node_from(slicer_scene, ct.with_array(np.zeros_like(ct.array)), "empty")
    assert "same value" in logic.input_problem(flat)


def test_every_widget_name_the_code_uses_is_in_the_ui_file():
    source = (MODULE_DIR / "LiverTumorSeg.py").read_text(encoding="utf-8")
    used = set(re.findall(r"\bui\.(\w+)", source))
    declared = {w.get("name") for w in ET.parse(MODULE_DIR / "Resources" / "UI" / "LiverTumorSeg.ui").iter("widget")}
    assert used and used <= declared, sorted(used - declared)


def test_module_loads_before_the_cores_packages_are_installed():
    """Slicer imports the module before ``ensureDependencies`` can install torch, cc3d, MONAI, ...:
    with those blocked the module, its Logic and the input checks still work."""
    import subprocess

    blocked = ["torch", "cc3d", "monai", "slicerio", "scipy", "safetensors", "h5py", "matplotlib", "tqdm"]
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # import fails as if not installed
sys.path.insert(0, {str(MODULE_DIR)!r})
import slicer
import LiverTumorSeg
from LiverTumorSegSlicer import dependencies
scene = slicer.vtkMRMLScene()
node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
logic = LiverTumorSeg.LiverTumorSegLogic()
assert "labelmap" in logic.input_problem(node)
assert logic.model_problem("phantom-small") is None
print("loaded")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]


def test_a_new_run_into_an_edited_node_waits_for_an_answer(slicer_scene, monkeypatch):
    """finish raises EditedSegmentsError and keeps the result pending; overwrite writes it,
    discard drops it and leaves the user's segments as they were."""
    import numpy as np

    import LiverTumorSeg
    from LiverTumorSegLib.phantom import generate_case
    from LiverTumorSegSlicer import mrml

    ct, _ = generate_case(7, spacing=(3.0, 3.0, 6.0), matrix=96)
    node = mrml.volume_node_from(slicer_scene, ct, "CT")
    logic = LiverTumorSeg.LiverTumorSegLogic()
    options = dict(timeout=300, device="cpu", fast=True, python=sys.executable)
    seg = logic.segment(node, **options).seg_node
    liver = mrml.segment_mask(seg, "liver", ct.array.shape)
    assert liver.any()
    edited = liver.copy()
    edited[tuple(np.argwhere(liver)[0])] = False  # the user erases one liver voxel
    image = mrml._oriented_image(edited, mrml._box(liver), logic.live.writer.matrix)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg, "liver", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())
    nodes = slicer_scene.GetNumberOfNodes()
    for answer in ("keep", "replace"):
        logic.start(node, device="cpu", fast=True, python=sys.executable)
        assert logic.run.wait(300)[-1].returncode == 0
        with pytest.raises(mrml.ExistingResultError):  # the node holds the first result: asked first
            logic.finish(node, seg)
        assert logic.pending is None and logic.work_dir is not None  # nothing read yet
        with pytest.raises(mrml.EditedSegmentsError):
            logic.finish(node, seg, replace=True)
        assert logic.pending is not None and logic.work_dir is None  # read into memory, folder removed
        assert np.array_equal(mrml.segment_mask(seg, "liver", ct.array.shape), edited)
        if answer == "keep":
            logic.discard()
            assert logic.pending is None and logic.live is None
            assert np.array_equal(mrml.segment_mask(seg, "liver", ct.array.shape), edited)
        else:
            live = logic.finish(node, seg, overwrite_edited=True)
            assert logic.live is live and logic.pending is None
            assert np.array_equal(mrml.segment_mask(seg, "liver", ct.array.shape), liver)
    assert slicer_scene.GetNumberOfNodes() == nodes  # no node added or left behind
    other = mrml.volume_node_from(slicer_scene, ct, "another CT")
    logic.start(other, device="cpu", fast=True, python=sys.executable)
    assert logic.run.wait(300)[-1].returncode == 0
    with pytest.raises(mrml.NodeInputError, match="belongs to 'CT'"):  # never into the first CT's node
        logic.finish(other, seg)
    logic.discard()
    assert logic.work_dir is None and np.array_equal(mrml.segment_mask(seg, "liver", ct.array.shape), liver)


def test_slicers_pip_ensure_is_found_where_this_slicer_has_it(monkeypatch):
    """Recent Slicer has pip_ensure in slicer.pydeps, some versions in slicer.packaging; without it the panel
    installs with pip under its constraints file."""
    import types

    import LiverTumorSeg

    assert LiverTumorSeg._pip_ensure() is None  # slicer-core has neither
    for name in ("slicer.pydeps", "slicer.packaging"):
        module = types.ModuleType(name)
        module.pip_ensure = lambda *a, **k: None
        monkeypatch.setitem(sys.modules, name, module)
        assert LiverTumorSeg._pip_ensure() is module.pip_ensure
        monkeypatch.delitem(sys.modules, name)
    empty = types.ModuleType("slicer.packaging")  # a version whose packaging module has no pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", empty)
    assert LiverTumorSeg._pip_ensure() is None
