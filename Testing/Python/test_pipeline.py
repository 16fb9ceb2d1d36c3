"""Two-stage inference with the bundled models: accuracy on a fresh phantom, geometry, cache, cancel."""

import copy
import threading

import numpy as np
import pytest
import torch

from LiverTumorSegLib.errors import Cancelled, InputError
from LiverTumorSegLib.metrics import dice
from LiverTumorSegLib.modelfile import load_model
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.pipeline import Probabilities, segment
from LiverTumorSegLib.postprocess import PostParams, PostProcessor
from LiverTumorSegLib.registry import model_files
from LiverTumorSegLib.volume import Volume

EVAL_SEED = 2024  # not a training seed (1000-1059)


@pytest.fixture(scope="module")
def models():
    liver, tumor = model_files("phantom-small")
    return load_model(liver, stage="liver"), load_model(tumor, stage="tumor")


@pytest.fixture(scope="module")
def case():
    return generate_case(EVAL_SEED, spacing=(1.2, 1.2, 4.0), matrix=300, orientation=False)


@pytest.fixture(scope="module")
def result(models, case):
    return segment(case[0], *models, fast=True)


def test_liver_found_on_fresh_phantom(result, case):
    assert result.labels.shape == case[0].array.shape
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    assert dice(result.labels > 0, case[1].array > 0) > 0.9


def _flip(vol: Volume, axis: int) -> Volume:
    """The same physical image stored with voxel axis ``axis`` (0 = i) reversed."""
    d = vol.direction.copy()
    n = vol.array.shape[2 - axis]
    origin = np.asarray(vol.origin) + d[:, axis] * vol.spacing[axis] * (n - 1)
    d[:, axis] *= -1
    return Volume(np.flip(vol.array, 2 - axis).copy(), vol.spacing, origin, d)


def _swap_ik(vol: Volume) -> Volume:
    """The same physical image stored with voxel axes i and k exchanged."""
    d = vol.direction[:, [2, 1, 0]]
    s = vol.spacing[::-1]
    return Volume(vol.array.transpose(2, 1, 0).copy(), s, vol.origin, d)


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 1, 2)])
def test_flipped_storage_gives_flipped_labels(models, case, result, axes):
    vol, expected = case[0], result.labels
    for a in axes:
        vol, expected = _flip(vol, a), np.flip(expected, 2 - a)
    assert np.array_equal(segment(vol, *models, fast=True).labels, expected)


def test_permuted_and_oblique_storage(models, case, result):
    swapped = _swap_ik(case[0])
    assert np.array_equal(segment(swapped, *models, fast=True).labels, result.labels.transpose(2, 1, 0))
    c, s = np.cos(np.radians(8)), np.sin(np.radians(8))
    oblique = Volume(case[0].array, case[0].spacing, case[0].origin, np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]))
    assert np.array_equal(segment(oblique, *models, fast=True).labels, result.labels)


@pytest.mark.parametrize("storage", ["as generated", "i and k swapped", "j flipped"])
def test_probability_cache_reproduces_labels(models, case, result, tmp_path, storage):
    if storage != "as generated":
        result = segment(_swap_ik(case[0]) if storage == "i and k swapped" else _flip(case[0], 1), *models, fast=True)
    assert (result.labels == 2).any()
    path = tmp_path / "probs.npz"
    result.probabilities.save(path)
    probs = Probabilities.load(path)
    assert probs.liver.dtype == np.uint8 and probs.box == result.probabilities.box
    tumor = probs.tumor_full() >= 128
    assert np.array_equal(tumor, result.labels == 2)  # labels are the cache thresholded at 0.5
    liver = result.labels == 1
    assert (probs.liver[liver] < 128).mean() < 0.01  # only holes filled inside the largest component


def test_card_threshold_reaches_labels_cache_and_postprocessing(models, case, tmp_path):
    """A card cut-off other than 0.5 governs the labels, is kept in the cache, and the post-processing
    candidates then equal the network's tumor labels (filter, dilation and outline refinement off)."""
    liver_model, tumor_model = models
    strict = copy.copy(tumor_model)
    strict.card = copy.deepcopy(tumor_model.card)
    strict.card["inference"]["threshold"] = 0.8
    result = segment(case[0], liver_model, strict, fast=True)
    probs = result.probabilities
    assert probs.tumor_threshold == 204
    assert np.array_equal(result.labels == 2, probs.tumor_full() >= 204)
    assert ((probs.tumor_full() >= 128) & (probs.tumor_full() < 204)).any()  # the cut-off matters here
    path = tmp_path / "probs.npz"
    probs.save(path)
    loaded = Probabilities.load(path)
    assert loaded.tumor_threshold == 204
    off = PostParams(cyst_filter=False, dilate_iterations=0, refine_outlines=False, min_peak_probability=0.0)
    out, _ = PostProcessor.from_network(case[0], result.labels, loaded).apply(off)
    assert np.array_equal(out, result.labels)


def test_progress_is_monotonic_and_complete(models, case):
    seen = []
    segment(case[0], *models, fast=True, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("Liver: tile") for _, m in seen) and any(m.startswith("Tumors: tile") for _, m in seen)


def test_cancel_mid_run(models, case):
    event = threading.Event()
    calls = []

    def progress(fraction, message):
        calls.append(message)
        if "tile" in message:
            event.set()

    with pytest.raises(Cancelled):
        segment(case[0], *models, fast=True, progress=progress, cancel=event)
    assert any("Liver" in m for m in calls)


def test_not_a_ct_is_refused(models, case):
    mr_like = case[0].with_array((case[0].array.astype(np.float32) + 1024) * 2)
    with pytest.raises(InputError, match="Hounsfield"):
        segment(mr_like, *models)


def test_no_liver_is_a_result_not_a_crash(models, case):
    """Stage 1 finding nothing gives empty labels and a warning, and skips stage 2."""
    blind = copy.deepcopy(models[0])
    with torch.no_grad():  # a liver network that always answers "background"
        blind.net.head.conv.conv.bias.copy_(torch.tensor([50.0, -50.0]))
    res = segment(case[0], blind, models[1], fast=True)
    assert not res.labels.any() and res.report["liver_found"] is False
    assert res.report["tiles"]["tumor"] == 0 and "No liver found" in res.report["warnings"][0]
    assert "abdominal CT covering the liver" in res.report["warnings"][0]
    ct = case[0]
    thin = Volume(ct.array[:3].copy(), ct.spacing, ct.origin, ct.direction)  # 3 slices: the warning names the likelier cause
    res = segment(thin, blind, models[1], fast=True)
    assert "only 3 slices" in res.report["warnings"][-1] and "abdominal CT" not in res.report["warnings"][-1]


def test_a_liver_under_one_model_voxel_still_centres_the_tumor_search(models):
    """One liver voxel at 0.5 mm vanishes on the tumor model's 2 x 1.25 x 1.25 mm grid when resized:
    the search region must still be around it (it was a block in the crop's corner)."""
    from LiverTumorSegLib.pipeline import tumor_stage_input

    liver = np.zeros((20, 40, 40), bool)
    liver[10, 20, 20] = True
    hu = np.full(liver.shape, 60.0)
    img, mask, box = tumor_stage_input(hu, liver, (0.5, 0.5, 0.5), models[1].card["preprocessing"])
    assert mask.any() and not mask.all()
    centre = np.argwhere(mask).mean(0) * np.array([s.stop - s.start for s in box]) / np.array(mask.shape)
    liver_at = np.array([10, 20, 20]) - np.array([s.start for s in box])
    assert np.all(np.abs(centre - liver_at) < 3), (centre, liver_at)  # within a few input voxels
