"""Importing the pyliverlesionseg networks from PyPI and segmenting a real CT with them.

The network is used only to download the wheel, once: it is cached in $LIVERTUMORSEG_TEST_CACHE
(default ~/.cache/livertumorseg-tests). Offline, the tests skip with the reason, except in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.errors import ModelFileError
from LiverTumorSegLib.imageio import read_labels, read_volume
from LiverTumorSegLib.importer import CITATION, import_pyliverlesionseg
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
