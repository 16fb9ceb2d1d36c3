"""Post-processing: HU Gaussian cyst filter, small-tumor dilation (per slice and 3-D), cache and overrides."""

from __future__ import annotations

import dataclasses
import json

import cc3d
import numpy as np
import pytest

from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.postprocess import (PostParams, PostProcessor, authors_element, authors_radius, grid_scale,
                                          save_region_histogram_png)
from LiverTumorSegLib.volume import Volume

SEED = 8  # a phantom with both tumors (2) and cysts (3)


@pytest.fixture(scope="module")
def phantom():
    ct, labels = generate_case(SEED, spacing=(1.5, 1.5, 4.0), matrix=240, orientation=False)
    assert {2, 3} <= set(np.unique(labels.array))
    merged = np.where(labels.array >= 2, 2, labels.array).astype(np.uint8)
    return ct, labels.array, merged


def _regions(merged):
    return cc3d.connected_components(merged >= 2, connectivity=26)


def test_cysts_set_aside_and_tumors_kept(phantom):
    ct, truth, merged = phantom
    out, rows = PostProcessor(ct, merged).apply(PostParams())
    components = _regions(merged)
    assert {r["decision"] for r in rows} == {"tumor", "cyst"}
    for row in rows:
        region = components == row["id"]
        expected = np.bincount(truth[region]).argmax()
        assert expected == (3 if row["decision"] == "cyst" else 2)
        assert np.all(out[region] == expected)
    assert np.array_equal(out == 0, merged == 0)  # nothing deleted, nothing outside the liver
    json.dumps(rows)


@pytest.mark.parametrize("threshold", [20, 45, 80])
def test_threshold_moves_regions_by_fitted_mean(phantom, threshold):
    ct, _, merged = phantom
    params = PostParams(cyst_threshold_hu=threshold, dilate_iterations=0)
    out, rows = PostProcessor(ct, merged).apply(params)
    components = _regions(merged)
    for row in rows:
        assert isinstance(row["fit_quality"], float)  # a real fit, no fallback, on this phantom
        assert (row["decision"] == "cyst") == (row["fit_M"] < threshold)
        assert f"fitted mean {row['fit_M']:.1f} HU" in row["reason"]  # the table and the reason agree
        assert np.all(out[components == row["id"]] == (3 if row["decision"] == "cyst" else 2))


def _square(z, y0, x0, size):
    return (z, slice(y0, y0 + size), slice(x0, x0 + size))


def _dilation_case():
    """Liver box with a small 3x3 tumor, one at the liver edge, a large tumor, and a cyst beside."""
    labels = np.zeros((3, 48, 48), np.uint8)
    labels[:, 4:44, 4:44] = 1
    small, edge, large, cyst = (np.zeros(labels.shape, bool) for _ in range(4))
    small[_square(slice(0, 3), 10, 10, 3)] = True
    edge[_square(slice(0, 3), 5, 30, 3)] = True  # 1 px from the liver edge (row 4 is liver, 3 is not)
    large[_square(slice(1, 3), 26, 8, 12)] = True  # 144 px on slices 1-2 ...
    large[_square(0, 30, 12, 3)] = True  # ... but 9 px on slice 0
    cyst[_square(slice(0, 3), 10, 14, 4)] = True  # one column gap from the small tumor
    ct = np.full(labels.shape, 100, np.int16)
    for mask in (small, edge, large):
        labels[mask] = 2
    labels[cyst] = 2
    ct[cyst] = 10
    return Volume(ct, (1.0, 1.0, 1.0)), labels, small, edge, large, cyst


def _within(mask2d, n, connectivity):
    """Pixels within n steps of mask2d: L-inf distance for 8-connectivity, L1 for 4."""
    ys, xs = np.nonzero(mask2d)
    yy, xx = np.mgrid[: mask2d.shape[0], : mask2d.shape[1]]
    dy = np.abs(yy[..., None] - ys)
    dx = np.abs(xx[..., None] - xs)
    dist = np.maximum(dy, dx) if connectivity == 8 else dy + dx
    return (dist <= n).any(axis=-1)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("iterations", [0, 1, 2, 3])
