"""The panel's enabling rules and control semantics, in plain Python (no Qt, no Slicer)."""

from __future__ import annotations

import dataclasses
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "LiverTumorSeg"))

from LiverTumorSegLib.postprocess import PostParams  # noqa: E402
from LiverTumorSegSlicer import dependencies, panel  # noqa: E402
from LiverTumorSegSlicer.panel import PanelInputs, panel_view  # noqa: E402


def test_no_input_turns_the_button_off_with_every_reason():
    view = panel_view(PanelInputs(volume_problem="Select a CT volume.", model_problem="Unknown model 'x'.",
                                  output_problem="The output segmentation 'A seg' belongs to 'A'."))
    assert view.button_text == "Segment tumors" and not view.button_enabled
    assert view.button_tooltip.splitlines() == ["Select a CT volume.", "Unknown model 'x'.",
                                                "The output segmentation 'A seg' belongs to 'A'."]
    only_output = panel_view(PanelInputs(volume_problem=None, output_problem="belongs to another volume"))
    assert not only_output.button_enabled  # a run into another volume's node would be wasted: not started
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
    current = PostParams(bin_width_hu=2.0, smoothing_bins=0.0, min_tissue_hu=-300.0)  # settings the panel does not show
    params = panel.params_from_controls(current, dilate_iterations=1, dilate_max_area_px=50, cyst_filter=True, cyst_threshold_hu=60,
                                        dilate_mode="3d", fit_on_core=False, refine_outlines=True, refine_max_mm=2.5,
                                        min_peak_probability=0.7)
    assert params == PostParams(dilate_iterations=1, dilate_max_area_px=50, cyst_threshold_hu=60.0, dilate_mode="3d",
                                bin_width_hu=2.0, smoothing_bins=0.0, min_tissue_hu=-300.0, fit_on_core=False, refine_max_mm=2.5,
                                min_peak_probability=0.7)
    clamped = panel.params_from_controls(current, dilate_iterations=9, dilate_max_area_px=-5, cyst_filter=False, cyst_threshold_hu=500,
                                         dilate_mode="bogus", fit_on_core=True, refine_outlines=False, refine_max_mm=99,
                                         min_peak_probability=1.5)
    assert (clamped.dilate_iterations, clamped.dilate_max_area_px, clamped.cyst_threshold_hu) == (3, 0, 120.0)
    assert not clamped.cyst_filter and clamped.dilate_mode == "slice" and clamped.fit_on_core
    assert not clamped.refine_outlines and clamped.refine_max_mm == 10.0 and clamped.min_peak_probability == 0.95
    for restored in (PostParams(cyst_threshold_hu=70.0, dilate_iterations=0, cyst_filter=False, fit_on_core=False),
                     PostParams(dilate_mode="3d", dilate_iterations=1, refine_outlines=False, refine_max_mm=6.5,
                                min_peak_probability=0.6)):
        assert panel.params_from_controls(restored, **panel.controls_from_params(restored)) == restored


def _as_shown(params) -> dict:
    """The control values a Qt panel shows for ``params``: each number clamped to its range and rounded to its decimals."""
    bounds = {"dilate_iterations": panel.DILATE_ITERATIONS, "dilate_max_area_px": panel.DILATE_MAX_AREA_PX,
              "cyst_threshold_hu": panel.CYST_THRESHOLD_HU, "refine_max_mm": panel.REFINE_MM,
              "min_peak_probability": panel.MIN_PEAK}
    values = panel.controls_from_params(params)
    for key, (lo, hi) in bounds.items():
        values[key] = round(min(max(values[key], lo), hi), panel.DECIMALS[key])
    return values


