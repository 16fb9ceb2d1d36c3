"""The Slicer side against Slicer's real MRML libraries (PyPI ``slicer-core``, no Qt, no mocks):
volume nodes to core volumes and back, the segmentation node, in-place segment updates, user
segments and user edits, and geometry for every axis flip, an oblique volume and a real flipped CT."""

from __future__ import annotations

import itertools
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
from LiverTumorSegLib.phantom import generate_case  # noqa: E402
from LiverTumorSegLib.terminology import SEGMENTS  # noqa: E402
from LiverTumorSegLib.volume import Volume  # noqa: E402
from LiverTumorSegSlicerLib import mrml  # noqa: E402


@pytest.fixture
def scene():
    """A scene set up as Slicer sets it up (the segmentations logic registers the converters)."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = []
    for cls in (slicer.vtkSlicerSegmentationsModuleLogic, slicer.vtkSlicerSubjectHierarchyModuleLogic):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        logics.append(logic)
    yield scene
    scene.Clear(1)


def _rotation(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


FLIPS = list(itertools.product((1, -1), repeat=3))


def _small_case(direction: np.ndarray) -> tuple[Volume, np.ndarray]:
    ct, labels = generate_case(4242, spacing=(3.0, 3.0, 6.0), matrix=96, orientation=False)
    return Volume(ct.array, (0.9, 1.3, 2.5), (12.5, -40.0, 77.0), direction), labels.array


@pytest.mark.parametrize("flips", FLIPS, ids=lambda f: "".join("+" if x > 0 else "-" for x in f))
def test_geometry_round_trip_for_every_flip_and_oblique(scene, flips, tmp_path):
    direction = _rotation(17.0) @ np.diag(flips)
    ct, labels = _small_case(direction)
    node = mrml.volume_node_from(scene, ct, "CT")
    back = mrml.volume_from_node(node)
    assert np.array_equal(back.array, ct.array)
    np.testing.assert_allclose(back.ijk_to_lps(), ct.ijk_to_lps(), atol=1e-9)

    seg = mrml.create_segmentation_node(node)
    mrml.SegmentWriter(seg, node).write(labels)
    for spec in SEGMENTS:
        assert np.array_equal(mrml.segment_mask(seg, spec["id"], labels.shape), labels == spec["label"]), spec["id"]
    # through Slicer's own .seg.nrrd writer, read back by the core (slicerio, LPS on disk)
    path = tmp_path / "s.seg.nrrd"
    storage = seg.CreateDefaultStorageNode()
    scene.AddNode(storage)
    seg.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.WriteData(seg) == 1
    assert np.array_equal(read_labels(path, ct).array, labels)


def test_real_flipped_ct_lands_on_its_voxels(scene, shared_data, tmp_path):
    """LiTS volume-0 as Slicer exported it (direction diag(1, -1, -1))."""
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


def test_segmentation_node_is_set_up_like_a_slicer_user_expects(scene):
    ct, _ = _small_case(np.eye(3))
    node = mrml.volume_node_from(scene, ct, "CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateFolderItem(sh.GetSceneItemID(), "Study")
    sh.CreateItem(study, node)  # the Slicer application does this when a volume is loaded

    seg = mrml.create_segmentation_node(node)
    assert seg.GetName() == "CT liver segmentation"
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == node.GetID()
    assert seg.GetTransformNodeID() == transform.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == [s["id"] for s in SEGMENTS]
    for spec in SEGMENTS:
        segment = segmentation.GetSegment(spec["id"])
        assert segment.GetName() == spec["name"]
        assert np.allclose(segment.GetColor(), [c / 255 for c in spec["color"]])
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        import vtk

        tag = vtk.reference("")
        segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
        assert tag.get() == spec["terminology"]
    assert seg.GetDisplayNode().GetVisibility2D() and seg.GetDisplayNode().GetVisibility3D()


def test_updates_touch_only_changed_managed_segments(scene):
    ct, labels = _small_case(np.eye(3))
    node = mrml.volume_node_from(scene, ct, "CT")
    seg = mrml.create_segmentation_node(node)
    writer = mrml.SegmentWriter(seg, node)
    assert writer.write(labels) == [s["id"] for s in SEGMENTS]
    # a segment the user added
    note = np.zeros(labels.shape, bool)
    note[2:5, 10:20, 10:20] = True
    user_id = seg.GetSegmentation().AddEmptySegment("my_note", "My note")
    image = mrml._oriented_image(note, mrml._box(note), writer.matrix)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg, user_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())
    # a post-processing change: some liver voxels become tumor
    changed = labels.copy()
    liver = np.argwhere(labels == 1)
    for k, j, i in liver[:50]:
        changed[k, j, i] = 2
    assert writer.write(changed) == ["liver", "liver_tumor"]
    for spec in SEGMENTS:
        assert np.array_equal(mrml.segment_mask(seg, spec["id"], labels.shape), changed == spec["label"])
    assert np.array_equal(mrml.segment_mask(seg, user_id, labels.shape), note)
    assert writer.write(changed) == []
    # a cyst appears, then goes: an emptied segment is emptied in the node too
    with_cyst = changed.copy()
    for k, j, i in np.argwhere(changed == 1)[100:140]:
        with_cyst[k, j, i] = 3
    assert writer.write(with_cyst) == ["liver", "liver_cyst"]
    assert mrml.segment_mask(seg, "liver_cyst", labels.shape).sum() == 40
    assert writer.write(np.where(with_cyst == 3, 1, with_cyst)) == ["liver", "liver_cyst"]
    assert not mrml.segment_mask(seg, "liver_cyst", labels.shape).any()


def test_user_edits_are_detected_and_not_overwritten_without_consent(scene):
    ct, labels = _small_case(np.eye(3))
    node = mrml.volume_node_from(scene, ct, "CT")
    seg = mrml.create_segmentation_node(node)
    writer = mrml.SegmentWriter(seg, node)
    writer.write(labels)
    assert writer.edited() == []
    # the user paints into the tumor segment (as the Segment Editor does)
    paint = labels == 2
    paint[tuple(np.argwhere(labels == 1)[0])] = True
    image = mrml._oriented_image(paint, mrml._box(paint), writer.matrix)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg, "liver_tumor", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())
    assert writer.edited() == ["liver_tumor"]
    changed = labels.copy()  # an update that rewrites the liver and tumor segments
    for k, j, i in np.argwhere(labels == 1)[200:230]:
        changed[k, j, i] = 2
    with pytest.raises(mrml.EditedSegmentsError, match="Liver tumor"):
        writer.write(changed)
    assert np.array_equal(mrml.segment_mask(seg, "liver_tumor", labels.shape), paint)  # untouched
    assert writer.write(changed, overwrite_edited=True) == ["liver", "liver_tumor"]
    assert writer.edited() == []
    # an edit made while no writer observed (e.g. a reloaded scene) is found by fingerprint
    writer.close()
    image = mrml._oriented_image(labels == 1, mrml._box(labels == 1), writer.matrix)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg, "liver_cyst", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())
    assert mrml.SegmentWriter(seg, node).edited() == ["liver_cyst"]


def test_nodes_that_are_not_a_ct_are_refused(scene):
    assert "Select" in mrml.node_input_problem(None)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    assert "labelmap" in mrml.node_input_problem(labelmap)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert "no voxels" in mrml.node_input_problem(empty)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    assert "not a scalar volume" in mrml.node_input_problem(rgb)
    with pytest.raises(mrml.NodeInputError):
        mrml.volume_from_node(labelmap)


# ---------------------------------------------------------------- live post-processing


def _lesion_case(scene, direction=np.eye(3)):
    """A phantom with tumors and cysts; the network output stands in as the truth's lesions."""
    from LiverTumorSegLib.pipeline import Probabilities
    from LiverTumorSegSlicerLib.session import LiveResult

    ct, labels = generate_case(2006, spacing=(1.6, 1.6, 3.0), matrix=240, orientation=False)
    ct = Volume(ct.array, ct.spacing, ct.origin, direction)
    raw = np.where(labels.array >= 2, 2, labels.array).astype(np.uint8)
    tumor = np.where(labels.array >= 2, 255, 0).astype(np.uint8)
    probs = Probabilities(np.where(labels.array > 0, 255, 0).astype(np.uint8), tumor, (slice(None),) * 3)
    node = mrml.volume_node_from(scene, ct, "CT")
    seg = mrml.create_segmentation_node(node)
    return LiveResult(node, seg, raw, probs), labels.array


