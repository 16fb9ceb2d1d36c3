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
