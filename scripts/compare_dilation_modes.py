"""Tumor Dice of the two small-tumor dilation modes on cached network outputs (prints figures, no asserts).

    OMP_NUM_THREADS=1 PYTHONPATH=LiverTumorSeg python scripts/compare_dilation_modes.py FOLDER

FOLDER holds one ``<case>.npz`` per case with the keys ``ct`` (int16 HU), ``truth`` (0 background,
1 liver, 2 tumor, 3 cyst), ``liver`` (bool, the predicted liver), ``p`` and ``ptta`` (uint8 tumor
probabilities, 128 = 0.5; without and with mirroring) and ``spacing`` (x, y, z mm), all cropped
around the liver of a 512 x 512 CT. The 3-D mode's scale depends on the full in-plane matrix, so
each crop is padded in-plane to 512 x 512 (-1000 HU, empty masks) first. Candidates: the
probability >= 128 inside the predicted liver; the cyst filter at its defaults, the outline
refinement off (as when BENCHMARKS' table was made). Prints per-case
and mean tumor Dice for the per-slice mode with 0 and 2 iterations and the 3-D mode, for ``p``
and ``ptta``, then the time of ``PostProcessor.apply`` in both modes on the first case (``p``): the
first call after the fits (growth computed) and a repeated call (growth cached).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from LiverTumorSegLib.metrics import dice
from LiverTumorSegLib.postprocess import PostParams, PostProcessor
from LiverTumorSegLib.volume import Volume

MATRIX = 512
# the outline refinement off, as when the modes were compared (it became a default step later)
SETTINGS = {"slice 0": PostParams(dilate_iterations=0, refine_outlines=False),
            "slice 2": PostParams(refine_outlines=False),
            "3d": PostParams(dilate_mode="3d", refine_outlines=False)}


def padded(array: np.ndarray, value) -> np.ndarray:
    """The crop placed in the corner of a MATRIX x MATRIX plane (the position changes no result)."""
    rows, cols = array.shape[1:]
    if rows > MATRIX or cols > MATRIX:
        raise ValueError(f"crop {array.shape} wider than {MATRIX}")
    return np.pad(array, ((0, 0), (0, MATRIX - rows), (0, MATRIX - cols)), constant_values=value)


def load(path: Path) -> dict:
    d = np.load(path)
    out = {k: padded(d[k], -1000 if k == "ct" else 0) for k in ("ct", "truth", "liver", "p", "ptta")}
    out["spacing"] = tuple(float(s) for s in d["spacing"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    files = sorted(parser.parse_args().folder.glob("*.npz"))
    scores: dict[tuple[str, str], list[float]] = {}
    timing = None
    for path in files:
        case = load(path)
        ct = Volume(case["ct"], case["spacing"])
        truth = case["truth"] == 2
        line = []
        for key in ("p", "ptta"):
            labels = case["liver"].astype(np.uint8)
            labels[case["liver"] & (case[key] >= 128)] = 2
            processor = PostProcessor(ct, labels)
            for name, params in SETTINGS.items():
                score = dice(processor.apply(params)[0] == 2, truth)
                scores.setdefault((key, name), []).append(score)
                line.append(f"{score:.3f}")
            if timing is None:
                timing = {}
                for name in ("slice 2", "3d"):  # a fresh processor with its fits done: growth computed, then cached
                    fresh = PostProcessor(ct, labels)
                    fresh.apply(SETTINGS["slice 0"])
                    t0 = time.perf_counter()
                    fresh.apply(SETTINGS[name])
                    first = time.perf_counter() - t0
                    again = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        fresh.apply(SETTINGS[name])
                        again.append(time.perf_counter() - t0)
                    timing[name] = (first, statistics.median(again), len(fresh.region_ids))
        print(path.stem, " ".join(line), flush=True)
    print("columns: " + " ".join(f"{k}/{n}" for k in ("p", "ptta") for n in SETTINGS))
    for (key, name), values in scores.items():
        print(f"{key:5s} {name:8s} mean tumor Dice {statistics.mean(values):.4f} over {len(values)} cases")
    for name, (first, again, regions) in (timing or {}).items():
        print(f"apply, {name}, {files[0].stem} ({regions} regions): first {first * 1000:.1f} ms, cached {again * 1000:.1f} ms")


if __name__ == "__main__":
    main()
