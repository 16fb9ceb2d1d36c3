"""The panel's rules in plain Python (no Qt): what is enabled when, why not, and what the
post-processing controls mean. The Qt widget only copies these values onto its widgets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SEGMENT_TEXT, CANCEL_TEXT = "Segment tumors", "Cancel"
DILATE_ITERATIONS = (0, 3)  # postprocess.MAX_DILATE_ITERATIONS is the upper bound (tested)
DILATE_MAX_AREA_PX = (0, 1000)
# (PostParams.dilate_mode, the combo box's item text), in the combo box's order (tested against the .ui)
DILATE_MODES = (("slice", "Per slice (paper)"), ("3d", "3-D (authors' code)"))
CYST_THRESHOLD_HU = (-20.0, 120.0)
REFINE_MM = (0.5, 10.0)  # outline.MAX_REFINE_MM is the upper bound (tested)
MIN_PEAK = (0.0, 0.95)  # the confidence gate's spin box; 0 shows "off"
# decimals each number control shows (tested against the .ui; the slider shows ctkSliderWidget's default)
DECIMALS = {"cyst_threshold_hu": 2, "refine_max_mm": 1, "min_peak_probability": 2,
            "dilate_iterations": 0, "dilate_max_area_px": 0}
DISCLAIMER = "Research use only: NOT FOR CLINICAL USE."


def disclaimer(model) -> str:
    """The panel's top line for the chosen model: its intended use and measured figures, from its cards."""
    from LiverTumorSegLib.registry import model_summary

    try:
        return model_summary(model)
    except Exception as err:  # noqa: BLE001 - any unreadable model keeps the plain warning
        return f"{DISCLAIMER} ({err})"


@dataclass(frozen=True)
class PanelInputs:
    """What the rules look at. Problems are sentences, None when fine."""

    volume_problem: str | None = "Select a CT volume."
    model_problem: str | None = None
    output_problem: str | None = None
    missing_packages: tuple[str, ...] = ()
    running: bool = False
    has_result: bool = False


@dataclass(frozen=True)
class PanelView:
    button_text: str
    button_enabled: bool
    button_tooltip: str
    inputs_enabled: bool
    postprocessing_enabled: bool
    progress_visible: bool


def panel_view(state: PanelInputs) -> PanelView:
    """The panel for a state: while running the button is Cancel and the inputs are locked; else
    the button is enabled only when nothing is wrong, and its tooltip lists every reason it is not."""
    if state.running:
        return PanelView(CANCEL_TEXT, True, "Stop the segmentation (the scene is left as it was).",
                         inputs_enabled=False, postprocessing_enabled=False, progress_visible=True)
    reasons = [r for r in (state.volume_problem, state.model_problem, state.output_problem) if r]
    tooltip = "\n".join(reasons) if reasons else "Segment the liver, liver tumors and cysts in the selected CT."
    if state.missing_packages and not reasons:
        tooltip += f"\nFirst asks to install: {', '.join(state.missing_packages)}."
    return PanelView(SEGMENT_TEXT, not reasons, tooltip, inputs_enabled=True,
                     postprocessing_enabled=state.has_result, progress_visible=False)


def _clamp(value, bounds):
    lo, hi = bounds
    return min(max(value, lo), hi)


def _from_control(key: str, stored, shown, bounds):
    """The setting a number control stands for: the stored value while the control still shows it
    (a control rounds to its decimals and clamps to its range, which must not change a setting by
    itself), else the control's value within its range."""
    if abs(_clamp(stored, bounds) - shown) <= 0.5001 * 10.0 ** -DECIMALS[key]:  # either way of rounding a half
        return stored
    return _clamp(shown, bounds)


def dilate_mode_index(mode: str) -> int:
    """The combo box index that shows a ``PostParams.dilate_mode`` (an unknown mode shows the default, 0)."""
    return next((i for i, (m, _) in enumerate(DILATE_MODES) if m == mode), 0)