def test_live_post_processing_writes_what_the_core_computes(scene):
    from LiverTumorSegLib.postprocess import PostParams

    live, truth = _lesion_case(scene, _rotation(8.0) @ np.diag((1, -1, 1)))
    assert set(live.update()) == {"liver", "liver_tumor", "liver_cyst"}
    assert {r["decision"] for r in live.rows} >= {"tumor", "cyst"}, "the case needs both kinds of lesion"
    shape = live.labels.shape
    for spec in SEGMENTS:
        assert np.array_equal(mrml.segment_mask(live.seg_node, spec["id"], shape), live.labels == spec["label"])
    # a slider move: everything becomes tumor below a high threshold ... and segments follow
    expected, _ = live.processor.apply(PostParams(cyst_threshold_hu=-50.0), {})
    live.update(PostParams(cyst_threshold_hu=-50.0))
    assert np.array_equal(live.labels, expected)
    assert not mrml.segment_mask(live.seg_node, "liver_cyst", shape).any()
    # flipping a region by hand survives slider moves
    region = live.rows[0]["id"]
    live.set_decision(region, "cyst")
    for threshold in (-50.0, 45.0, 120.0):
        live.update(PostParams(cyst_threshold_hu=threshold))
        row = next(r for r in live.rows if r["id"] == region)
        assert row["decision"] == "cyst" and row["override"] == "cyst"
        assert np.array_equal(mrml.segment_mask(live.seg_node, "liver_cyst", shape), live.labels == 3)
    live.set_decision(region, None)
    assert next(r for r in live.rows if r["id"] == region)["override"] is None