def test_a_control_that_only_rounds_or_clamps_a_stored_setting_leaves_it_alone():
    stored = PostParams(min_peak_probability=0.625, cyst_threshold_hu=150.0, refine_max_mm=2.25, dilate_max_area_px=2000)
    shown = _as_shown(stored)
    assert (shown["min_peak_probability"], shown["cyst_threshold_hu"], shown["refine_max_mm"]) == (0.62, 120.0, 2.2)
    assert panel.params_from_controls(stored, **shown) == stored  # e.g. the dilation mode toggled: nothing else moves
    assert panel.params_from_controls(stored, **dict(shown, min_peak_probability=0.63)) == stored  # Qt may round half up
    moved = panel.params_from_controls(stored, **dict(shown, min_peak_probability=0.7))
    assert moved == dataclasses.replace(stored, min_peak_probability=0.7)  # only the control the user moved
    dragged = panel.params_from_controls(stored, **dict(shown, cyst_threshold_hu=119.0, dilate_max_area_px=999))
    assert (dragged.cyst_threshold_hu, dragged.dilate_max_area_px) == (119.0, 999)


def test_dilation_mode_combo_and_which_spin_boxes_it_leaves_on():
    assert [panel.dilate_mode_at(i) for i in range(len(panel.DILATE_MODES))] == ["slice", "3d"]
    assert panel.dilate_mode_at(-1) == panel.dilate_mode_at(7) == "slice"  # no selection: the default
    assert [panel.dilate_mode_index(m) for m in ("slice", "3d", "other")] == [0, 1, 0]
    assert panel.slice_dilation_controls_enabled("slice")  # iterations and max area act per slice ...
    assert not panel.slice_dilation_controls_enabled("3d")  # ... the 3-D mode ignores them: disabled
    assert panel.slice_dilation_controls_enabled(PostParams().dilate_mode)  # on by default


def test_ui_control_ranges_and_defaults_are_the_panels_and_the_cores():
    import xml.etree.ElementTree as ET

    from LiverTumorSegLib.outline import MAX_REFINE_MM
    from LiverTumorSegLib.postprocess import MAX_DILATE_ITERATIONS

    ui = ET.parse(REPO / "LiverTumorSeg" / "Resources" / "UI" / "LiverTumorSeg.ui")
    props = {w.get("name"): {p.get("name"): "".join(p.itertext()).strip() for p in w.findall("property")} for w in ui.iter("widget")}
    defaults = panel.controls_from_params(PostParams())
    for name, bounds, key in (("dilateIterationsSpinBox", panel.DILATE_ITERATIONS, "dilate_iterations"),
                              ("dilateMaxAreaSpinBox", panel.DILATE_MAX_AREA_PX, "dilate_max_area_px"),
                              ("cystThresholdSlider", panel.CYST_THRESHOLD_HU, "cyst_threshold_hu"),
                              ("refineMmSpinBox", panel.REFINE_MM, "refine_max_mm"),
                              ("minPeakSpinBox", panel.MIN_PEAK, "min_peak_probability")):
        p = props[name]
        assert (float(p["minimum"]), float(p["maximum"])) == bounds, name
        assert float(p["value"]) == defaults[key], name
        assert int(p.get("decimals", 2 if name == "cystThresholdSlider" else 0)) == panel.DECIMALS[key], name  # ctk's default: 2
    assert (props["cystFilterCheckBox"]["checked"] == "true") == defaults["cyst_filter"]
    assert (props["cystCoreCheckBox"]["checked"] == "true") == defaults["fit_on_core"]
    assert (props["refineCheckBox"]["checked"] == "true") == defaults["refine_outlines"]
    combo = next(w for w in ui.iter("widget") if w.get("name") == "dilateModeComboBox")
    items = ["".join(i.find("property").itertext()).strip() for i in combo.findall("item")]
    assert items == [text for _, text in panel.DILATE_MODES]  # index i of the combo box is DILATE_MODES[i]
    assert "currentIndex" not in props["dilateModeComboBox"] and defaults["dilate_mode"] == panel.DILATE_MODES[0][0]
    from LiverTumorSegLib.cli import build_parser, post_params

    for argv in (["segment", "ct.nrrd", "-o", "s.seg.nrrd"], ["demo"], ["evaluate", "--model", "m", "-o", "e"]):
        assert build_parser().parse_args(argv).tta is True  # the command line mirrors by default, as the panel does
    assert build_parser().parse_args(["demo", "--no-tta"]).tta is False
    for argv in (["postprocess", "--ct", "a", "--labels", "b", "-o", "c"], ["segment", "ct.nrrd", "-o", "s.seg.nrrd"]):
        args = build_parser().parse_args(argv)
        assert args.fit_whole_region is (not defaults["fit_on_core"])  # the core fit, as the panel
        assert args.no_refine_outlines is (not defaults["refine_outlines"]) and args.refine_mm == defaults["refine_max_mm"]
        assert args.min_peak is None and post_params(args).min_peak_probability == defaults["min_peak_probability"] == 0.6
    assert props["ttaCheckBox"]["checked"] == "true"
    assert panel.DILATE_ITERATIONS[1] == MAX_DILATE_ITERATIONS
    assert panel.REFINE_MM[1] == MAX_REFINE_MM
    assert panel.CYST_THRESHOLD_HU == (-20.0, 120.0) and defaults["cyst_threshold_hu"] == 45.0  # the slider