def test_dilation_exact_shapes_inside_liver(connectivity, iterations):
    ct, labels, small, edge, large, cyst = _dilation_case()
    params = PostParams(dilate_iterations=iterations, dilate_connectivity=connectivity, min_region_voxels=1)
    out, rows = PostProcessor(ct, labels).apply(params)
    liver = labels > 0
    assert np.array_equal(out[~liver], labels[~liver])
    assert np.all(out[cyst] == 3)
    expected = np.zeros(labels.shape, bool)
    for z in range(3):
        for lesion in (small, edge):
            expected[z] |= _within(lesion[z], iterations, connectivity)
    expected[0] |= _within(large[0], iterations, connectivity)
    expected |= large
    expected &= liver & ~cyst
    assert np.array_equal(out == 2, expected)
    dilated = {r["id"]: r["dilated"] for r in rows if r["decision"] == "tumor"}
    assert set(dilated.values()) == {iterations > 0}


def test_dilation_area_threshold_is_strict():
    ct, labels, small, *_ = _dilation_case()
    ring = _within(small[0], 1, 8) & ~small[0]
    for max_area, grows in ((9, False), (10, True)):
        out, _ = PostProcessor(ct, labels).apply(PostParams(dilate_max_area_px=max_area, min_region_voxels=1))
        assert np.any(out[0][ring] == 2) == grows


def test_cache_after_changes_equals_fresh_run(phantom):
    ct, _, merged = phantom
    processor = PostProcessor(ct, merged)
    steps = [PostParams(cyst_threshold_hu=30), PostParams(bin_width_hu=2, smoothing_bins=2),
             PostParams(dilate_iterations=3, dilate_connectivity=4), PostParams(dilate_mode="3d"), PostParams(cyst_filter=False),
             PostParams(refine_max_mm=1.5), PostParams(refine_outlines=False),
             PostParams(cyst_threshold_hu=60, dilate_max_area_px=40, bin_width_hu=4)]
    for params in steps:
        cached = processor.apply(params)
    fresh = PostProcessor(ct, merged).apply(steps[-1])
    assert np.array_equal(cached[0], fresh[0])
    assert cached[1] == fresh[1]


def test_overrides_survive_parameter_changes(phantom):
    ct, _, merged = phantom
    processor = PostProcessor(ct, merged)
    _, rows = processor.apply(PostParams())
    cyst = next(r["id"] for r in rows if r["decision"] == "cyst")
    tumor = next(r["id"] for r in rows if r["decision"] == "tumor")
    overrides = {cyst: "tumor", tumor: "cyst"}
    components = _regions(merged)
    for params in (PostParams(), PostParams(cyst_threshold_hu=200), PostParams(cyst_filter=False),
                   PostParams(bin_width_hu=3, dilate_iterations=0)):
        out, rows = processor.apply(params, overrides)
        by_id = {r["id"]: r for r in rows}
        for rid, value in overrides.items():
            assert by_id[rid]["decision"] == by_id[rid]["override"] == value
            assert by_id[rid]["reason"] == "manual override"
        assert np.all(out[components == tumor] == 3)
    with pytest.raises(ValueError):
        processor.apply(PostParams(), {999: "cyst"})


def test_ill_posed_fits_fall_back():
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[:, 2:38, 2:38] = 1
    labels[2, 5:6, 5:10] = 2  # 5 voxels
    labels[:, 15:35, 15:35] = 2  # bimodal: half 0 HU, half 160 HU
    rng = np.random.default_rng(0)
    ct = np.full(labels.shape, 100.0) + rng.normal(0, 8, labels.shape)
    ct[:, 15:35, 15:25] -= 100
    ct[:, 15:35, 25:35] += 60
    ct = Volume(np.round(ct).astype(np.int16), (1.0, 1.0, 2.0))
    _, rows = PostProcessor(ct, labels).apply(PostParams())
    assert len(rows) == 2
    tiny, bimodal = sorted(rows, key=lambda r: r["voxels"])
    assert tiny["voxels"] == 5 and tiny["fit_quality"] == "fallback: fewer than 20 voxels"
    assert bimodal["fit_quality"].startswith("fallback:")
    for row in rows:
        assert "fallback median" in row["reason"]
        assert row["decision"] == ("cyst" if row["fit_M"] < 45 else "tumor")
    processor = PostProcessor(ct, labels)
    fit, _ = processor.fit_for(tiny["id"], PostParams())  # what the plots draw: no Gaussian the decision did not use
    assert fit.failure == "fewer than 20 voxels"
    with pytest.raises(ValueError, match="min_region_voxels"):
        PostParams(min_region_voxels=0)


