"""MRML side of LiverTumorSeg: volume node -> core arrays, core labels -> segmentation node.

Uses only Slicer's MRML and segmentation libraries (``slicer.vtkMRML...``, ``vtk``, numpy), so
it runs inside Slicer and, for tests, on the PyPI package ``slicer-core`` (real MRML, no Qt).

Data flows one way: ``volume_from_node`` gives the core a ``Volume``; the core's label array
(k, j, i) on that volume's grid comes back through ``SegmentWriter.write``, which edits only the
managed segments ("Liver", "Liver tumor", "Liver cyst") whose voxels changed, in place, with
bounding-box-cropped ``SetBinaryLabelmapToSegment`` calls.
"""

from __future__ import annotations

import hashlib

import numpy as np
import slicer
import vtk
from vtkmodules.util import numpy_support

from LiverTumorSegLib.terminology import SEGMENTS
from LiverTumorSegLib.volume import Volume

ATTRIBUTE_PREFIX = "LiverTumorSeg."
PARAMS_ATTRIBUTE = ATTRIBUTE_PREFIX + "PostProcessing"  # a result's post-processing settings (session.LiveResult)
SOURCE_VOLUME_ROLE = "LiverTumorSegSourceVolume"
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
MANAGED_IDS = tuple(spec["id"] for spec in SEGMENTS)


class NodeInputError(ValueError):
    """The selected node cannot be segmented; the message says why."""


# ---------------------------------------------------------------- matrices and arrays


def _to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _to_vtk(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _to_numpy(matrix)


def node_input_problem(volume_node) -> str | None:
    """Why this node cannot be a CT input, or None (the CT content itself is checked by the core)."""
    if volume_node is None:
        return "Select a CT volume."
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        return f"'{volume_node.GetName()}' is a labelmap, not a CT."
    vector = any(volume_node.IsA(c) for c in ("vtkMRMLVectorVolumeNode", "vtkMRMLTensorVolumeNode"))
    if vector or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        return f"'{volume_node.GetName()}' is not a scalar volume (RGB, vector or tensor volumes are not CT)."
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        return f"'{volume_node.GetName()}' has no voxels."
    if image.GetNumberOfScalarComponents() != 1:
        return f"'{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; a CT has one."
    return None


def volume_from_node(volume_node) -> Volume:
    """The node's voxels (k, j, i) and geometry as a core ``Volume`` (LPS, like ITK)."""
    problem = node_input_problem(volume_node)
    if problem:
        raise NodeInputError(problem)
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()
    m = ijk_to_ras(volume_node)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction_ras = m[:3, :3] / spacing
    return Volume(array, tuple(spacing), tuple(RAS_FROM_LPS @ m[:3, 3]), RAS_FROM_LPS @ direction_ras)


def volume_node_from(scene, volume: Volume, name: str):
    """A scalar volume node holding a core ``Volume`` (its voxels and geometry, converted to RAS)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_to_vtk(volume.ijk_to_ras()))
    array = np.ascontiguousarray(volume.array)
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[::-1])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        array.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype)))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    return node


def _oriented_image(mask: np.ndarray, box, matrix: vtk.vtkMatrix4x4, cropped: bool = False):
    """A uint8 vtkOrientedImageData of ``mask[box]`` (or of ``mask`` itself when ``cropped``: it
    is already the box's content) placed at the box's IJK extent."""
    ks, js, is_ = box
    image = slicer.vtkOrientedImageData()
    image.SetExtent(is_.start, is_.stop - 1, js.start, js.stop - 1, ks.start, ks.stop - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    content = mask if cropped else mask[box]
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(content, np.uint8).ravel()
    image.SetImageToWorldMatrix(matrix)
    return image


def _box(mask: np.ndarray):
    """Bounding box slices of a non-empty mask, or a 1-voxel box at the origin for an empty one."""
    found = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(f.size == 0 for f in found):
        return (slice(0, 1),) * 3
    return tuple(slice(int(f[0]), int(f[-1]) + 1) for f in found)


def fingerprint(mask: np.ndarray) -> str:
    """A short hash of a mask's voxels and bounding box (equal masks, equal fingerprints)."""
    box = _box(mask)
    h = hashlib.sha256(repr([(s.start, s.stop) for s in box]).encode())
    h.update(np.packbits(mask[box]).tobytes() if mask.any() else b"empty")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the segmentation node


def _set_identity(segment, spec: dict) -> None:
    segment.SetName(spec["name"])
    segment.SetColor(*(c / 255 for c in spec["color"]))
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), spec["terminology"])


