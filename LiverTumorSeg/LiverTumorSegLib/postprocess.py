"""Post-processing a user tunes live: HU Gaussian cyst filter, small-tumor dilation, HU outline refinement.

Order of operations (fixed):

1. candidates: labels 2 and 3 of the input, or, when a tumor probability map (uint8 0-255) is
   given, voxels at or above ``threshold`` (the tumor card's cut-off; default 128, i.e. 0.5) inside
   the liver (labels 1, 2, 3);
2. 3-D regions: 26-connected components of the candidates (cc3d); a region's id is its cc3d
   label (raster order, so stable for a given input);
3. per-region HU fit on the original unclipped CT (cached per (bin width, smoothing)), with
   ``fit_on_core`` (the default since 2026-11-30) on the region's core: the region less its
   one-voxel rim (binary erosion with the 3x3x3 cube), where partial volume mixes lesion and liver
   HU; a core of fewer than ``min_region_voxels`` voxels falls back to the whole region. Off, every
   voxel of the region is fitted (the paper's rule). Chosen on tuning phantoms 3024-3071 and
   3D-IRCADb 1.1 with a rule set beforehand (BENCHMARKS.md, "The cyst filter fits the core");
4. decision: a manual override; else, with the confidence gate on (``min_peak_probability`` > 0;
   0.6 by default since 2026-11-30, adopted with the averaged tumor model by a rule set beforehand:
   BENCHMARKS.md, "A confidence gate on each region" and "averaged weight by weight"; it acts only
   when a probability map was given), "low confidence" iff the region's peak network
   probability is below it; else, with the filter on, "not tissue" iff the fitted mean M is
   below ``min_tissue_hu`` (gas or fat: no lesion has such HU), cyst iff M < threshold, else tumor;
5. relabel: tumor 2, cyst 3 (cysts are set aside, never deleted), not tissue 0 and low confidence 1
   (both kept in the table, removed from the lesion labels); other input lesion voxels -> 1;
6. small-tumor dilation of kept tumors (per axial slice, or in 3-D: ``dilate_mode``), inside the liver;
7. with ``refine_outlines`` (the default since 2026-11-30), each tumor and cyst grows into the liver
   around it, up to ``refine_max_mm``, where the CT is on its side of half-way between its fitted
   mean and the liver's median HU (``outline``). Chosen on tuning phantoms 3024-3071 and 3D-IRCADb
   1.1 with a rule set beforehand (BENCHMARKS.md, "Outlines refined by HU").

The Gaussian model is f(HU) = A / sqrt(2 pi S^2) * exp(-(HU - M)^2 / (2 S^2)), fitted to the
smoothed histogram in voxels per HU, so A is the fitted voxel count. Ill-posed fits fall back to
the median (M), 1.4826 * MAD (S) and the voxel count (A); the row then says "fallback: <reason>".

Dilation, ``dilate_mode="slice"`` (default; the paper's rule): each 2-D component (connectivity 4
or 8) of a kept tumor in one axial slice whose area is below ``dilate_max_area_px`` grows
by one pixel per iteration with the 3x3 cross (4) or the 3x3 square (8). Each iteration is
confined to liver voxels that belong to no other lesion region, so dilation never leaves the liver
and never overwrites a cyst (or another region). Axial is the array axis nearest the patient's
head-foot axis (``orientation.Reorient``), so a CT stored sagittally or coronally, or flipped, grows
on the same voxels as its axial copy.

Dilation, ``dilate_mode="3d"``: the rule of the authors' notebook (``LiTS_metric_Tumor.ipynb``),
which labels the predicted tumor mask on their 256 x 256 x Z grid (in-plane resized to 256, slices
kept) with ``ndimage.label`` (6-connected) and dilates each component of < 80 voxels once and of
80-99 voxels twice with scipy's default 6-connected cross, anywhere (not confined to the liver).
**Our port** works on the original grid, without resampling:

- a kept tumor region (our regions are 26-connected 3-D components, so two 6-separate blobs that
  touch at an edge or corner count as one, larger region here) measures
  ``voxels * 256 * 256 / (rows * cols)`` 256-grid voxels, ``rows, cols`` being the CT array's
  in-plane shape (the two axes other than the axial one);
- size < 80 -> n = 1, 80 <= size < 100 -> n = 2, else no growth;
- growth is one binary dilation with ``{(dz, dy, dx): |dz| + (|dy| + |dx|) / s <= n}``, the
  n-fold 6-cross (an L1 ball of radius n) scaled to our grid, ``s = (rows / 256 + cols / 256) / 2``
  in-plane pixels per 256-grid pixel (slices are not resampled, so z keeps step 1). For s < 1 (a
  matrix under 256) s is taken as 1: a fraction of a pixel cannot be grown (with n = 1 the scaled
  element would grow in z only); with s = 1 the element is exactly the notebook's (n-fold cross);
- the dilated set is then intersected with the same allowed voxels as the slice mode (liver
  voxels of no other lesion region). Unlike the slice mode's step-by-step growth, the one large
  dilation can reach allowed voxels behind a non-allowed gap narrower than its reach (at most one
  slice or floor(2s) - 1 pixels); it never lands on a non-liver voxel, a cyst or another region.

In "3d" mode ``dilate_iterations``, ``dilate_max_area_px`` and ``dilate_connectivity`` are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cc3d
import numpy as np
from scipy import ndimage, optimize

from .masks import bounding_box
from .orientation import Reorient
from .outline import MAX_REFINE_MM, Refinement, reach_voxels, refine_outline
from .volume import Volume

MAX_DILATE_ITERATIONS = 3
DILATE_MODES = ("slice", "3d")
AUTHORS_GRID = 256  # the notebook's in-plane matrix
AUTHORS_SIZE_STEPS = ((80, 1), (100, 2))  # 256-grid voxels below -> dilation radius n (notebook)
DECISION_LABELS = {"tumor": 2, "cyst": 3, "not tissue": 0, "low confidence": 1}
MIN_R2 = 0.8  # below this a single Gaussian does not describe the histogram (e.g. bimodal)
_MAD_TO_SD = 1.4826
_CUBE = np.ones((3, 3, 3), bool)
# 3x3 cross (4) or 3x3 square (8) in the middle plane of a 3x3x3 element: every slice on its own
_IN_PLANE = {c: np.pad(ndimage.generate_binary_structure(2, r)[None], ((1, 1), (0, 0), (0, 0)))
             for c, r in ((4, 1), (8, 2))}


NONE = np.empty(0, dtype=np.int64)  # no flat indices
FAT_DENSITY_HU = -20.0  # a lesion's mean below this (and above min_tissue_hu) is flagged in its reason


@dataclass(frozen=True)
class PostParams:
    """Every knob of the post-processing; bin width and smoothing changes trigger a (cached) refit."""

    cyst_filter: bool = True
    cyst_threshold_hu: float = 45.0
    min_tissue_hu: float = -100.0
    min_region_voxels: int = 20
    fit_on_core: bool = True  # False: fit every voxel of the region (the paper's rule)
    bin_width_hu: float = 5.0
    smoothing_bins: float = 1.0
    dilate_iterations: int = 2
    dilate_max_area_px: int = 100
    dilate_connectivity: int = 8
    dilate_mode: str = "slice"  # "slice": the paper's per-slice rule; "3d": the authors' notebook (ours, see above)
    refine_outlines: bool = True  # False: the outlines as the network and the dilation left them
    refine_max_mm: float = 3.0
    min_peak_probability: float = 0.6  # a region whose peak network probability is below goes back to liver; 0: off

    def __post_init__(self):
        if self.dilate_mode not in DILATE_MODES:
            raise ValueError(f"dilate_mode must be one of {', '.join(map(repr, DILATE_MODES))}, not {self.dilate_mode!r}")
        if not 0 <= self.dilate_iterations <= MAX_DILATE_ITERATIONS:
            raise ValueError(f"dilate_iterations must be 0-{MAX_DILATE_ITERATIONS}, not {self.dilate_iterations}")
        if self.dilate_connectivity not in _IN_PLANE:
            raise ValueError(f"dilate_connectivity must be 4 or 8, not {self.dilate_connectivity}")
        if self.min_region_voxels < 1:
            raise ValueError(f"min_region_voxels must be 1 or more, not {self.min_region_voxels}")
        if self.bin_width_hu <= 0 or self.smoothing_bins < 0:
            raise ValueError("bin_width_hu must be > 0 and smoothing_bins >= 0")
        if not 0 < self.refine_max_mm <= MAX_REFINE_MM:
            raise ValueError(f"refine_max_mm must be in (0, {MAX_REFINE_MM:g}] mm, not {self.refine_max_mm}")
        if not 0 <= self.min_peak_probability < 1:
            raise ValueError(f"min_peak_probability must be in [0, 1), not {self.min_peak_probability}")


@dataclass
class Fit:
    """A region's histogram and Gaussian fit; ``failure`` names why the fit is unusable, else None."""

    centers: np.ndarray
    counts: np.ndarray
    smoothed: np.ndarray
    A: float = math.nan
    M: float = math.nan
    S: float = math.nan
    r2: float = math.nan
    failure: str | None = None