def _rimmed_cyst():
    """A 36 HU cube (6 x 10 x 10) in a 100 HU liver, with a one-voxel partial-volume rim of 70 HU, labelled
    to the rim's outer edge (8 x 12 x 12), noise SD 12 HU."""
    labels = np.zeros((12, 30, 30), np.uint8)
    labels[:, 2:28, 2:28] = 1
    labels[2:10, 9:21, 9:21] = 2
    ct = np.full(labels.shape, 100.0)
    ct[2:10, 9:21, 9:21] = 70
    ct[3:9, 10:20, 10:20] = 36
    ct += np.random.default_rng(2).normal(0, 12, labels.shape)
    return Volume(np.round(ct).astype(np.int16), (1.0, 1.0, 2.0)), labels


def test_core_fit_drops_the_partial_volume_rim():
    ct, labels = _rimmed_cyst()
    processor = PostProcessor(ct, labels)
    (whole,) = processor.apply(PostParams(dilate_iterations=0, fit_on_core=False))[1]
    out, (core,) = processor.apply(PostParams(dilate_iterations=0))  # the core fit is the default
    # 552 rim voxels at 70 HU beside 600 cyst voxels at 36: one Gaussian over both lands near their mean
    # (52 HU), above 45; the core (exactly the 600 cyst voxels) near 36 HU
    assert whole["fit_on"] == "region" and whole["decision"] == "tumor" and 45 < whole["fit_M"] < 60
    assert core["fit_on"] == "core" and core["decision"] == "cyst" and abs(core["fit_M"] - 36) < 3
    assert "of the core" in core["reason"] and core["voxels"] == whole["voxels"] == 8 * 12 * 12
    fit, on_core = processor.fit_for(core["id"], PostParams(fit_on_core=True))
    assert on_core and fit.counts.sum() == 6 * 10 * 10
    assert np.all(out[labels == 2] == 3)  # the decision labels the whole region, rim included


def test_core_fit_falls_back_to_the_region_when_the_core_is_small():
    ct, labels = _rimmed_cyst()
    params = PostParams(dilate_iterations=0, fit_on_core=True, min_region_voxels=601)  # core 600 voxels
    (row,) = PostProcessor(ct, labels).apply(params)[1]
    assert row["fit_on"] == "region" and "of the core" not in row["reason"]
    thin = labels.copy()
    thin[thin == 2] = 1
    thin[5, 10:20, 10:20] = 2  # one slice thick: an empty core
    processor = PostProcessor(ct, thin)
    (row,) = processor.apply(PostParams(fit_on_core=True, dilate_iterations=0))[1]
    assert row["fit_on"] == "region" and processor.fit(row["id"], 5.0, 1.0, on_core=True) is None


def test_gas_region_is_not_tissue_and_removed():
    """A 'lesion' of gas (e.g. a false positive in bowel next to the liver) is no cyst."""
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[:, 2:38, 2:38] = 1
    labels[:, 5:12, 5:12] = 2  # gas
    labels[:, 20:30, 20:30] = 2  # a real tumor
    rng = np.random.default_rng(1)
    ct = np.full(labels.shape, 100.0) + rng.normal(0, 8, labels.shape)
    ct[:, 5:12, 5:12] = -900 + rng.normal(0, 20, (6, 7, 7))
    ct[:, 20:30, 20:30] -= 15
    proc = PostProcessor(Volume(np.round(ct).astype(np.int16), (1.0, 1.0, 2.0)), labels)
    out, rows = proc.apply(PostParams(dilate_iterations=0))
    gas, tumor = sorted(rows, key=lambda r: r["fit_M"])
    assert gas["decision"] == "not tissue" and "gas or fat" in gas["reason"] and tumor["decision"] == "tumor"
    assert not out[:, 5:12, 5:12].any() and (out[:, 20:30, 20:30] == 2).all()
    assert (proc.apply(PostParams(dilate_iterations=0), {gas["id"]: "cyst"})[0][:, 5:12, 5:12] == 3).all()
    assert (proc.apply(PostParams(cyst_filter=False, dilate_iterations=0))[0][:, 5:12, 5:12] == 2).all()