def create_segmentation_node(volume_node, name: str | None = None):
    """A new segmentation node for results on ``volume_node``'s grid.

    Reference geometry and a node reference to the volume, the volume's parent transform, next to
    it in the subject hierarchy, the three managed segments (empty) with fixed IDs, names, colours
    and terminology, shown in 2-D and 3-D.
    """
    scene = volume_node.GetScene()
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} liver segmentation")
    seg_node.CreateDefaultDisplayNodes()
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    seg_node.SetNodeReferenceID(SOURCE_VOLUME_ROLE, volume_node.GetID())
    seg_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    segmentation = seg_node.GetSegmentation()
    segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    for spec in SEGMENTS:
        segmentation.AddEmptySegment(spec["id"], spec["name"])
        _set_identity(segmentation.GetSegment(spec["id"]), spec)
    _place_beside(seg_node, volume_node)
    display = seg_node.GetDisplayNode()
    display.SetVisibility2D(True)
    display.SetVisibility3D(True)
    return seg_node


def _place_beside(node, volume_node) -> None:
    """Put ``node`` under the volume's parent in the subject hierarchy (when there is one)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume_node.GetScene())
    if sh is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    if not volume_item:
        return
    parent, item = sh.GetItemParent(volume_item), sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:  # Slicer's application creates items for new nodes; MRML alone does not
        sh.CreateItem(parent, node)


def segment_mask(seg_node, segment_id: str, shape_kji) -> np.ndarray:
    """A segment's voxels on the reference grid (k, j, i), read from the node (exact, no resampling).

    The segment's labelmap must be on the reference geometry's lattice (ours always are).
    """
    image = slicer.vtkOrientedImageData()
    seg_node.GetBinaryLabelmapRepresentation(segment_id, image)
    out = np.zeros(shape_kji, bool)
    e = image.GetExtent()
    if e[1] < e[0] or image.GetPointData().GetScalars() is None:
        return out
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    part = values.reshape(e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1) > 0
    lo, hi = np.array([e[4], e[2], e[0]]), np.array([e[5], e[3], e[1]]) + 1
    clo, chi = np.maximum(lo, 0), np.minimum(hi, shape_kji)
    if np.any(chi <= clo):
        return out
    src = tuple(slice(a - b, c - b) for a, c, b in zip(clo, chi, lo))
    out[tuple(slice(a, c) for a, c in zip(clo, chi))] = part[src]
    return out


class SegmentWriter:
    """Writes core label arrays into one segmentation node's managed segments.

    Only segments whose voxels changed are touched, and only where they changed: a new segment
    (or one rewritten in full) is set from its bounding box (``MODE_REPLACE``); a later change
    inside the caller's ``box`` (where post-processing can change anything) sets just the box of
    the changed voxels (``MODE_MERGE_MIN`` then ``MODE_MERGE_MAX``, which leave the rest of the
    segment as it is; the segment first gets a labelmap layer of its own, since a merge into a
    shared layer changes the other segments in it). Segments the user added are never touched.

    User edits: before each write, every managed segment whose labelmap is no longer the object and
    modification time this writer left is compared, voxel for voxel, with what was written (the
    Segment Editor, Undo, ``ClearSegment``, a script editing the array: whatever changed it, and
    only a real change counts); an observer records the edits Slicer announces per segment, and
    ``flush_fingerprints`` stores a fingerprint of what was written on the node, so edits made
    while nothing observed (a reloaded scene) are found too. ``edited()`` reports them; ``write``
    refuses to overwrite them unless told to.
    """

    def __init__(self, seg_node, volume_node):
        self.seg_node, self.volume_node = seg_node, volume_node
        self.matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(self.matrix)
        dims = volume_node.GetImageData().GetDimensions()
        self.shape = tuple(dims[::-1])
        self._writing = False
        self._edited: set[str] = set(self._stored_edits())
        self._labels: np.ndarray | None = None  # what was last written
        self._stale: set[str] = set()  # segments whose stored fingerprint is out of date
        self._outside: dict = {}  # (segment, box) -> has voxels outside the box
        self._stamps: dict[str, tuple | None] = {}  # segment -> its labelmap's (object, time) after our last write
        segmentation = seg_node.GetSegmentation()
        self._observers = [segmentation.AddObserver(event, self._on_modified)
                           for event in (slicer.vtkSegmentation.SourceRepresentationModified, slicer.vtkSegmentation.SegmentRemoved)]

    def close(self) -> None:
        """Store the fingerprints and stop observing the node."""
        self.flush_fingerprints()
        segmentation = self.seg_node.GetSegmentation()
        for tag in self._observers:
            segmentation.RemoveObserver(tag)
        self._observers = []

    @vtk.calldata_type(vtk.VTK_STRING)
    def _on_modified(self, caller, event, segment_id=None):
        """Slicer names the segment for most edits; events without one (a shared layer, a whole
        segment) are left to the comparison in ``edited``."""
        if not self._writing and segment_id in MANAGED_IDS:
            self._edited.add(segment_id)
            self.seg_node.SetAttribute(ATTRIBUTE_PREFIX + "EditedSegments", ",".join(sorted(self._edited)))

    def _stored_edits(self) -> list[str]:
        text = self.seg_node.GetAttribute(ATTRIBUTE_PREFIX + "EditedSegments") or ""
        return [s for s in text.split(",") if s]

    def flush_fingerprints(self) -> None:
        """Store on the node a fingerprint of each segment written since the last flush (call it
        before the scene is saved; ``close`` does)."""
        for spec in SEGMENTS:
            if spec["id"] in self._stale:
                self.seg_node.SetAttribute(ATTRIBUTE_PREFIX + "Fingerprint." + spec["id"], fingerprint(self._labels == spec["label"]))
        self._stale.clear()

    def edited(self) -> list[str]:
        """Managed segments changed by something other than this writer since its last write to them.

        Seen by the observer while it ran, and otherwise (e.g. after the scene was saved and
        reloaded) by comparing each segment with the stored fingerprint of what was last written.
        """
        found = set(self._edited)
        if self._labels is not None:
            for spec in SEGMENTS:
                sid, stamp = spec["id"], self._stamp(spec["id"])
                if sid in found or stamp == self._stamps.get(sid):
                    continue
                if stamp is None or not np.array_equal(segment_mask(self.seg_node, sid, self.shape), self._labels == spec["label"]):
                    found.add(sid)
                else:  # touched (e.g. another segment of its layer), its voxels as written
                    self._stamps[sid] = stamp
            if found != self._edited:
                self._edited = found
                self.seg_node.SetAttribute(ATTRIBUTE_PREFIX + "EditedSegments", ",".join(sorted(found)))
            return sorted(found)
        for segment_id in MANAGED_IDS:
            stored = self.seg_node.GetAttribute(ATTRIBUTE_PREFIX + "Fingerprint." + segment_id)
            if segment_id in found or stored is None:
                continue
            if self.seg_node.GetSegmentation().GetSegment(segment_id) is None:
                found.add(segment_id)  # removed by the user
            elif fingerprint(segment_mask(self.seg_node, segment_id, self.shape)) != stored:
                found.add(segment_id)
        return sorted(found)

    def write(self, labels: np.ndarray, *, box=None, overwrite_edited: bool = False) -> list[str]:
        """Put ``labels`` (k, j, i; 1 liver, 2 tumor, 3 cyst) into the managed segments.

        ``box``: slices outside which ``labels`` equal the previous write (then only the box is
        compared). Returns the IDs written. Raises ``EditedSegmentsError`` when a segment to write
        was edited by the user, unless ``overwrite_edited``; a removed managed segment is re-created.
        """
        if labels.shape != self.shape:
            raise ValueError(f"labels {labels.shape} are not on the volume's grid {self.shape}")
        segmentation = self.seg_node.GetSegmentation()
        incremental = self._labels is not None
        box = box if incremental and box is not None else (slice(None),) * 3
        old, new = (self._labels[box] if incremental else None), labels[box]
        plan = {}  # segment -> None (write in full) or the box, within ``box``, of its changed voxels
        if incremental:
            differs = old != new
            inner = _box(differs) if differs.any() else None
            touched = set()
            if inner is not None:
                d = differs[inner]
                touched = set(np.unique(old[inner][d]).tolist()) | set(np.unique(new[inner][d]).tolist())
        for spec in SEGMENTS:
            sid, value = spec["id"], spec["label"]
            if not incremental or segmentation.GetSegment(sid) is None:
                plan[sid] = None
            elif value in touched:
                plan[sid] = inner
        conflicts = sorted(set(plan) & set(self.edited()))
        if conflicts and not overwrite_edited:
            raise EditedSegmentsError(conflicts)
        if incremental:
            self._labels[box] = new
        else:
            self._labels, self._outside = labels.copy(), {}
        self._writing = True
        try:
            for spec in SEGMENTS:
                sid = spec["id"]
                if sid not in plan:
                    continue
                if segmentation.GetSegment(sid) is None:
                    segmentation.AddEmptySegment(sid, spec["name"])
                    _set_identity(segmentation.GetSegment(sid), spec)
                if plan[sid] is None or sid in conflicts:
                    mask = self._labels == spec["label"]
                    self._set(sid, mask, _box(mask), LOGIC.MODE_REPLACE)
                elif not self._reaches_outside(sid, spec["label"], box):
                    local = self._labels[box] == spec["label"]  # the whole segment is in the box
                    inner = _box(local)
                    self._set(sid, local[inner], _shift(inner, box, self.shape), LOGIC.MODE_REPLACE, cropped=True)
                else:  # a large segment (the liver): set only the box of the changed voxels
                    self._own_layer(sid)
                    where = _shift(plan[sid], box, self.shape)
                    mask = self._labels[where] == spec["label"]
                    for mode in (LOGIC.MODE_MERGE_MIN, LOGIC.MODE_MERGE_MAX):
                        self._set(sid, mask, where, mode, cropped=True)
                self._edited.discard(sid)
                self._stale.add(sid)
        finally:
            self._writing = False
            self._stamps = {sid: self._stamp(sid) for sid in MANAGED_IDS}
        self.seg_node.SetAttribute(ATTRIBUTE_PREFIX + "EditedSegments", ",".join(sorted(self._edited)))
        return [spec["id"] for spec in SEGMENTS if spec["id"] in plan]

    def _stamp(self, sid: str) -> tuple | None:
        """The segment's binary labelmap as (object, modification time); None once the segment is gone.
        An edit modifies the labelmap, Undo replaces it: either changes this."""
        segment = self.seg_node.GetSegmentation().GetSegment(sid)
        if segment is None:
            return None
        image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        return (image.GetAddressAsString("vtkObject"), image.GetMTime()) if image is not None else ("none",)

    def _reaches_outside(self, sid: str, value: int, box) -> bool:
        """Whether the segment has voxels outside ``box`` (they never change there: counted once per box)."""
        key = (sid, tuple((b.start, b.stop) for b in _absolute(box, self.shape)))
        if key not in self._outside:
            inside = int(np.count_nonzero(self._labels[box] == value))
            self._outside[key] = int(np.count_nonzero(self._labels == value)) > inside
        return self._outside[key]

    def _own_layer(self, sid: str) -> None:
        """Give the segment a labelmap layer of its own (merges into a shared layer also change the
        segments sharing it); a no-op when it has one."""
        segmentation = self.seg_node.GetSegmentation()
        if len(segmentation.GetSegmentIDsForLayer(segmentation.GetLayerIndex(sid))) > 1:
            segmentation.SeparateSegmentLabelmap(sid)

    def _set(self, sid: str, mask: np.ndarray, where, mode, cropped: bool = False) -> None:
        """Set ``mask`` (a full-size mask, or with ``cropped`` the content of ``where``) at the extent ``where``."""
        image = _oriented_image(mask, where, self.matrix, cropped=cropped)
        if not LOGIC.SetBinaryLabelmapToSegment(image, self.seg_node, sid, mode, image.GetExtent()):
            raise RuntimeError(f"Slicer did not accept the update of segment '{sid}'.")


LOGIC = slicer.vtkSlicerSegmentationsModuleLogic


def _absolute(box, shape) -> tuple[slice, slice, slice]:
    """Slices with explicit start and stop."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, shape))