def test_settings_and_decisions_are_stored_on_the_node(scene):
    from LiverTumorSegLib.postprocess import PostParams
    from LiverTumorSegSlicerLib.session import LiveResult, _stored_overrides, _stored_params

    live, _ = _lesion_case(scene)
    live.update(PostParams(cyst_threshold_hu=60.0, dilate_iterations=1))
    region = live.rows[-1]["id"]
    live.set_decision(region, "tumor")
    assert _stored_params(live.seg_node) == PostParams(cyst_threshold_hu=60.0, dilate_iterations=1)
    assert _stored_overrides(live.seg_node, live.processor.region_ids) == {region: "tumor"}
    hist = live.histogram(region)
    assert hist["hu"].shape == hist["histogram"].shape == hist["fit"].shape and hist["threshold_hu"] == 60.0
    x, y, z = live.region_centre_ras(region)
    assert np.isfinite([x, y, z]).all()


def test_live_update_asks_before_overwriting_a_users_edit(scene):
    from LiverTumorSegLib.postprocess import PostParams

    live, _ = _lesion_case(scene)
    live.update()
    cyst = mrml.segment_mask(live.seg_node, "liver_cyst", live.labels.shape)
    cyst[tuple(np.argwhere(live.labels == 1)[0])] = True  # the user paints one voxel of cyst
    image = mrml._oriented_image(cyst, mrml._box(cyst), live.writer.matrix)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, live.seg_node, "liver_cyst", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())
    with pytest.raises(mrml.EditedSegmentsError):
        live.update(PostParams(cyst_threshold_hu=-50.0))  # would empty the cyst segment
    assert np.array_equal(mrml.segment_mask(live.seg_node, "liver_cyst", live.labels.shape), cyst)
    live.update(PostParams(cyst_threshold_hu=-50.0), overwrite_edited=True)
    assert not mrml.segment_mask(live.seg_node, "liver_cyst", live.labels.shape).any()


