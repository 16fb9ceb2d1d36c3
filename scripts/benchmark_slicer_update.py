"""Slider-to-segment update time in Slicer's real MRML (slicer-core), core + MRML, on the
post-processing benchmark volume (512x512x300, 20 lesion regions). Prints figures, no asserts.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_slicer_update.py

Times: the volume node, the segmentation node with its first full write (what appears when a run
finishes), then the median of 20 slider moves (threshold and dilation; LiveResult.update: the
core's cached post-processing + bounding-box segment updates of the changed segments).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import slicer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LiverTumorSeg"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_postprocess import synthetic_case  # noqa: E402
from LiverTumorSegLib.pipeline import Probabilities  # noqa: E402
from LiverTumorSegLib.postprocess import PostParams  # noqa: E402
from LiverTumorSegSlicer import mrml  # noqa: E402
from LiverTumorSegSlicer.session import LiveResult  # noqa: E402


def main() -> None:
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    ct, labels = synthetic_case()
    probs = Probabilities(np.where(labels > 0, 255, 0).astype(np.uint8),
                          np.where(labels == 2, 255, 0).astype(np.uint8), (slice(None),) * 3)
    t0 = time.perf_counter()
    node = mrml.volume_node_from(scene, ct, "CT")
    t1 = time.perf_counter()
    seg = mrml.create_segmentation_node(node)
    live = LiveResult(node, seg, labels, probs)
    live.update()
    t2 = time.perf_counter()
    moves = [PostParams(cyst_threshold_hu=t, dilate_iterations=i, dilate_max_area_px=a)
             for t, i, a in zip(np.linspace(20, 80, 20), [0, 1, 2, 3] * 5, [50, 100, 200, 400] * 5)]
    first, again, written = [], [], []
    for times in (first, again):
        for params in moves:
            s = time.perf_counter()
            written.append(len(live.update(params)))
            times.append(time.perf_counter() - s)
    print(f"volume {ct.array.shape[::-1]} (i, j, k), regions {len(live.rows)}")
    print(f"volume node from numpy:                         {t1 - t0:.3f} s")
    print(f"segmentation node + post-processing + 3 segments: {t2 - t1:.3f} s")
    print(f"slider move (core + MRML), median of 20:        {1000 * statistics.median(first):.1f} ms "
          f"(max {1000 * max(first):.1f} ms; first visits of dilation settings included)")
    print(f"slider move, all cached, median of 20:          {1000 * statistics.median(again):.1f} ms "
          f"(max {1000 * max(again):.1f} ms); segments rewritten per move: {statistics.mean(written):.1f} of 3")


if __name__ == "__main__":
    main()