def _shift(inner, box, shape) -> tuple[slice, slice, slice]:
    """``inner`` (slices relative to ``box``) in whole-volume indices."""
    return tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(_absolute(box, shape), inner))


def bound_volume(seg_node):
    """The volume node a segmentation node was made for (ours: the source-volume reference; any
    other: its reference geometry's volume), or None when it names none."""
    return seg_node.GetNodeReference(SOURCE_VOLUME_ROLE) or seg_node.GetNodeReference(
        seg_node.GetReferenceImageGeometryReferenceRole())


def output_problem(volume_node, seg_node) -> str | None:
    """Why the result for ``volume_node`` cannot go into ``seg_node`` (made for another volume), or None."""
    if seg_node is None or volume_node is None:
        return None
    other = bound_volume(seg_node)
    if other is not None and other is not volume_node:
        return (f"The output segmentation '{seg_node.GetName()}' belongs to '{other.GetName()}', not to "
                f"'{volume_node.GetName()}': choose 'Create new segmentation' or one made for this volume.")
    return None


def holds_result(seg_node) -> bool:
    """Whether the node shows a LiverTumorSeg result (its settings are stored on it)."""
    return seg_node.GetAttribute(PARAMS_ATTRIBUTE) is not None


class ExistingResultError(RuntimeError):
    """The chosen segmentation node already holds a result, which the new one would replace."""

    def __init__(self, seg_node):
        super().__init__(f"'{seg_node.GetName()}' already holds a LiverTumorSeg result; the new result would "
                         "replace it, with its settings and region decisions.")