def dilate_mode_at(index: int) -> str:
    """The ``PostParams.dilate_mode`` of a combo box index (out of range: the default)."""
    return DILATE_MODES[index][0] if 0 <= index < len(DILATE_MODES) else DILATE_MODES[0][0]


def slice_dilation_controls_enabled(dilate_mode: str) -> bool:
    """The iterations and max-area spin boxes act only in the per-slice mode; the 3-D mode has its own rule."""
    return dilate_mode == "slice"


def params_from_controls(current, *, dilate_iterations: int, dilate_max_area_px: int, cyst_filter: bool,
                         cyst_threshold_hu: float, dilate_mode: str, fit_on_core: bool, refine_outlines: bool,
                         refine_max_mm: float, min_peak_probability: float):
    """``current`` (a ``PostParams``) with the panel's controls (clamped to their ranges; an unknown
    dilation mode is the default); the settings the panel does not show (bin width, smoothing, ...) are kept,
    and so is a number setting its control shows only rounded or clamped (``_from_control``)."""
    def number(key, shown, bounds, kind):
        return kind(_from_control(key, getattr(current, key), shown, bounds))

    return dataclasses.replace(
        current,
        dilate_mode=dilate_mode_at(dilate_mode_index(dilate_mode)),
        cyst_filter=bool(cyst_filter),
        fit_on_core=bool(fit_on_core),
        refine_outlines=bool(refine_outlines),
        refine_max_mm=number("refine_max_mm", refine_max_mm, REFINE_MM, float),
        min_peak_probability=number("min_peak_probability", min_peak_probability, MIN_PEAK, float),
        cyst_threshold_hu=number("cyst_threshold_hu", cyst_threshold_hu, CYST_THRESHOLD_HU, float),
        dilate_iterations=number("dilate_iterations", dilate_iterations, DILATE_ITERATIONS, int),
        dilate_max_area_px=number("dilate_max_area_px", dilate_max_area_px, DILATE_MAX_AREA_PX, int),
    )


def controls_from_params(params) -> dict:
    """The control values that show ``params`` (a ``PostParams``): the inverse of ``params_from_controls``."""
    return {"dilate_iterations": params.dilate_iterations, "dilate_max_area_px": params.dilate_max_area_px,
            "cyst_filter": params.cyst_filter, "cyst_threshold_hu": params.cyst_threshold_hu,
            "dilate_mode": params.dilate_mode, "fit_on_core": params.fit_on_core,
            "refine_outlines": params.refine_outlines, "refine_max_mm": params.refine_max_mm,
            "min_peak_probability": params.min_peak_probability}


REGION_COLUMNS = ("Region", "Volume (mL)", "Fitted mean (HU)", "Peak probability", "Decision", "Why", "Outline")


def region_table(rows: list[dict]) -> list[tuple[str, ...]]:
    """The region table's cells: one tuple of strings per region, in ``REGION_COLUMNS`` order."""
    cells = []
    for row in rows:
        decision = row["decision"] + (" (by hand)" if row.get("override") else "")
        outline = f"+{row['refined_ml']:.2f} mL: {row['outline']}" if row.get("refined_ml") else row.get("outline", "")
        peak = row.get("peak_probability")
        cells.append((str(row["id"]), f"{row['volume_ml']:.2f}", f"{row['fit_M']:.0f}", "" if peak is None else f"{peak:.3f}",
                      decision, row["reason"], outline))
    return cells


def status_line(report: dict) -> str:
    """Device and time per stage of a finished run."""
    t = report.get("timings", {})
    device = report.get("device", "?")
    parts = [f"liver {t['liver_s']:.1f} s" if "liver_s" in t else None, f"tumors {t['tumor_s']:.1f} s" if "tumor_s" in t else None]
    text = f"Done on {device}: " + ", ".join(p for p in parts if p)
    warnings = report.get("warnings") or []
    return text + ("" if not warnings else f". Warning: {warnings[0]}")
