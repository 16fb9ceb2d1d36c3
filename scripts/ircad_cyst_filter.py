"""The HU cyst filter on real CT: 3D-IRCADb-01 patient 1.1 with its expert lesion masks as candidates.

    OMP_NUM_THREADS=1 PYTHONPATH=LiverTumorSeg python scripts/ircad_cyst_filter.py

Builds the labelmap in memory (liver 1; livertumor01..07 and liverkyst 2, i.e. all candidates),
runs ``PostProcessor`` with the default ``PostParams`` (the fit on each region's core) and with the
paper's rule (every voxel) and prints a Markdown table for each: each 3-D region, the truth
structure(s) it overlaps, its fit and the decision. Region histogram plots go
to a temporary folder (the data is CC BY-NC-ND: never commit derived images of it).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import cc3d
import numpy as np
from scipy import ndimage

from LiverTumorSegLib.imageio import read_labels, read_volume
from LiverTumorSegLib.postprocess import PostParams, PostProcessor, save_region_histogram_png

IRCAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "ircad-1.1"
LESIONS = [f"livertumor{n:02d}" for n in range(1, 8)] + ["liverkyst"]


def load_case(root: Path = IRCAD):
    """The CT, the merged labelmap (liver 1, every lesion 2) and each lesion's truth mask by name."""
    ct = read_volume(root / "ct.nii.gz")
    masks = {name: read_labels(root / "masks" / f"{name}.nii.gz", ct).array > 0 for name in ["liver"] + LESIONS}
    labels = masks.pop("liver").astype(np.uint8)
    for mask in masks.values():
        labels[mask] = 2
    return ct, labels, masks


def truth_of_regions(labels: np.ndarray, rows: list[dict], truth: dict[str, np.ndarray]) -> dict[int, list[str]]:
    """Region id -> names of the truth masks it overlaps (regions matched by voxel count and centroid)."""
    components = cc3d.connected_components(labels >= 2, connectivity=26)
    by_key = {}
    for cid, found in enumerate(ndimage.find_objects(components), start=1):
        coords = np.nonzero(components[found] == cid)
        centroid = [round(float(c.mean()) + s.start, 2) for c, s in zip(coords, found)]
        by_key[(coords[0].size, *centroid)] = cid
    names = {}
    for row in rows:
        own = components == by_key[(row["voxels"], *row["centroid_ijk"][::-1])]  # the key is (k, j, i)
        names[row["id"]] = [n for n, mask in truth.items() if (mask & own).any()]
    return names


def markdown_table(rows: list[dict], names: dict[int, list[str]]) -> str:
    """One line per region: truth, size, fit (A, M, S, R^2), decision and reason."""
    lines = ["| region | truth | voxels | mL | A | M (HU) | S (HU) | fit quality | decision | reason |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {', '.join(names[r['id']])} | {r['voxels']} | {r['volume_ml']:.3f} | {r['fit_A']:.0f} | "
                     f"{r['fit_M']:.1f} | {r['fit_S']:.1f} | {r['fit_quality']} | {r['decision']} | {r['reason']} |")
    return "\n".join(lines)


def main() -> None:
    ct, labels, truth = load_case()
    processor = PostProcessor(ct, labels)
    params = PostParams()
    default_rows = processor.apply(params)[1]
    for title, rows in (("default: each region's core (less its one-voxel rim)", default_rows),
                        ("the paper's rule: every voxel of the region", processor.apply(replace(params, fit_on_core=False))[1])):
        print(f"\n{title}\n\n{markdown_table(rows, truth_of_regions(labels, rows, truth))}")
    folder = Path(tempfile.mkdtemp(prefix="ircad_regions_"))
    for r in default_rows:
        path = folder / f"region_{r['id']}.png"
        save_region_histogram_png(processor, r["id"], path, params, r)
        print(f"plot: region {r['id']}: {path}")


if __name__ == "__main__":
    main()