def test_a_fat_density_cyst_is_flagged_in_its_reason():
    """Between min_tissue_hu (-100) and -20 HU a region is still called cyst by the paper's rule, but a
    simple cyst is water-like: its reason says to check it (a fat-density false positive, e.g. in fat
    around the liver)."""
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[:, 2:38, 2:38] = 1
    labels[:, 5:12, 5:12] = 2  # fat density
    labels[:, 20:30, 20:30] = 2  # water-like cyst
    rng = np.random.default_rng(2)
    ct = np.full(labels.shape, 100.0) + rng.normal(0, 8, labels.shape)
    ct[:, 5:12, 5:12] = -60 + rng.normal(0, 8, (6, 7, 7))
    ct[:, 20:30, 20:30] = 10 + rng.normal(0, 8, (6, 10, 10))
    _, rows = PostProcessor(Volume(np.round(ct).astype(np.int16), (1.0, 1.0, 2.0)), labels).apply(PostParams())
    fat, water = sorted(rows, key=lambda r: r["fit_M"])
    assert fat["decision"] == water["decision"] == "cyst"
    assert "fat density: check it is a lesion" in fat["reason"] and "fat density" not in water["reason"]


def test_empty_input_is_unchanged():
    labels = np.zeros((4, 20, 20), np.uint8)
    labels[:, 5:15, 5:15] = 1
    ct = Volume(np.zeros(labels.shape, np.int16), (1.0, 1.0, 1.0))
    out, rows = PostProcessor(ct, labels).apply(PostParams())
    assert rows == [] and np.array_equal(out, labels)


def test_probability_map_candidates_stay_in_liver():
    ct, labels, *_ = _dilation_case()
    liver = np.where(labels > 0, 1, 0).astype(np.uint8)
    prob = np.zeros(labels.shape, np.uint8)
    prob[:, 20:25, 20:25] = 200  # inside the liver
    prob[:, 0:3, 0:3] = 255  # outside the liver: ignored
    prob[:, 30:35, 30:35] = 127  # below 0.5
    out, rows = PostProcessor(ct, liver, prob).apply(PostParams(dilate_iterations=0))
    assert len(rows) == 1 and rows[0]["voxels"] == 75
    assert np.array_equal(out >= 2, (prob >= 128) & (liver > 0))
    out, rows = PostProcessor(ct, liver, prob, threshold=201).apply(PostParams(dilate_iterations=0))
    assert rows == [] and np.array_equal(out, liver)  # 200 < 201: no candidate left
    with pytest.raises(ValueError, match="threshold"):
        PostProcessor(ct, liver, prob, threshold=0)


def test_confidence_gate_removes_whole_regions_by_their_peak():
    """A region whose highest probability is below the gate goes back to liver, whole, with its row
    kept and flippable; a region above it keeps every voxel, including those of low probability."""
    ct, labels, *_ = _dilation_case()
    liver = np.where(labels > 0, 1, 0).astype(np.uint8)
    prob = np.zeros(labels.shape, np.uint8)
    prob[:, 20:25, 20:25] = 140  # peak 140/255 = 0.549
    prob[:, 30:35, 30:35] = 130
    prob[2, 32, 32] = 200  # peak 0.784: one confident voxel in a region of 130s
    processor = PostProcessor(ct, liver, prob)
    off = PostParams(dilate_iterations=0, refine_outlines=False, cyst_filter=False, min_peak_probability=0.0)
    gated = dataclasses.replace(off, min_peak_probability=0.6)
    out, rows = processor.apply(gated)
    by_peak = {r["peak_probability"]: r for r in rows}
    assert set(by_peak) == {round(140 / 255, 3), round(200 / 255, 3)}
    low, high = by_peak[round(140 / 255, 3)], by_peak[round(200 / 255, 3)]
    assert low["decision"] == "low confidence" and low["reason"] == "peak probability 0.549 < 0.6: back to liver"
    assert high["decision"] == "tumor"
    assert (out[:, 20:25, 20:25] == 1).all() and (out[:, 30:35, 30:35] == 2).all()
    ungated = processor.apply(off)[0]  # gate off (0): both kept
    assert (ungated[:, 20:25, 20:25] == 2).all()
    assert np.array_equal(out, np.where(prob == 140, 1, ungated))  # only the low region changed
    assert (processor.apply(gated, {low["id"]: "cyst"})[0][:, 20:25, 20:25] == 3).all()  # flipped by hand
    assert (processor.apply(dataclasses.replace(gated, min_peak_probability=0.79))[0] >= 2).sum() == 0
    without_map = PostProcessor(ct, np.where(prob >= 128, 2, liver).astype(np.uint8))
    _, rows = without_map.apply(gated)  # labels only: no peak to judge, nothing gated
    assert {r["decision"] for r in rows} == {"tumor"} and all(r["peak_probability"] is None for r in rows)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_peak_probability"):
            PostParams(min_peak_probability=bad)


