"""The panel's enabling rules and control semantics, in plain Python (no Qt, no Slicer)."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "LiverTumorSeg"))

from LiverTumorSegLib.postprocess import PostParams  # noqa: E402
from LiverTumorSegSlicer import dependencies, panel  # noqa: E402
from LiverTumorSegSlicer.panel import PanelInputs, panel_view  # noqa: E402


def test_no_input_turns_the_button_off_with_every_reason():
    view = panel_view(PanelInputs(volume_problem="Select a CT volume.", model_problem="Unknown model 'x'."))
    assert view.button_text == "Segment tumors" and not view.button_enabled
    assert view.button_tooltip.splitlines() == ["Select a CT volume.", "Unknown model 'x'."]
    assert view.inputs_enabled and not view.postprocessing_enabled and not view.progress_visible


def test_ready_button_says_what_it_does_and_what_it_will_install():
    view = panel_view(PanelInputs(volume_problem=None, missing_packages=("torch", "monai>=1.4")))
    assert view.button_enabled and "Segment the liver" in view.button_tooltip
    assert "install: torch, monai>=1.4" in view.button_tooltip


def test_running_locks_inputs_and_turns_the_button_into_cancel():
    view = panel_view(PanelInputs(volume_problem=None, running=True, has_result=True))
    assert view.button_text == "Cancel" and view.button_enabled
    assert not view.inputs_enabled and not view.postprocessing_enabled and view.progress_visible


def test_post_processing_only_with_a_result():
    assert not panel_view(PanelInputs(volume_problem=None)).postprocessing_enabled
    assert panel_view(PanelInputs(volume_problem=None, has_result=True)).postprocessing_enabled


def test_controls_map_to_post_processing_settings_within_their_ranges():
    params = panel.params_from_controls(dilate_iterations=1, dilate_max_area_px=50, cyst_filter=True, cyst_threshold_hu=60)
    assert params == PostParams(dilate_iterations=1, dilate_max_area_px=50, cyst_threshold_hu=60.0)
    clamped = panel.params_from_controls(dilate_iterations=9, dilate_max_area_px=-5, cyst_filter=False, cyst_threshold_hu=500)
    assert (clamped.dilate_iterations, clamped.dilate_max_area_px, clamped.cyst_threshold_hu) == (3, 0, 120.0)
    assert not clamped.cyst_filter
    assert panel.DEFAULTS.cyst_threshold_hu == 45.0 and panel.CYST_THRESHOLD_HU == (-20.0, 120.0)


def test_region_table_cells_and_status_line():
    rows = [{"id": 3, "volume_ml": 1.234, "fit_M": 30.4, "decision": "cyst", "reason": "fitted mean 30.4 HU < 45 HU", "override": None},
            {"id": 4, "volume_ml": 12.0, "fit_M": 90.0, "decision": "cyst", "reason": "manual override", "override": "cyst"}]
    cells = panel.region_table(rows)
    assert cells[0] == ("3", "1.23", "30", "cyst", "fitted mean 30.4 HU < 45 HU")
    assert cells[1][3] == "cyst (by hand)"
    report = {"device": "cpu (2 threads)", "timings": {"liver_s": 1.25, "tumor_s": 2.5}, "warnings": []}
    assert panel.status_line(report) == "Done on cpu (2 threads): liver 1.2 s, tumors 2.5 s"


def test_installs_never_replace_slicers_own_packages(tmp_path):
    text = dependencies.constraints_text()
    assert "numpy==" in text and "SimpleITK==" in text  # installed here, so pinned
    args = dependencies.pip_arguments(["torch", "monai>=1.4"], tmp_path / "c.txt")
    assert args == ["monai>=1.4", "-c", str(tmp_path / "c.txt")]
    assert dependencies.missing() == []  # this environment has everything the core needs