def test_region_histogram_becomes_a_slicer_plot(scene):
    live, _ = _lesion_case(scene)
    live.update()
    region = live.rows[0]["id"]
    chart = live.histogram_chart(region)
    assert chart.GetNumberOfPlotSeriesNodes() == 2 and f"Region {region}" in chart.GetTitle()
    table = chart.GetNthPlotSeriesNode(0).GetTableNode().GetTable()
    hist = live.histogram(region)
    assert table.GetNumberOfRows() == hist["hu"].size and table.GetNumberOfColumns() == 3
    again = live.histogram_chart(live.rows[-1]["id"])
    assert again.GetID() == chart.GetID() and scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 2


def test_any_sequence_of_slider_moves_keeps_segments_exact(scene):
    from LiverTumorSegLib.postprocess import PostParams

    live, _ = _lesion_case(scene, np.diag((-1, 1, -1)))
    live.update()
    rng = np.random.default_rng(0)
    shape = live.labels.shape
    for _ in range(12):
        params = PostParams(cyst_filter=bool(rng.random() < 0.8), cyst_threshold_hu=float(rng.uniform(-20, 120)),
                            dilate_iterations=int(rng.integers(0, 4)), dilate_max_area_px=int(rng.integers(0, 1000)))
        live.update(params)
        for spec in SEGMENTS:
            assert np.array_equal(mrml.segment_mask(live.seg_node, spec["id"], shape), live.labels == spec["label"]), (params, spec["id"])


def test_choices_settings_and_decisions_survive_scene_save_and_reload(scene, tmp_path):
    import os

    from LiverTumorSegLib.postprocess import PostParams
    from LiverTumorSegSlicerLib.session import _stored_overrides, _stored_params

    live, _ = _lesion_case(scene)
    live.update(PostParams(cyst_threshold_hu=70.0))
    region = live.rows[0]["id"]
    live.set_decision(region, "cyst")
    labels = live.labels.copy()
    mrml.save_choices(scene, volume_node=live.volume_node, seg_node=live.seg_node, model="phantom-small", device="cpu", fast=True)
    live.close()  # what the widget does before the scene is saved
    for node, name in ((live.volume_node, "ct.nrrd"), (live.seg_node, "seg.seg.nrrd")):
        storage = node.CreateDefaultStorageNode()
        scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
        storage.SetFileName(str(tmp_path / name))
        assert storage.WriteData(node) == 1
    scene.SetRootDirectory(str(tmp_path))
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit() == 1

    again = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(again)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(again)
    again.SetURL(str(tmp_path / "scene.mrml"))
    assert again.Connect() == 1
    choices = mrml.load_choices(again)
    assert (choices["model"], choices["device"], choices["fast"]) == ("phantom-small", "cpu", True)
    seg, volume = choices["seg_node"], choices["volume_node"]
    assert volume.GetName() == "CT" and seg.GetName() == "CT liver segmentation"
    assert _stored_params(seg).cyst_threshold_hu == 70.0
    assert _stored_overrides(seg, [region]) == {region: "cyst"}
    for spec in SEGMENTS:
        assert np.array_equal(mrml.segment_mask(seg, spec["id"], labels.shape), labels == spec["label"])
    writer = mrml.SegmentWriter(seg, volume)
    assert writer.edited() == []
    # an edit after reloading, made while no writer watched, is still found
    writer.close()
    empty = np.zeros(labels.shape, bool)
    image = mrml._oriented_image(empty, (slice(0, 1),) * 3, writer.matrix)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg, "liver_tumor", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())
    assert mrml.SegmentWriter(seg, volume).edited() == ["liver_tumor"]
    assert os.path.isfile(tmp_path / "scene.mrml")
