"""Importing the pyliverlesionseg networks from PyPI and segmenting a real CT with them.

The network is used only to download the wheel, once: it is cached in $LIVERTUMORSEG_TEST_CACHE
(default ~/.cache/livertumorseg-tests). Offline, the tests skip with the reason, except in CI.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from LiverTumorSegLib.cli import main
from LiverTumorSegLib.errors import ModelFileError
from LiverTumorSegLib.imageio import read_labels, read_volume
from LiverTumorSegLib.importer import CITATION, WHEEL, WHEEL_SHA256, download_wheel, import_pyliverlesionseg
from LiverTumorSegLib.metrics import dice
from LiverTumorSegLib.modelfile import load_model, read_card

CACHE = Path(os.environ.get("LIVERTUMORSEG_TEST_CACHE", Path.home() / ".cache" / "livertumorseg-tests"))


@pytest.fixture(scope="module")
def imported():
    """The user model folder of a test home with pyliverlesionseg imported (downloaded once)."""
    home = CACHE / "home"
    previous = os.environ.get("LIVERTUMORSEG_HOME")
    os.environ["LIVERTUMORSEG_HOME"] = str(home)
    try:
        try:
            folder, _ = import_pyliverlesionseg()
        except ModelFileError as err:
            if "Could not download" in str(err) and os.environ.get("CI") != "true":
                pytest.skip(f"pyliverlesionseg could not be downloaded (offline?): {err}")
            raise
        yield folder
    finally:
        if previous is None:
            os.environ.pop("LIVERTUMORSEG_HOME", None)
        else:
            os.environ["LIVERTUMORSEG_HOME"] = previous


@pytest.fixture(scope="module")
def wheel() -> Path:
    """The pyliverlesionseg 0.3 wheel (sha256 checked), downloaded once into the test cache."""
    path = CACHE / WHEEL
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            download_wheel(CACHE)
        except ModelFileError as err:
            if os.environ.get("CI") != "true":
                pytest.skip(f"pyliverlesionseg could not be downloaded (offline?): {err}")
            raise
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WHEEL_SHA256
    return path


@pytest.mark.parametrize("case", ["hcc-tace-seg-hcc048/ct.nii.gz", "lits-volume0-ct/ct.nii.gz",
                                  "totalseg-example/example_ct_sm.nii.gz"])
def test_our_abdomen_box_is_theirs_on_real_ct(wheel, shared_data, case):
    from LiverTumorSegLib.kulcrop import abdomen_box
    from LiverTumorSegLib.kulpipeline import ras_array

    hu, spacing, _ = ras_array(read_volume(shared_data(case)))
    lps = np.ascontiguousarray(np.flip(hu, (0, 1)))  # their input: LPS index order, z toward the head
    sys.path.insert(0, str(REPO / "scripts"))
    from measure_abdomen_box import their_crop  # their function, compiled from the wheel (not shipped)

    theirs = their_crop(wheel)(lps, spacing)
    ours = abdomen_box(lps, spacing)
    assert ours.fallback is None
    assert [(int(s.start), int(s.stop)) for s in ours.box] == [(int(s.start), int(s.stop)) for s in theirs]


def test_import_writes_full_cards_and_a_second_call_does_nothing(imported):
    liver, tumor = load_model(imported / "liver.ltsm", stage="liver"), load_model(imported / "tumor.ltsm", stage="tumor")
    assert sum(p.numel() for p in liver.net.parameters()) == 3_874_961
    assert sum(p.numel() for p in tumor.net.parameters()) == 3_464_221
    card = read_card(imported / "tumor.ltsm")
    assert card["architecture"] == "kul-unet" and card["citation"] == CITATION
    assert "Apache-2.0" in card["licence"] and "NOT FOR CLINICAL USE" in card["intended_use"]
    assert "sha256" in card["training"]["source"] and card["preprocessing"]["voxel_size_mm"] == [1.0, 1.0, 3.0]
    assert read_card(imported / "liver.ltsm")["preprocessing"]["voxel_size_mm"] == [3.0, 3.0, 3.0]
    stamp = (imported / "liver.ltsm").stat().st_mtime_ns
    folder, fresh = import_pyliverlesionseg()
    assert folder == imported and not fresh and (imported / "liver.ltsm").stat().st_mtime_ns == stamp


def test_imported_networks_segment_a_real_ct(imported, shared_data, tmp_path, capsys):
    ct_file = shared_data("totalseg-example/example_ct_sm.nii.gz")
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(ct_file), "-o", str(out), "--model", "pyliverlesionseg", "--device", "cpu",
                 "--no-postprocess"]) == 0, capsys.readouterr().err
    ct, labels = read_volume(ct_file), read_labels(out)
    assert np.allclose(labels.ijk_to_lps(), ct.ijk_to_lps())
    reference = read_labels(shared_data("totalseg-example/example_seg.nii.gz"), ct).array == 5  # TotalSegmentator's liver
    assert dice(labels.array >= 1, reference) > 0.85  # two independent models agree on the liver
    # per-stage choice: the imported liver network with our tumor stage
    mixed = tmp_path / "mixed.nii.gz"
    assert main(["segment", str(ct_file), "-o", str(mixed), "--liver-model", "pyliverlesionseg", "--device", "cpu",
                 "--no-postprocess"]) == 0
    assert dice(read_labels(mixed).array >= 1, labels.array >= 1) > 0.99  # the same stage 1 (lesions may leave the liver)


def test_imported_liver_network_pseudo_labels_an_unlabelled_real_ct(imported, shared_data, tmp_path):
    import json

    ct_file = shared_data("totalseg-example/example_ct_sm.nii.gz")
    out = tmp_path / "pseudo"
    assert main(["pseudolabel", str(ct_file), "-o", str(out), "--device", "cpu"]) == 0  # default teacher: pyliverlesionseg
    manifest = json.loads((out / "pseudo-labels.json").read_text(encoding="utf-8"))
    assert manifest["teacher"]["liver"]["name"] == "pyliverlesionseg-0.3-liver" and manifest["teacher"]["liver"]["citation"]
    labels = read_labels(out / "example_ct_sm_label.nii.gz", read_volume(out / "example_ct_sm_ct.nii.gz")).array
    reference = read_labels(shared_data("totalseg-example/example_seg.nii.gz"), read_volume(ct_file)).array == 5
    assert set(np.unique(labels)) == {0, 1} and dice(labels == 1, reference) > 0.85


def test_a_liver_cut_by_their_box_is_segmented_again_in_a_taller_box(imported, shared_data):
    """HCC_048 has no pelvis in view: their hip rule puts the box's lower face through the liver."""
    from LiverTumorSegLib.kulcrop import abdomen_box
    from LiverTumorSegLib.kulpipeline import ras_array, segment_liver

    ct = read_volume(shared_data("hcc-tace-seg-hcc048/ct.nii.gz"))
    hu, spacing, reorient = ras_array(ct)
    their_z = abdomen_box(np.flip(hu, (0, 1)), spacing).box[2]
    notes = []
    liver = segment_liver(ct, load_model(imported / "liver.ltsm", stage="liver").net, warnings=notes)
    assert len(notes) == 1 and "lower face" in notes[0] and f"slice {their_z.start}" in notes[0]
    liver_z = np.flatnonzero(reorient.to_canonical(liver).any(axis=(1, 2)))  # canonical: axis 0 is z, feet first
    assert liver_z[0] < their_z.start - 10 and liver_z[-1] < their_z.stop  # the liver goes on below their box
    assert 1000 < liver.sum() * np.prod(ct.spacing) / 1000 < 2500  # mL: one whole liver