def test_histogram_png(phantom, tmp_path, monkeypatch):
    """The picture says what was decided and why; where the fit fell back, it marks the median decided on."""
    from matplotlib.figure import Figure

    ct, _, merged = phantom
    processor = PostProcessor(ct, merged)
    path = tmp_path / "h.png"
    save_region_histogram_png(processor, processor.region_ids[0], path, PostParams())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), savefig(fig, *a, **k))[1])
    params = PostParams(min_region_voxels=10**6)  # every region falls back to its median
    _, rows = processor.apply(params)
    save_region_histogram_png(processor, rows[0]["id"], path, params, rows[0])
    ax = drawn[-1].axes[0]
    assert f"-> {rows[0]['decision']}: {rows[0]['reason']}" in ax.get_title()
    assert any(line.get_label().startswith(f"median {rows[0]['fit_M']:.1f} HU") for line in ax.get_lines())


def test_active_box_holds_every_change_any_setting_makes():
    from LiverTumorSegLib.postprocess import PostParams, PostProcessor
    from LiverTumorSegLib.volume import Volume

    rng = np.random.default_rng(3)
    ct = rng.normal(100, 10, (30, 80, 80)).astype(np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[5:25, 10:70, 10:70] = 1
    labels[10:12, 20:23, 20:23] = 2  # small: dilated
    labels[15:20, 40:50, 40:50] = 2
    ct[15:20, 38:52, 38:52] = 20  # cyst-like, 2 mm wider than its label: the outline refinement takes the rim
    labels[20, 60:62, 30:34] = 2  # 8 voxels = 82 on the 256 grid: the 3-D mode grows it 2 slices up and down
    processor = PostProcessor(Volume(ct, (1.0, 1.0, 2.0)), labels)
    box = processor.active_box
    outside = np.ones(ct.shape, bool)
    outside[box] = False
    results = [processor.apply(PostParams(cyst_threshold_hu=t, dilate_iterations=i, cyst_filter=f, dilate_mode=m,
                                          refine_outlines=r, refine_max_mm=mm))[0]
               for t in (-20, 45, 120) for i in (0, 3) for f in (True, False) for m in ("slice", "3d")
               for r, mm in ((False, 3.0), (True, 3.0), (True, 10.0))]
    assert any(not np.array_equal(results[0][box], r[box]) for r in results)
    assert not np.array_equal(results[0], results[1])  # the refinement took the cyst's rim
    for r in results:
        assert np.array_equal(r[outside], results[0][outside])
    empty = PostProcessor(Volume(ct, (1.0, 1.0, 2.0)), np.where(labels > 0, 1, 0).astype(np.uint8))
    assert empty.active_box is None


def test_apply_in_place_equals_a_fresh_apply():
    from LiverTumorSegLib.postprocess import PostParams, PostProcessor
    from LiverTumorSegLib.volume import Volume

    rng = np.random.default_rng(4)
    ct = rng.normal(100, 10, (30, 80, 80)).astype(np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[5:25, 10:70, 10:70] = 1
    labels[10:12, 20:23, 20:23] = 2
    labels[15:20, 40:50, 40:50] = 2
    ct[15:20, 38:52, 38:52] = 20  # a rim for the outline refinement
    labels[20, 60:62, 30:34] = 2  # grown in z by the 3-D mode
    processor = PostProcessor(Volume(ct, (1.0, 1.0, 2.0)), labels)
    buffer = None
    for t, i, m, r in ((45, 2, "3d", True), (-20, 0, "slice", False), (120, 3, "3d", True), (30, 1, "slice", True),
                       (45, 0, "3d", False), (45, 2, "slice", True)):
        params = PostParams(cyst_threshold_hu=t, dilate_iterations=i, dilate_mode=m, refine_outlines=r)
        buffer, _ = processor.apply(params, out=buffer)
        assert np.array_equal(buffer, processor.apply(params)[0])
    for wrong in (np.asfortranarray(buffer), buffer.astype(np.int16), buffer[:, :, :-1]):  # writes would be lost
        with pytest.raises(ValueError, match="earlier apply"):
            processor.apply(PostParams(), out=wrong)


def _authors_case():
    """A 512 x 512 matrix (s = 2): three tumors of 16, 360 and 405 voxels (4, 90 and 101.25 on the
    256 grid: n = 1, 2, 0), a cyst one column from the small one, the liver edge one row from it."""
    shape = (11, 512, 512)
    labels = np.zeros(shape, np.uint8)
    labels[:, 100:200, 100:200] = 1
    small, mid, large, cyst = (np.zeros(shape, bool) for _ in range(4))
    small[5, 101:105, 120:124] = True  # row 100 is liver, 99 is not
    cyst[4:7, 102:106, 125:129] = True  # column 124 between: the small tumor's 2-px growth stops at the cyst
    mid[3:7, 140:149, 120:130] = True  # 4 x 9 x 10 = 360 voxels
    large[3:8, 140:149, 160:169] = True  # 5 x 9 x 9 = 405 voxels
    for mask in (small, mid, large, cyst):
        labels[mask] = 2
    ct = np.full(shape, 100, np.int16)
    ct[cyst] = 10
    return Volume(ct, (0.7, 0.7, 2.5)), labels, small, mid, large, cyst


def _within_l1(mask, n, s):
    """Voxels at scaled L1 distance |dz| + (|dy| + |dx|) / s <= n from mask (brute force)."""
    pts = np.argwhere(mask)
    lo = np.maximum(pts.min(0) - [n, int(n * s), int(n * s)], 0)
    hi = pts.max(0) + [n, int(n * s), int(n * s)] + 1
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1).reshape(-1, 3)
    d = np.abs(grid[:, None, :] - pts[None])
    hit = grid[((d[..., 0] + (d[..., 1] + d[..., 2]) / s) <= n).any(1)]
    out = np.zeros(mask.shape, bool)
    out[tuple(hit.T)] = True
    return out


def test_3d_mode_grows_by_the_scaled_authors_rule_voxel_by_voxel():
    ct, labels, small, mid, large, cyst = _authors_case()
    assert grid_scale(labels.shape) == 2.0
    assert [authors_radius(int(m.sum()), labels.shape) for m in (small, mid, large)] == [1, 2, 0]
    params = PostParams(dilate_mode="3d", min_region_voxels=1)
    out, rows = PostProcessor(ct, labels).apply(params)
    liver = labels > 0
    reach = _within_l1(small, 1, 2.0) | _within_l1(mid, 2, 2.0)
    assert (reach & cyst).any() and (reach & ~liver).any()  # the case tests both limits
    expected = reach & liver & ~cyst
    expected |= large
    assert np.array_equal(out == 2, expected)
    assert np.all(out[cyst] == 3) and np.array_equal(out[~liver], labels[~liver])
    # n = 2 reaches two slices up and down (the crop has room in z), there without in-plane growth
    assert np.array_equal(out[1] == 2, mid[3]) and np.array_equal(out[8] == 2, mid[6]) and not (out[9] == 2).any()
    dilated = {r["voxels"]: r["dilated"] for r in rows if r["decision"] == "tumor"}
    assert dilated == {16: True, 360: True, 405: False}
    # the slice-mode knobs are ignored in 3-D mode
    other = PostParams(dilate_mode="3d", min_region_voxels=1, dilate_iterations=0, dilate_max_area_px=1, dilate_connectivity=4)
    assert np.array_equal(PostProcessor(ct, labels).apply(other)[0], out)
    # the slice mode (default) grows every 2-D component under 100 px in-plane (all three here), never in z
    per_slice, _ = PostProcessor(ct, labels).apply(PostParams(min_region_voxels=1))
    assert (per_slice[3:8] == 2).sum() == (per_slice == 2).sum() and (per_slice[:, :, 160:169] == 2).sum() > large.sum()


def test_3d_mode_size_steps_and_element():
    from scipy import ndimage

    shape = (5, 512, 512)  # 4 voxels here = 1 voxel of the 256 grid
    assert [authors_radius(v, shape) for v in (1, 319, 320, 399, 400)] == [1, 1, 2, 2, 0]
    assert authors_radius(79, (5, 256, 256)) == 1 and authors_radius(80, (5, 256, 256)) == 2
    assert authors_radius(99, (5, 256, 256)) == 2 and authors_radius(100, (5, 256, 256)) == 0
    assert grid_scale((5, 512, 256)) == 1.5 and grid_scale((5, 128, 128)) == 1.0  # below 256: one pixel per step
    cross = ndimage.generate_binary_structure(3, 1)
    assert np.array_equal(authors_element(1, 1.0), cross)  # on the authors' own grid, the notebook's element
    assert np.array_equal(authors_element(2, 1.0), ndimage.iterate_structure(cross, 2))  # dilated twice
    assert authors_element(1, 2.0).sum() == 13 + 2 and authors_element(2, 2.0).sum() == 41 + 2 * 13 + 2


def test_dilate_mode_is_checked():
    with pytest.raises(ValueError, match="dilate_mode"):
        PostParams(dilate_mode="2d")
    assert PostParams().dilate_mode == "slice"


def _stored(volume: Volume, arrays: list[np.ndarray], orientation: str) -> tuple[Volume, list[np.ndarray]]:
    """The same CT (and label arrays on its grid) with its voxels stored in another axis order and
    sense (SimpleITK's DICOMOrient), geometry included."""
    import SimpleITK as sitk

    def image(arr):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(volume.spacing)
        img.SetOrigin(volume.origin)
        img.SetDirection(tuple(volume.direction.ravel()))
        return sitk.DICOMOrient(img, orientation)

    ct = image(volume.array)
    stored = Volume(sitk.GetArrayFromImage(ct), ct.GetSpacing(), ct.GetOrigin(), np.reshape(ct.GetDirection(), (3, 3)))
    return stored, [sitk.GetArrayFromImage(image(a)) for a in arrays]


@pytest.mark.parametrize("orientation", ["SRA", "PIL", "LAI", "ASL"])
@pytest.mark.parametrize("mode", ["slice", "3d"])
def test_dilation_is_the_same_whatever_the_voxel_order(phantom, orientation, mode):
    """A CT stored sagittally or coronally (axes permuted), or flipped, gets the same labels on the
    same voxels as its axial copy: the dilation works in the patient's axial planes."""
    if mode == "slice":
        ct, _, merged = phantom
        params = PostParams(dilate_iterations=2)
    else:
        ct, merged = _authors_case()[:2]
        params = PostParams(dilate_mode="3d", min_region_voxels=1)
    axial, rows = PostProcessor(ct, merged).apply(params)
    assert any(r["dilated"] for r in rows)  # the case tests the dilation
    stored, (labels, back) = _stored(ct, [merged, axial], orientation)
    assert stored.array.shape != ct.array.shape or orientation == "LAI"
    out, _ = PostProcessor(stored, labels).apply(params)
    assert np.array_equal(out, back)


@pytest.mark.parametrize("params", [PostParams(), PostParams(dilate_iterations=3, refine_max_mm=6.0),
                                    PostParams(dilate_mode="3d"), PostParams(cyst_threshold_hu=120.0)])
def test_the_table_adds_up_to_the_labels(phantom, params):
    """Each row says what its region holds in the labels (final_ml = its voxels + dilation + outline
    growth), so the tumor rows sum to the tumor label and the cyst rows to the cyst label."""
    ct, _, merged = phantom
    out, rows = PostProcessor(ct, merged).apply(params)
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    for label, decision in ((2, "tumor"), (3, "cyst")):
        held = sum(r["final_ml"] for r in rows if r["decision"] == decision)
        assert held == pytest.approx((out == label).sum() * voxel_ml, abs=1e-3 * len(rows)), decision
    for r in rows:
        expected = r["volume_ml"] + r["dilated_ml"] + r["refined_ml"] if r["decision"] in ("tumor", "cyst") else 0.0
        assert r["final_ml"] == pytest.approx(expected, abs=2e-4)
    if params.dilate_mode == "slice" and params.cyst_threshold_hu < 120:  # (3-D mode: no region small enough here)
        assert any(r["dilated_ml"] > 0 for r in rows) and any(r["refined_ml"] > 0 for r in rows)


def _crowded_case(rng) -> tuple[Volume, np.ndarray]:
    """Lesions close together in a liver with dark pockets: regions compete for the voxels between them."""
    shape = (16, 50, 56)
    labels = np.zeros(shape, np.uint8)
    labels[2:14, 4:46, 4:52] = 1
    ct = rng.normal(100, 5, shape)
    ct[labels == 0] = -50
    zz, yy, xx = np.indices(shape)
    mm = ((zz * 2.5, 2.5), (yy * 0.8, 0.8), (xx * 0.8, 0.8))

    def ball(radius):
        centre = rng.integers([3, 8, 8], [13, 42, 48])
        return (sum((axis - c * step) ** 2 for (axis, step), c in zip(mm, centre)) <= radius ** 2) & (labels > 0)

    for _ in range(6):
        pocket = ball(rng.uniform(2, 5))
        ct[pocket] = rng.normal(20, 5, pocket.sum())
    for _ in range(rng.integers(4, 9)):
        lesion = ball(rng.uniform(1.5, 6))
        labels[lesion] = 2
        ct[lesion] = rng.normal(rng.choice([10, 60, 140]), 5, lesion.sum())
    return Volume(ct.astype(np.int16), (0.8, 0.8, 2.5)), labels


@pytest.mark.parametrize("params", [PostParams(), PostParams(refine_max_mm=10.0), PostParams(dilate_mode="3d")])
def test_competing_regions_get_the_same_voxels_whatever_the_voxel_order(params):
    """Where a dilation or an outline refinement reaches voxels another region reaches too, who keeps
    them does not depend on the order the voxels are stored in (region ids follow it)."""
    rng = np.random.default_rng(3)
    for trial in range(14):
        ct, labels = _crowded_case(rng)
        axial, _ = PostProcessor(ct, labels).apply(params)
        stored, (moved, back) = _stored(ct, [labels, axial], "SRA")
        out, _ = PostProcessor(stored, moved).apply(params)
        assert np.array_equal(out, back), trial


def test_a_region_never_grows_through_another():
    """A cyst's outline refinement reaches along a dark corridor; a small tumor's dilation ring fills the
    corridor first. The cyst stops at the ring, taking nothing beyond it (it took 64 voxels there, cut off
    from itself); the tumor, whose ring it is, grows on."""
    shape = (24, 48, 48)
    labels = np.zeros(shape, np.uint8)
    labels[2:22, 4:44, 2:46] = 1
    ct = np.where(labels > 0, 100, -50)
    zz, yy, xx = np.indices(shape)
    cyst = (zz - 11) ** 2 + (yy - 30) ** 2 + (xx - 9) ** 2 <= 9
    corridor = (abs(zz - 11) <= 2) & (abs(yy - 30) <= 2) & (xx >= 12) & (xx <= 30)
    tumor = (abs(zz - 11) <= 2) & (yy == 30) & (xx >= 15) & (xx <= 16)
    ct[corridor], ct[cyst], ct[tumor] = 20, 10, 60
    labels[cyst | tumor] = 2
    out, rows = PostProcessor(Volume(ct.astype(np.int16), (1.0, 1.0, 1.0)), labels).apply(PostParams(refine_max_mm=10.0))
    assert [r["decision"] for r in rows] == ["cyst", "tumor"] and rows[1]["dilated_ml"] > 0
    beyond = corridor & (xx >= 19)
    assert not (out[beyond] == 3).any() and (out[beyond] == 2).any()
    assert cc3d.connected_components(out == 3, connectivity=26).max() == 1


def test_a_mean_at_the_threshold_reads_as_it_is_decided(phantom):
    """The decision, the table's fit_M and the reason's number agree, even within 0.01 HU of the threshold."""
    ct, _, merged = phantom
    processor = PostProcessor(ct, merged)
    _, rows = processor.apply(PostParams())
    row = rows[0]
    for threshold in (row["fit_M"], row["fit_M"] + 0.01, row["fit_M"] - 0.004, row["fit_M"] + 0.004):
        decided = next(r for r in processor.apply(PostParams(cyst_threshold_hu=threshold))[1] if r["id"] == row["id"])
        assert decided["decision"] == ("cyst" if decided["fit_M"] < threshold else "tumor"), threshold
        shown = float(decided["reason"].split(" HU")[0].split()[-1])
        assert (shown < threshold) == (decided["decision"] == "cyst"), decided["reason"]
    crossing = [r for r in rows if round(r["fit_M"], 1) > r["fit_M"]]  # a limit between the two would read wrong
    assert crossing
    for row in crossing:  # the same at the "not tissue" limit
        limit = (row["fit_M"] + round(row["fit_M"], 1)) / 2
        params = PostParams(min_tissue_hu=limit, cyst_threshold_hu=max(45.0, row["fit_M"] + 10))
        decided = next(r for r in processor.apply(params)[1] if r["id"] == row["id"])
        shown = float(decided["reason"].split(" HU")[0].split()[-1])
        assert decided["decision"] == "not tissue" and shown < limit, decided["reason"]


def test_region_centroids_agree_in_voxels_lps_and_ras(phantom):
    """centroid_ijk is Slicer's IJK (column, row, slice): through the CT's geometry it lands on centroid_lps_mm."""
    ct, _, merged = phantom
    _, rows = PostProcessor(ct, merged).apply(PostParams())
    for row in rows:
        i, j, k = row["centroid_ijk"]
        lps = ct.ijk_to_lps() @ np.array([i, j, k, 1.0])
        assert np.allclose(lps[:3], row["centroid_lps_mm"], atol=0.02)
        assert np.allclose(row["centroid_ras_mm"], [-lps[0], -lps[1], lps[2]], atol=0.02)