class EditedSegmentsError(RuntimeError):
    """Segments the user edited would be overwritten; ``segment_ids`` names them."""

    def __init__(self, segment_ids):
        self.segment_ids = list(segment_ids)
        names = ", ".join(spec["name"] for spec in SEGMENTS if spec["id"] in self.segment_ids)
        super().__init__(f"You edited {names}; updating would replace your edits.")


# ---------------------------------------------------------------- the panel's choices, saved with the scene

MODULE_NAME = "LiverTumorSeg"
INPUT_ROLE, OUTPUT_ROLE = "InputVolume", "OutputSegmentation"


def parameter_node(scene):
    """The scene's LiverTumorSeg parameter node, created when missing: a singleton (tag MODULE_NAME),
    as Slicer's own modules keep theirs, so a scene imported into one that has it merges into it."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # the scene holds the only reference
        node.SetSingletonTag(MODULE_NAME)
        node.SetName(MODULE_NAME)
        node.SetAttribute("ModuleName", MODULE_NAME)
        node = scene.AddNode(node)
    return node


KEEP = object()  # save_choices: leave this choice as stored


def save_choices(scene, *, volume_node=KEEP, seg_node=KEEP, model: str | None = None, device: str | None = None,
                 fast: bool | None = None, tta: bool | None = None) -> None:
    """Store the panel's choices in the parameter node (they are saved with the scene); a node given
    as None (e.g. "Create new segmentation") clears the stored one."""
    node = parameter_node(scene)
    for role, given in ((INPUT_ROLE, volume_node), (OUTPUT_ROLE, seg_node)):
        if given is not KEEP:
            node.SetNodeReferenceID(role, None if given is None else given.GetID())
    for key, value in (("Model", model), ("Device", device), ("Fast", fast), ("Tta", tta)):
        if value is not None:
            node.SetParameter(key, str(bool(value)) if key in ("Fast", "Tta") else value)


def load_choices(scene) -> dict:
    """The stored choices: volume and segmentation nodes (or None), model, device, fast, tta (on unless stored off)."""
    node = parameter_node(scene)
    return {"volume_node": node.GetNodeReference(INPUT_ROLE), "seg_node": node.GetNodeReference(OUTPUT_ROLE),
            "model": node.GetParameter("Model") or None, "device": node.GetParameter("Device") or "auto",
            "fast": node.GetParameter("Fast") == "True", "tta": node.GetParameter("Tta") != "False"}