@dataclass
class _Region:
    id: int
    crop: tuple[slice, slice, slice]  # bounding box, padded for either dilation mode
    own: np.ndarray  # bool, the region inside crop
    allowed: np.ndarray  # bool, liver voxels of no other region inside crop
    index: np.ndarray  # flat indices into the full volume
    hu: np.ndarray  # float64 HU values
    core_hu: np.ndarray  # float64 HU values of the region less its one-voxel rim (3x3x3 erosion)
    centroid: tuple[float, float, float]  # (k, j, i)
    peak: float  # the highest network probability in the region (0-1); NaN without a probability map


def gaussian(x, A, M, S):
    """The fitted model: A voxels spread as a normal density of mean M and sd S (per HU)."""
    return A / math.sqrt(2 * math.pi) / S * np.exp(-((x - M) ** 2) / (2 * S * S))


def histogram(hu: np.ndarray, bin_width: float, smoothing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin centres, raw counts and Gaussian-smoothed counts, padded so smoothing keeps the mass."""
    pad = int(math.ceil(4 * smoothing)) + 1
    lo = math.floor(hu.min() / bin_width) * bin_width - pad * bin_width
    bins = np.floor((hu - lo) / bin_width).astype(np.int64)
    counts = np.bincount(bins, minlength=int(bins.max()) + 1 + pad).astype(float)
    smoothed = ndimage.gaussian_filter1d(counts, smoothing, mode="constant") if smoothing > 0 else counts
    centers = lo + bin_width * (np.arange(counts.size) + 0.5)
    return centers, counts, smoothed


def fit_region(hu: np.ndarray, bin_width: float, smoothing: float) -> Fit:
    """Histogram, smoothing and bounded Gaussian fit of one region's HU values."""
    centers, counts, smoothed = histogram(hu, bin_width, smoothing)
    fit = Fit(centers, counts, smoothed)
    if np.count_nonzero(counts) < 3:
        fit.failure = "fewer than 3 occupied bins"
        return fit
    y = smoothed / bin_width
    span = float(hu.max() - hu.min()) + bin_width
    p0 = (hu.size, float(hu.mean()), max(float(hu.std()), bin_width))
    bounds = ((0.0, hu.min() - span, bin_width * 1e-3), (10.0 * hu.size, hu.max() + span, 10 * span))
    try:
        (A, M, S), _ = optimize.curve_fit(gaussian, centers, y, p0=p0, bounds=bounds, maxfev=2000)
    except (RuntimeError, ValueError) as exc:
        fit.failure = f"fit failed ({type(exc).__name__})"
        return fit
    fit.A, fit.M, fit.S = float(A), float(M), float(S)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    fit.r2 = 1.0 - float(((y - gaussian(centers, A, M, S)) ** 2).sum()) / ss_tot
    fit.failure = _implausible(fit, hu, bin_width, span)
    return fit


def _implausible(fit: Fit, hu: np.ndarray, bin_width: float, span: float) -> str | None:
    if not all(map(math.isfinite, (fit.A, fit.M, fit.S, fit.r2))):
        return "fit not finite"
    if not hu.min() <= fit.M <= hu.max():
        return f"fitted mean {fit.M:.1f} HU outside the data range"
    if not 0.25 * bin_width <= fit.S <= span:
        return f"fitted sd {fit.S:.1f} HU absurd"
    if fit.r2 < MIN_R2:
        return f"poor fit (R^2 {fit.r2:.2f} < {MIN_R2})"
    return None


class PostProcessor:
    """Components, histograms and fits computed once; ``apply`` re-derives labels from the cache."""

    def __init__(self, ct: Volume, labels: np.ndarray, tumor_probability: np.ndarray | None = None,
                 threshold: int = 128):
        if labels.shape != ct.array.shape:
            raise ValueError(f"labels shape {labels.shape} differs from CT {ct.array.shape}")
        if tumor_probability is not None and tumor_probability.shape != ct.array.shape:
            raise ValueError(f"probability shape {tumor_probability.shape} differs from CT {ct.array.shape}")
        self.ct = ct
        self._labels = np.asarray(labels, dtype=np.uint8)
        liver = self._labels > 0
        if tumor_probability is None:
            candidates = self._labels >= 2
        else:
            if not 1 <= threshold <= 255:
                raise ValueError(f"threshold must be 1-255 (uint8 probability), not {threshold}")
            candidates = liver & (np.asarray(tumor_probability) >= threshold)
        # the dilation works in axial planes: the array axis nearest the head-foot axis first, whatever
        # order the voxels are stored in (flips do not matter to a symmetric dilation)
        self._order = Reorient.for_volume(ct).axes
        self._axial_shape = tuple(ct.array.shape[a] for a in self._order)
        self._scale = grid_scale(self._axial_shape)
        pad = tuple(_crop_pad(self._scale)[self._order.index(a)] for a in range(3))
        self._regions = _find_regions(ct.array, liver, candidates, pad, tumor_probability)
        self._by_id = {r.id: r for r in self._regions}
        # which region keeps a voxel two of them reach: the larger first, then by place in the patient, so
        # the labels do not depend on the order the voxels are stored in (region ids follow that order)
        self._precedence = sorted(range(len(self._regions)), key=self._precedence_key)
        self._base = liver.astype(np.uint8)  # lesion voxels that are no candidate become liver
        self._parenchyma = liver & ~candidates if self._regions else None  # liver voxels of no region
        self._outer = [self._widened(r.crop, MAX_REFINE_MM) for r in self._regions]  # room for any outline refinement
        self._fits: dict[tuple[float, float], list[Fit]] = {}
        self._grown: dict[tuple, np.ndarray] = {}
        self._refined: dict[tuple, Refinement] = {}

    @classmethod
    def from_network(cls, ct: Volume, labels: np.ndarray, probabilities) -> "PostProcessor":
        """Candidates from the cached network output (``pipeline.Probabilities``) at its card's cut-off."""
        return cls(ct, labels, probabilities.tumor_full(), probabilities.tumor_threshold)

    @property
    def active_box(self) -> tuple[slice, slice, slice] | None:
        """The box outside which ``apply`` gives the same labels for every setting (None: no regions).

        Every region's outer crop has room for both dilation modes (``_crop_pad``) and for the outline
        refinement at its largest setting, so the box holds for all of them."""
        if not self._regions:
            return None
        crops = self._outer
        return tuple(slice(min(c[a].start for c in crops), max(c[a].stop for c in crops)) for a in range(3))

    @property
    def region_ids(self) -> list[int]:
        return [r.id for r in self._regions]

    def fit(self, region_id: int, bin_width: float, smoothing: float, on_core: bool = False) -> Fit | None:
        """The cached fit of one region for a histogram setting (None: ``on_core`` and an empty core)."""
        return self._fits_for(bin_width, smoothing, on_core)[self._regions.index(self._by_id[region_id])]

    def fit_for(self, region_id: int, params: PostParams) -> tuple[Fit, bool]:
        """The fit ``params`` decide region ``region_id`` with, and whether it is the core's; its
        ``failure`` says so where the decision falls back to the median (as the table's fit_quality)."""
        fit, on_core, _ = self._decisive_fit(self._regions.index(self._by_id[region_id]), params)
        return fit, on_core

    def _decisive_fit(self, index: int, params: PostParams) -> tuple[Fit, bool, np.ndarray]:
        """(fit, on the core?, the HU values it is of); a sample under ``min_region_voxels`` marks the
        fit failed, so the decision falls back to the median."""
        region = self._regions[index]
        on_core = params.fit_on_core and region.core_hu.size >= params.min_region_voxels
        fit = self._fits_for(params.bin_width_hu, params.smoothing_bins, on_core)[index]
        hu = region.core_hu if on_core else region.hu
        if hu.size < params.min_region_voxels:
            fit = replace(fit, failure=f"fewer than {params.min_region_voxels} voxels")
        return fit, on_core, hu

    def apply(self, params: PostParams, overrides: dict[int, str] | None = None, *,
              out: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
        """New labels (uint8, 0 bg 1 liver 2 tumor 3 cyst) and the region table for ``params``.

        ``out``: an array an earlier ``apply`` returned, updated in place (only ``active_box`` is
        rewritten: no full-volume copy, for live updates).
        """
        overrides = self._checked(overrides or {})
        if not self._regions:
            return self._base.copy(), []
        if out is None:
            out = self._base.copy()
        else:
            if out.shape != self._base.shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
                raise ValueError("out must be a labels array an earlier apply returned (uint8, C order, the CT's shape)")
            box = self.active_box
            out[box] = self._base[box]
        flat = out.reshape(-1)
        rows = []
        for index, region in enumerate(self._regions):
            row = self._row(index, params, overrides.get(region.id))
            flat[region.index] = DECISION_LABELS[row["decision"]]
            rows.append(row)
        grown, dilated = {}, {}
        voxel_ml = float(np.prod(self.ct.spacing)) / 1000.0
        held = [r.hu.size if row["decision"] in ("tumor", "cyst") else 0 for r, row in zip(self._regions, rows)]
        for index in self._precedence:
            region, row = self._regions[index], rows[index]
            if row["decision"] == "tumor":
                grown[region.id] = self._grown_for(region, params)
                added = grown[region.id][flat[grown[region.id]] == 1]  # first come: a voxel two regions reach counts once
                flat[added] = 2
                dilated[index] = added
                row["dilated"] = bool(grown[region.id].size)
                row["dilated_ml"] = round(added.size * voxel_ml, 4)
                held[index] += added.size
        if params.refine_outlines:
            for index in self._precedence:
                region, row = self._regions[index], rows[index]
                if row["decision"] in ("tumor", "cyst"):
                    refinement = self._refined_for(index, row, grown.get(region.id), params)
                    added = self._still_reached(index, refinement.added, grown.get(region.id), dilated.get(index, NONE), flat)
                    flat[added] = DECISION_LABELS[row["decision"]]
                    row["refined_ml"] = round(added.size * voxel_ml, 4)
                    held[index] += added.size
                    row["outline"] = refinement.note
                    row["outline_liver_hu"] = round(refinement.liver_hu, 1)
                    row["outline_level_hu"] = round(refinement.level_hu, 1)
        for row, voxels in zip(rows, held):  # what each region holds in the labels: the rows sum to the lesion voxels
            row["final_ml"] = round(voxels * voxel_ml, 4)
        return out, rows

    def _precedence_key(self, index: int) -> tuple:
        region = self._regions[index]
        lps = self.ct.ijk_to_lps() @ np.array([*region.centroid[::-1], 1.0])
        return (-region.index.size, *(round(float(c), 2) for c in lps[:3]))

    def _still_reached(self, index: int, added: np.ndarray, grown: np.ndarray | None, dilated: np.ndarray,
                       flat: np.ndarray) -> np.ndarray:
        """The refinement's voxels (``added``, grown from the region and all of its dilation ``grown``) that
        are still free, and 26-connected through free ones to what the region holds (its voxels and the
        ``dilated`` ones it kept): never over another region, nor through one."""
        free = added[flat[added] == 1]
        if free.size == added.size and (grown is None or grown.size == dilated.size):
            return free
        region = self._regions[index]
        held = np.concatenate([region.index, free, dilated])
        coords = np.unravel_index(held, self._base.shape)
        box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
        local = tuple(c - b.start for c, b in zip(coords, box))
        shape = tuple(b.stop - b.start for b in box)
        allowed = np.zeros(shape, bool)
        allowed[local] = True
        seed = np.zeros(shape, bool)
        n_own = region.index.size
        seed[tuple(c[:n_own] for c in local)] = True
        seed[tuple(c[n_own + free.size:] for c in local)] = True
        reached = ndimage.binary_propagation(seed, structure=np.ones((3, 3, 3), bool), mask=allowed)
        keep = reached[tuple(c[n_own:n_own + free.size] for c in local)]
        return free[keep]

    def _checked(self, overrides: dict[int, str]) -> dict[int, str]:
        for rid, value in overrides.items():
            if rid not in self._by_id:
                raise ValueError(f"no region {rid}")
            if value not in ("tumor", "cyst"):
                raise ValueError(f"override for region {rid} must be 'tumor' or 'cyst', not {value!r}")
        return overrides

    def _fits_for(self, bin_width: float, smoothing: float, on_core: bool = False) -> list[Fit | None]:
        key = (float(bin_width), float(smoothing), bool(on_core))
        if key not in self._fits:
            values = (r.core_hu if on_core else r.hu for r in self._regions)
            self._fits[key] = [fit_region(hu, *key[:2]) if hu.size else None for hu in values]
        return self._fits[key]

    def _grown_for(self, region: _Region, params: PostParams) -> np.ndarray:
        key = (region.id, *_dilation_key(params))
        if key not in self._grown:
            if params.dilate_mode == "3d":  # depends only on the region and the CT's matrix
                self._grown[key] = _grow_3d(region, self._base.shape, self._order, self._axial_shape, self._scale)
            else:
                self._grown[key] = _grow_small(region, self._base.shape, self._order, *key[2:])
        return self._grown[key]

    def _widened(self, crop: tuple[slice, ...], max_mm: float) -> tuple[slice, ...]:
        """``crop`` with room for refining its region up to ``max_mm``, inside the volume."""
        reach = reach_voxels(self.ct.spacing[::-1], max_mm)
        return tuple(slice(max(c.start - p, 0), min(c.stop + p, n)) for c, p, n in zip(crop, reach, self._base.shape))

    def _refined_for(self, index: int, row: dict, grown: np.ndarray | None, params: PostParams) -> Refinement:
        region = self._regions[index]
        outer = self._widened(region.crop, params.refine_max_mm)  # no more than this setting reads
        dilated = grown is not None and grown.size > 0
        # a region the dilation leaves as it is shares one entry across dilation settings
        key = (region.id, row["decision"], row["fit_M"], _dilation_key(params) if dilated else None, params.refine_max_mm)
        if key not in self._refined:
            lesion = np.zeros(tuple(s.stop - s.start for s in outer), bool)
            inner = tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(region.crop, outer))
            lesion[inner] = region.own
            if dilated:
                coords = np.unravel_index(grown, self._base.shape)
                lesion[tuple(c - o.start for c, o in zip(coords, outer))] = True
            self._refined[key] = refine_outline(self.ct.array, self.ct.spacing[::-1], outer, lesion,
                                                self._parenchyma[outer], row["fit_M"], params.refine_max_mm)
        return self._refined[key]

    def _row(self, index: int, params: PostParams, override: str | None) -> dict:
        region = self._regions[index]
        fit, on_core, hu = self._decisive_fit(index, params)
        A, M, S, quality, fallback = _estimate(hu, fit)
        threshold = params.cyst_threshold_hu
        gate = params.min_peak_probability
        if override:
            decision, reason = override, "manual override"
        elif gate > 0 and region.peak < gate:  # NaN (no probability map) never compares below
            decision = "low confidence"
            reason = f"peak probability {region.peak:.3f} < {gate:g}: back to liver"
        elif not params.cyst_filter:
            decision, reason = "tumor", "cyst filter off"
        else:
            shown = round(M, 2)  # the table's fit_M: the decision and the reason use it, so all three agree
            limit = params.min_tissue_hu if shown < params.min_tissue_hu else threshold  # the one the reason quotes
            digits = 1 if (round(shown, 1) < limit) == (shown < limit) else 2  # never "45.0 HU < 45 HU"
            what = f"fallback median {shown:.{digits}f} HU ({fallback})" if fallback else f"fitted mean {shown:.{digits}f} HU"
            if on_core:
                what += " of the core"
            if shown < params.min_tissue_hu:
                decision, reason = "not tissue", f"{what} < {params.min_tissue_hu:g} HU: gas or fat, not a lesion (removed)"
            else:
                decision = "cyst" if shown < threshold else "tumor"
                reason = f"{what} {'<' if decision == 'cyst' else '>='} {threshold:g} HU threshold"
                if decision == "cyst" and shown < FAT_DENSITY_HU:  # simple cysts are water-like (about 0-20 HU); fat -190 to -30
                    reason += f"; below {FAT_DENSITY_HU:g} HU, fat density: check it is a lesion"
        k, j, i = region.centroid
        lps = self.ct.ijk_to_lps() @ (i, j, k, 1.0)
        return {
            "id": region.id,
            "centroid_ijk": [round(i, 2), round(j, 2), round(k, 2)],  # Slicer's IJK: column, row, slice
            "centroid_lps_mm": [round(float(v), 2) for v in lps[:3]],
            "centroid_ras_mm": [round(float(v), 2) for v in (-lps[0], -lps[1], lps[2])],
            "voxels": int(region.hu.size),
            "volume_ml": round(region.hu.size * float(np.prod(self.ct.spacing)) / 1000.0, 4),
            "fit_A": round(A, 2), "fit_M": round(M, 2), "fit_S": round(S, 2),
            "fit_quality": quality,
            "fit_on": "core" if on_core else "region",
            "peak_probability": None if math.isnan(region.peak) else round(region.peak, 3),  # None: no probability map
            "decision": decision,
            "reason": reason,
            "dilated": False,
            "dilated_ml": 0.0,
            "refined_ml": 0.0,
            "outline": "not refined",
            "outline_liver_hu": math.nan,
            "outline_level_hu": math.nan,
            "override": override,
        }


def _dilation_key(params: PostParams) -> tuple:
    """The settings a tumor's dilation depends on."""
    if params.dilate_mode == "3d":
        return ("3d",)
    return ("slice", params.dilate_iterations, params.dilate_max_area_px, params.dilate_connectivity)


def _estimate(hu: np.ndarray, fit: Fit) -> tuple[float, float, float, float | str, str | None]:
    """(A, M, S, fit quality, fallback reason): the fit, or median/MAD of ``hu`` where it failed."""
    reason = fit.failure
    if reason is None:
        return fit.A, fit.M, fit.S, round(fit.r2, 4), None
    median = float(np.median(hu))
    mad = float(np.median(np.abs(hu - median)))
    return float(hu.size), median, _MAD_TO_SD * mad, f"fallback: {reason}", reason


def grid_scale(shape: tuple[int, ...]) -> float:
    """In-plane pixels of a (slices, rows, cols) array per pixel of the authors' 256 grid (at least 1)."""
    return max((shape[1] / AUTHORS_GRID + shape[2] / AUTHORS_GRID) / 2.0, 1.0)


def authors_radius(voxels: int, shape: tuple[int, ...]) -> int:
    """The notebook's dilation count n for a region of ``voxels`` voxels in a (slices, rows, cols) array."""
    size = voxels * AUTHORS_GRID * AUTHORS_GRID / (shape[1] * shape[2])
    return next((n for limit, n in AUTHORS_SIZE_STEPS if size < limit), 0)


def authors_element(n: int, scale: float) -> np.ndarray:
    """The n-fold 6-cross scaled in-plane by ``scale``: {|dz| + (|dy| + |dx|) / scale <= n}."""
    reach = int(math.floor(n * scale + 1e-9))
    dz, dy, dx = np.ogrid[-n:n + 1, -reach:reach + 1, -reach:reach + 1]
    return scale * np.abs(dz) + np.abs(dy) + np.abs(dx) <= n * scale + 1e-9


def _crop_pad(scale: float) -> tuple[int, int, int]:
    """Room around a region for either mode: slice mode 0 / 3 / 3; 3-D mode up to n = 2 slices and 2s pixels."""
    n = AUTHORS_SIZE_STEPS[-1][1]
    in_plane = max(MAX_DILATE_ITERATIONS, int(math.floor(n * scale + 1e-9)))
    return (n, in_plane, in_plane)


def _find_regions(ct: np.ndarray, liver: np.ndarray, candidates: np.ndarray, pad: tuple[int, int, int],
                  probability: np.ndarray | None = None) -> list[_Region]:
    """3-D regions of the candidates, each with its crop (widened by ``pad``), flat indices, HU values
    and peak probability (``probability``: uint8 0-255)."""
    box = bounding_box(candidates, pad)  # room to dilate
    if box is None:
        return []
    components = cc3d.connected_components(candidates[box], connectivity=26)
    offset = np.array([s.start for s in box])
    regions = []
    for rid, found in enumerate(ndimage.find_objects(components), start=1):
        if found is None:
            continue
        local = _padded(found, components.shape, pad)
        comp = components[local]
        own = comp == rid
        crop = tuple(slice(s.start + o, s.stop + o) for s, o in zip(local, offset))
        coords = np.nonzero(own)
        full = tuple(c + s.start for c, s in zip(coords, crop))
        regions.append(_Region(
            id=rid, crop=crop, own=own,
            allowed=liver[crop] & ((comp == 0) | own),
            index=np.ravel_multi_index(full, ct.shape),
            hu=ct[full].astype(np.float64),
            core_hu=ct[crop][ndimage.binary_erosion(own, _CUBE)].astype(np.float64),
            centroid=tuple(float(c.mean()) for c in full),
            peak=math.nan if probability is None else float(probability[full].max()) / 255.0,
        ))
    return regions


def _padded(found: tuple[slice, ...], shape: tuple[int, ...], pad: tuple[int, int, int]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(found, pad, shape))


def _added(region: _Region, grown: np.ndarray, own: np.ndarray, order, shape) -> np.ndarray:
    """Flat indices into the volume of the voxels ``grown`` adds to ``own`` (both in axial order)."""
    found = np.nonzero(grown & ~own)
    coords = [found[order.index(a)] + region.crop[a].start for a in range(3)]
    return np.ravel_multi_index(tuple(coords), shape)


def _grow_small(region: _Region, shape, order, iterations: int, max_area: int, connectivity: int) -> np.ndarray:
    """Flat indices added by dilating the region's small 2-D components (per axial slice: array axes in
    ``order``, the axial axis first) inside ``allowed``."""
    if iterations == 0:
        return np.empty(0, dtype=np.int64)
    own, allowed = np.transpose(region.own, order), np.transpose(region.allowed, order)
    struct = _IN_PLANE[connectivity]
    components, _ = ndimage.label(own, structure=struct)
    small = np.bincount(components.ravel()) < max_area
    small[0] = False
    seeds = small[components]
    if not seeds.any():
        return np.empty(0, dtype=np.int64)
    grown = ndimage.binary_dilation(seeds, structure=struct, iterations=iterations, mask=allowed)
    return _added(region, grown, own, order, shape)


def _grow_3d(region: _Region, shape, order, axial_shape, scale: float) -> np.ndarray:
    """Flat indices added by the notebook's rule (3-D mode): one dilation with the scaled n-fold cross
    (in axial order, see ``_grow_small``), inside ``allowed``."""
    n = authors_radius(region.hu.size, axial_shape)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    own = np.transpose(region.own, order)
    grown = ndimage.binary_dilation(own, structure=authors_element(n, scale)) & np.transpose(region.allowed, order)
    return _added(region, grown, own, order, shape)


def save_region_histogram_png(processor: PostProcessor, region_id: int, path, params: PostParams,
                              row: dict | None = None) -> None:
    """The region's HU histogram (bars), smoothed curve, fitted Gaussian and threshold line, as PNG;
    with its table ``row``, also its decision and reason (and, where the fit fell back, the median decided
    on), the liver HU around it and the level the outline refinement grew it to."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no global backend change

    fit, on_core = processor.fit_for(region_id, params)
    where = " (core)" if on_core else ""
    bw = params.bin_width_hu
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.bar(fit.centers, fit.counts / bw, width=bw, color="0.75", label="histogram")
    ax.plot(fit.centers, fit.smoothed / bw, color="tab:blue", label="smoothed")
    if fit.failure is None:
        x = np.linspace(fit.centers[0], fit.centers[-1], 400)
        ax.plot(x, gaussian(x, fit.A, fit.M, fit.S), color="tab:red", label="Gaussian fit")
        title = f"region {region_id}{where}: A={fit.A:.0f} M={fit.M:.1f} HU S={fit.S:.1f} HU (R^2 {fit.r2:.3f})"
    else:
        title = f"region {region_id}{where}: fallback ({fit.failure})"
        if row is not None and math.isfinite(row.get("fit_M", math.nan)):
            ax.axvline(row["fit_M"], color="tab:red", label=f"median {row['fit_M']:.1f} HU (decided on)")
    if row is not None:
        title += f"\n-> {row['decision']}: {row['reason']}"
    ax.axvline(params.cyst_threshold_hu, color="k", linestyle="--", label=f"threshold {params.cyst_threshold_hu:g} HU")
    if row is not None and math.isfinite(row.get("outline_level_hu", math.nan)):
        ax.axvline(row["outline_liver_hu"], color="tab:green", linestyle="-.", label=f"liver around {row['outline_liver_hu']:.0f} HU")
        ax.axvline(row["outline_level_hu"], color="tab:orange", linestyle=":", label=f"outline level {row['outline_level_hu']:.0f} HU")
    ax.set(title=title, xlabel="HU", ylabel="voxels per HU")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.savefig(path)


TABLE_COLUMNS = ("id", "decision", "reason", "override", "voxels", "volume_ml", "fit_A", "fit_M", "fit_S", "fit_quality",
                 "fit_on", "peak_probability", "dilated", "dilated_ml", "refined_ml", "final_ml", "outline", "outline_liver_hu", "outline_level_hu", "centroid_ijk", "centroid_lps_mm", "centroid_ras_mm")


def table_csv(rows: list[dict]) -> str:
    """The region table as CSV text (vectors as space-separated numbers)."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(TABLE_COLUMNS)
    for row in rows:
        writer.writerow([" ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row[c]) if isinstance(row[c], (list, tuple))
                         else (f"{row[c]:.4g}" if isinstance(row[c], float) else row[c]) for c in TABLE_COLUMNS])
    return out.getvalue()