def test_region_table_cells_and_status_line():
    rows = [{"id": 3, "volume_ml": 1.234, "fit_M": 30.4, "decision": "cyst", "reason": "fitted mean 30.4 HU < 45 HU", "override": None,
             "refined_ml": 0.456, "outline": "liver 98 HU, grown to 64 HU", "peak_probability": 0.914},
            {"id": 4, "volume_ml": 12.0, "fit_M": 90.0, "decision": "cyst", "reason": "manual override", "override": "cyst",
             "refined_ml": 0.0, "outline": "liver 95 HU, contrast under 10 HU: outline kept"}]
    cells = panel.region_table(rows)
    assert cells[0] == ("3", "1.23", "30", "0.914", "cyst", "fitted mean 30.4 HU < 45 HU", "+0.46 mL: liver 98 HU, grown to 64 HU")
    assert cells[1][4] == "cyst (by hand)" and cells[1][6] == "liver 95 HU, contrast under 10 HU: outline kept"
    assert cells[1][3] == ""  # no peak known (a row from labels alone)
    assert all(len(c) == len(panel.REGION_COLUMNS) for c in cells)
    report = {"device": "cpu (2 threads)", "timings": {"liver_s": 1.25, "tumor_s": 2.5}, "warnings": []}
    assert panel.status_line(report) == "Done on cpu (2 threads): liver 1.2 s, tumors 2.5 s"


def test_installs_never_replace_slicers_own_packages(tmp_path):
    text = dependencies.constraints_text()
    assert "numpy==" in text and "SimpleITK==" in text  # installed here, so pinned
    args = dependencies.pip_arguments(["torch", "monai>=1.4"], tmp_path / "c.txt")
    assert args == ["monai>=1.4", "-c", str(tmp_path / "c.txt")]



def test_slicer_installs_what_pyproject_requires():
    import re
    import tomllib

    required = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower() for r in required}
    installed_by_us = {re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower() for r in dependencies.REQUIREMENTS.values()}
    assert names - installed_by_us == {p.lower() for p in dependencies.PROTECTED if p.lower() in names}
    assert installed_by_us <= names
    torch_minimum = next(r for r in required if r.startswith("torch"))
    assert re.split(r"[ ,#]", torch_minimum)[0] == "torch" + dependencies.torch_requirement()


def test_an_old_pytorch_counts_as_missing(monkeypatch):
    """Older PyTorch lacks APIs the core uses on a GPU: the panel asks the PyTorch extension for a newer one."""
    import importlib.metadata

    version = importlib.metadata.version
    for installed, old in (("2.4.1+cu121", True), ("2.5.0", False), ("2.13.0+cpu", False), ("1.13.1", True)):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=installed: v if name == "torch" else version(name))
        assert ("torch" in dependencies.missing()) is old, installed

    def no_metadata(name):
        if name == "torch":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)  # a torch build on PYTHONPATH: no dist-info
    assert "torch" not in dependencies.missing()


def test_disclaimer_names_the_models_use_and_measured_figures():
    text = panel.disclaimer("phantom-small")
    assert "NOT FOR CLINICAL USE" in text and "synthetic phantoms" in text and "Measured:" in text
    broken = panel.disclaimer("/no/such/model")
    assert broken.startswith(panel.DISCLAIMER) and "Unknown model" in broken
