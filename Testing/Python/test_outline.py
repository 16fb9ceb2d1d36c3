"""HU outline refinement: under-segmented lesions grow to the half-way level, within the liver and the reach set."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from LiverTumorSegLib.outline import MIN_CONTRAST_HU, refine_outline
from LiverTumorSegLib.postprocess import PostParams, PostProcessor, save_region_histogram_png
from LiverTumorSegLib.volume import Volume

SPACING_XYZ = (0.8, 0.8, 2.0)


def _distance_mm(shape, centre_kji, spacing_xyz=SPACING_XYZ):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre_kji, spacing_xyz[::-1])))


def _case(lesion_hu=60.0, liver_hu=100.0, radius=8.0, short=1.5, seed=0, spacing_xyz=SPACING_XYZ):
    """A liver slab (noise sd 5 HU) with a spherical lesion whose edge is a 2 mm linear ramp; its
    true outline is the half-way level (distance < radius). The "network" found a sphere ``short`` mm
    too small (1.5 mm: 56 % of the volume, as the bundled networks' outlines on the phantoms)."""
    shape = (24, 64, 64)
    d = _distance_mm(shape, (12, 32, 32), spacing_xyz)
    frac = np.clip((radius - d) / 2.0 + 0.5, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    ct = liver_hu + frac * (lesion_hu - liver_hu) + rng.normal(0, 5, shape)
    labels = np.zeros(shape, np.uint8)
    labels[2:22, 4:60, 4:60] = 1
    labels[d < radius - short] = 2
    return Volume(np.round(ct).astype(np.int16), spacing_xyz), labels, d < radius


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("lesion_hu", [60.0, 20.0, 160.0])  # a hypodense tumor, a cyst, a hyperdense tumor
def test_an_undersegmented_lesion_grows_to_its_half_way_edge(lesion_hu):
    ct, labels, truth = _case(lesion_hu)
    processor = PostProcessor(ct, labels)
    before, _ = processor.apply(PostParams(dilate_iterations=0, refine_outlines=False))
    after, (row,) = processor.apply(PostParams(dilate_iterations=0, refine_max_mm=3.0))
    label = 3 if lesion_hu < 45 else 2
    assert row["decision"] == ("cyst" if label == 3 else "tumor")
    assert _dice(before == label, truth) < 0.75
    assert _dice(after == label, truth) > 0.9
    added = (after == label) & (before != label)
    assert np.all(before[added] == 1)  # only liver voxels are taken
    assert row["refined_ml"] == pytest.approx(added.sum() * np.prod(SPACING_XYZ) / 1000, abs=1e-4)
    liver, level = row["outline_liver_hu"], row["outline_level_hu"]
    assert row["outline"] == f"liver {liver:.0f} HU, grown to {level:.0f} HU"
    assert abs(liver - 100.0) < 8  # the median of the liver around (the missed rim pulls it a little)
    assert abs(level - 0.5 * (row["fit_M"] + liver)) <= 0.1


def test_a_rim_missed_by_more_than_2_mm_is_only_partly_recovered():
    """The limit README and BENCHMARKS state: 2.5 mm short, the 5 mm liver shell takes in lesion
    voxels, its median moves toward the lesion and the growth stops short of the edge (Dice 0.88)."""
    ct, labels, truth = _case(short=2.5)
    processor = PostProcessor(ct, labels)
    before, _ = processor.apply(PostParams(dilate_iterations=0, refine_outlines=False))
    after, (row,) = processor.apply(PostParams(dilate_iterations=0))
    assert _dice(before == 2, truth) < 0.55
    assert 0.85 < _dice(after == 2, truth) < 0.9
    assert row["outline_liver_hu"] < 90  # the liver is 100 HU: the shell holds missed lesion


def test_growth_stops_at_the_reach_in_mm_on_an_anisotropic_grid():
    """refine_max_mm is in mm: with 2 mm slices a 1.5 mm reach grows in-plane only."""
    ct, labels, truth = _case()
    processor = PostProcessor(ct, labels)
    before, _ = processor.apply(PostParams(dilate_iterations=0, refine_outlines=False))
    after, _ = processor.apply(PostParams(dilate_iterations=0, refine_max_mm=1.5))
    added = (after == 2) & (before != 2)
    assert added.any()
    distance = ndimage.distance_transform_edt(before != 2, sampling=SPACING_XYZ[::-1])
    assert distance[added].max() <= 1.5
    slices = np.flatnonzero((before == 2).any(axis=(1, 2)))
    assert set(np.flatnonzero(added.any(axis=(1, 2)))) <= set(slices)  # no new slice: it is 2 mm away


def test_a_low_contrast_lesion_keeps_its_outline():
    ct, labels, _ = _case(lesion_hu=100.0 - MIN_CONTRAST_HU / 2)
    processor = PostProcessor(ct, labels)
    off, _ = processor.apply(PostParams(dilate_iterations=0, refine_outlines=False))
    on, (row,) = processor.apply(PostParams(dilate_iterations=0))
    assert np.array_equal(on, off)
    assert row["refined_ml"] == 0 and "contrast under" in row["outline"]


def test_growth_stays_in_the_liver_and_off_other_regions():
    ct, labels, _ = _case(lesion_hu=20.0)
    labels[:, :, 36:] = np.where(labels[:, :, 36:] == 2, 2, 0)  # the liver ends at x = 36, through the lesion
    labels[11:13, 19:22, 31:33] = 2  # a second region just outside the first one's missed rim, two voxels apart
    processor = PostProcessor(ct, labels)
    off, rows = processor.apply(PostParams(dilate_iterations=0, refine_outlines=False))
    assert len(rows) == 2
    on, _ = processor.apply(PostParams(dilate_iterations=0))
    assert np.array_equal(on == 0, off == 0)  # nothing outside the liver is taken
    changed = on != off
    assert changed[:, :, 30:36].any() and np.all(off[changed] == 1)  # only liver voxels change, never another region


def test_refine_outline_skips_when_the_liver_around_is_too_thin():
    ct, labels, _ = _case()
    lesion = labels == 2
    result = refine_outline(ct.array, ct.spacing[::-1], (slice(0, 24), slice(0, 64), slice(0, 64)), lesion,
                            np.zeros(lesion.shape, bool), 60.0, 3.0)
    assert result.added.size == 0 and "liver voxels around" in result.note
    nan = refine_outline(ct.array, ct.spacing[::-1], (slice(0, 24), slice(0, 64), slice(0, 64)), lesion,
                         labels == 1, float("nan"), 3.0)
    assert nan.added.size == 0


@pytest.mark.parametrize("bad", [0.0, -1.0, 10.5])
def test_reach_is_checked(bad):
    with pytest.raises(ValueError, match="refine_max_mm"):
        PostParams(refine_max_mm=bad)


def test_histogram_png_shows_the_outline_level(tmp_path, monkeypatch):
    import matplotlib.figure

    drawn = []
    original = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):
        drawn.extend(line.get_label() for line in fig.axes[0].get_lines())
        return original(fig, *args, **kwargs)

    ct, labels, _ = _case()
    processor = PostProcessor(ct, labels)
    _, (row,) = processor.apply(PostParams(dilate_iterations=0))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    save_region_histogram_png(processor, row["id"], tmp_path / "h.png", PostParams(), row)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert f"outline level {row['outline_level_hu']:.0f} HU" in drawn and f"liver around {row['outline_liver_hu']:.0f} HU" in drawn
