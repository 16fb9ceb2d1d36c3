"""A segmentation result the user tunes live: the cached network output, the core's
post-processing, and the segmentation node it keeps up to date (MRML, no Qt).

Moving a slider calls ``update``: the core re-derives labels from its cache (no network) and
``SegmentWriter`` rewrites only the segments that changed. Settings and manual decisions are
stored on the segmentation node, so they are saved with the scene. A new run into the same node
keeps the settings but starts with no manual decisions: region numbers belong to one run.
A change the user refuses (it would overwrite their edits) leaves everything as it was.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import slicer
import vtk

from LiverTumorSegLib.imageio import read_labels
from LiverTumorSegLib.pipeline import Probabilities
from LiverTumorSegLib.postprocess import PostParams, PostProcessor, gaussian

from . import mrml

PARAMS_ATTRIBUTE = mrml.PARAMS_ATTRIBUTE
OVERRIDES_ATTRIBUTE = mrml.ATTRIBUTE_PREFIX + "Overrides"


class LiveResult:
    """The network output of one run on one volume node, and the segmentation node showing it."""

    def __init__(self, volume_node, seg_node, raw_labels: np.ndarray, probabilities: Probabilities, report: dict | None = None):
        self.volume_node, self.seg_node, self.report = volume_node, seg_node, report or {}
        self.volume = mrml.volume_from_node(volume_node)
        self.processor = PostProcessor.from_network(self.volume, raw_labels, probabilities)
        self.writer = mrml.SegmentWriter(seg_node, volume_node)
        self.params = _stored_params(seg_node)
        self.overrides: dict[int, str] = {}
        self._applied: dict[int, str] = {}  # the decisions the node shows
        self.labels, self.rows = None, []

    @classmethod
    def from_folder(cls, volume_node, seg_node, folder: Path) -> "LiveResult":
        """Read what the child process wrote (labels.nii.gz, probabilities.npz, report.json)."""
        folder = Path(folder)
        volume = mrml.volume_from_node(volume_node)
        raw = read_labels(folder / "labels.nii.gz", volume).array
        report = json.loads((folder / "report.json").read_text(encoding="utf-8")) if (folder / "report.json").is_file() else {}
        return cls(volume_node, seg_node, raw, Probabilities.load(folder / "probabilities.npz"), report)

    def update(self, params: PostParams | None = None, *, overwrite_edited: bool = False) -> list[str]:
        """Apply ``params`` (default: the current ones) and the manual decisions; returns the
        rewritten segment IDs. ``mrml.EditedSegmentsError`` when it would overwrite user edits
        (then nothing changes)."""
        params = params or self.params
        labels, rows = self.processor.apply(params, self.overrides, out=self.labels)
        try:
            changed = self.writer.write(labels, box=self.processor.active_box or (slice(0, 0),) * 3,
                                        overwrite_edited=overwrite_edited)
        except Exception:
            if self.labels is not None:  # the core wrote into the shown labels: put them back
                self.processor.apply(self.params, self._applied, out=self.labels)
            raise
        self.params, self.labels, self.rows, self._applied = params, labels, rows, dict(self.overrides)
        self.seg_node.SetAttribute(PARAMS_ATTRIBUTE, json.dumps(dataclasses.asdict(params)))
        self.seg_node.SetAttribute(OVERRIDES_ATTRIBUTE, json.dumps({str(k): v for k, v in self.overrides.items()}))
        return changed

    def set_decision(self, region_id: int, decision: str | None, *, overwrite_edited: bool = False) -> list[str]:
        """Flip a region by hand ('tumor' or 'cyst'), or give it back to the filter (None)."""
        if decision not in (None, "tumor", "cyst"):
            raise ValueError(f"a region is 'tumor' or 'cyst', not {decision!r}")
        previous = dict(self.overrides)
        if decision is None:
            self.overrides.pop(region_id, None)
        else:
            self.overrides[region_id] = decision
        try:
            return self.update(overwrite_edited=overwrite_edited)
        except Exception:
            self.overrides = previous
            raise

    def region_centre_ras(self, region_id: int) -> tuple[float, float, float]:
        """Where to centre the slice views on a region (RAS mm, in the volume's own frame)."""
        row = next(r for r in self.rows if r["id"] == region_id)
        return tuple(row["centroid_ras_mm"])

    def histogram(self, region_id: int) -> dict:
        """A region's HU histogram and fitted Gaussian as plot series (voxels per HU)."""
        p = self.params
        fit, _ = self.processor.fit_for(region_id, p)
        curve = gaussian(fit.centers, fit.A, fit.M, fit.S) if fit.failure is None else np.full(fit.centers.shape, np.nan)
        return {"hu": fit.centers, "histogram": fit.counts / p.bin_width_hu, "fit": curve,
                "threshold_hu": p.cyst_threshold_hu, "failure": fit.failure}

    def histogram_chart(self, region_id: int):
        """A plot chart node (table + histogram and Gaussian series) for one region, reused between calls."""
        scene = self.seg_node.GetScene()
        h = self.histogram(region_id)
        table = _reused(scene, "vtkMRMLTableNode", "LiverTumorSeg region histogram table")
        columns = {"HU": h["hu"], "voxels per HU": h["histogram"], "fitted Gaussian": np.nan_to_num(h["fit"])}
        vtk_table = table.GetTable()
        vtk_table.Initialize()
        for name, values in columns.items():
            array = vtk.vtkDoubleArray()
            array.SetName(name)
            for v in values:
                array.InsertNextValue(float(v))
            vtk_table.AddColumn(array)
        table.Modified()
        chart = _reused(scene, "vtkMRMLPlotChartNode", "LiverTumorSeg region histogram")
        chart.RemoveAllPlotSeriesNodeIDs()
        for name, colour in (("voxels per HU", (0.5, 0.5, 0.5)), ("fitted Gaussian", (0.85, 0.1, 0.1))):
            series = _reused(scene, "vtkMRMLPlotSeriesNode", f"LiverTumorSeg {name}")
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("HU")
            series.SetYColumnName(name)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            series.SetColor(*colour)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        row = next((r for r in self.rows if r["id"] == region_id), None)
        what = f"{row['decision']}, {row['reason']}" if row else ""
        outline = f"; outline {row['outline']}" if row and row.get("refined_ml") else ""
        chart.SetTitle(f"Region {region_id}: {what} (threshold {h['threshold_hu']:g} HU{outline})")
        chart.SetXAxisTitle("HU")
        chart.SetYAxisTitle("voxels per HU")
        return chart

    def close(self) -> None:
        self.writer.close()


def _reused(scene, class_name: str, name: str):
    """The scene's node of this class and name, or a new one."""
    node = scene.GetFirstNode(name, class_name)
    return node if node is not None else scene.AddNewNodeByClass(class_name, name)


def _stored_params(seg_node) -> PostParams:
    text = seg_node.GetAttribute(PARAMS_ATTRIBUTE)
    if not text:
        return PostParams()
    try:
        known = {f.name for f in dataclasses.fields(PostParams)}
        values = {k: v for k, v in json.loads(text).items() if k in known}
        values.setdefault("fit_on_core", False)  # stored before the core fit existed: the whole-region fit it was made with
        values.setdefault("refine_outlines", False)  # stored before the outline refinement existed: the outlines it had
        values.setdefault("min_peak_probability", 0.0)  # stored before the confidence gate existed: no gate
        return PostParams(**values)
    except (ValueError, TypeError):
        return PostParams()
