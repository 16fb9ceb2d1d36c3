"""The ``evaluate`` command: predicted label maps against ground truth, per case and summarised.

Labels: 0 background, 1 liver, 2 tumor, 3 cyst. Structures: liver = labels >= 1, tumor = label 2,
lesion = labels 2 or 3. Metrics and their conventions for empty masks: ``metrics.py``. Where the
tumor Dice is lost (tumor/cyst labels, false tumors, missed tumors, outlines): ``tumorgap.py``,
one row per case in ``tumor_gap.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

import numpy as np

from .cli import LABEL_EXTS, extension_of, post_flags_given
from .errors import InputError
from .imageio import grid_difference, read_labels, refuse_existing_in, refuse_input_as_output, write_json, write_text
from .metrics import case_metrics, mean_ci, summarize
from .tumorgap import TUMORS_IN_TRUTH, steps_markdown, summarize_steps, tumor_dice_steps, tumors_in_truth

STRUCTURES = {
    "liver": lambda labels: labels >= 1,
    "tumor": lambda labels: labels == 2,
    "lesion": lambda labels: (labels == 2) | (labels == 3),
}
NAME_SUFFIXES = ("_segmentation", "_labels", "_label", "_seg", ".seg")
OUTPUTS = ("metrics.csv", "tumor_gap.csv", "summary.md", "summary.json", "boxplot.png")
NETWORK, POSTPROCESSED = "network", "post-processed"  # the two outputs --model evaluates
SPACING_TOL = 1e-4
AUTHORS_LABEL = "G-UNETR++ authors' protocol, not comparable with the LiTS leaderboard"
TABLE_ROWS = (  # (label, metrics key)
    ("DSC", "dsc"), ("VOE", "voe"), ("RAVD", "ravd"), ("ASSD (mm)", "assd_mm"), ("HD95 (mm)", "hd95_mm"),
    ("precision", "precision"), ("recall", "recall"), ("lesion recall", "lesion_recall"),
    ("false positives per case", "lesion_false_positives"),
)
BOX_METRICS = (("DSC", "dsc"), ("ASSD (mm)", "assd_mm"), ("HD95 (mm)", "hd95_mm"))


def run_evaluate(args) -> int:
    """Evaluate ``args.pred`` against ``args.truth`` and write the tables and plot into ``args.out``."""
    from tqdm import tqdm

    out = Path(args.out)
    refuse_input_as_output(out, [args.pred, args.truth, args.model, *(args.data or [])])
    refuse_existing_in(out, OUTPUTS, args.overwrite)
    if args.model is None and post_flags_given(args):
        raise InputError("The post-processing flags apply with --model only (--pred is scored as it is): drop "
                         f"{' '.join(post_flags_given(args))}.")
    if args.model is not None:
        from .evaluate_model import evaluate_model

        rows, gaps, summary, markdown = evaluate_model(args)
    else:
        if args.pred is None or args.truth is None:
            raise InputError("Give --pred and --truth (label maps), or --model and --data (segment and evaluate).")
        if args.missing_as_empty and not Path(args.pred).is_dir():
            raise InputError("--missing-as-empty applies to --pred/--truth folders.")
        cases = match_cases(Path(args.pred), Path(args.truth), args.missing_as_empty)
        rows, gaps = [], []
        for name, pred, truth in tqdm(cases, desc="evaluate", unit="case", disable=None, file=sys.stderr):
            case_rows_, gap = evaluate_case(name, pred, truth)
            rows += case_rows_
            gaps.append(gap)
        structures, steps = summarize_structures(rows), summarize_steps(gaps)
        summary = {**structures, "tumor_gap": steps}
        markdown = summary_markdown(structures) + "\n" + steps_markdown(steps)
    write_text(metrics_csv(rows), out / "metrics.csv", overwrite=args.overwrite)
    write_text(metrics_csv(gaps), out / "tumor_gap.csv", overwrite=args.overwrite)
    write_text(markdown, out / "summary.md", overwrite=args.overwrite)
    write_json(summary, out / "summary.json", overwrite=args.overwrite)
    if args.model is None:
        save_boxplot(rows, out / "boxplot.png")
    else:
        save_boxplot([r for r in rows if r["output"] == POSTPROCESSED], out / "boxplot.png", "after post-processing: ")
    print(markdown)
    return 0


# ---------------------------------------------------------------- cases


def case_name(path: Path) -> str:
    """File name without its extension and without a trailing ``_label``-like suffix."""
    ext = extension_of(path, LABEL_EXTS)
    if ext is None:
        raise InputError(f"'{path.name}' is not a label map (.seg.nrrd, {', '.join(LABEL_EXTS)}).")
    stem = path.name[: -len(ext)]
    suffix = next((s for s in NAME_SUFFIXES if stem.lower().endswith(s) and len(stem) > len(s)), "")
    return stem[: len(stem) - len(suffix)]


def _label_files(folder: Path) -> dict[str, Path]:
    """Label files of a folder by case name; two files for one case is an error."""
    files: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and extension_of(p, LABEL_EXTS)):
        name = case_name(path)
        if name in files:
            raise InputError(f"Two files in {folder} are case '{name}': {files[name].name} and {path.name}.")
        files[name] = path
    return files


def match_cases(pred: Path, truth: Path, missing_as_empty: bool = False) -> list[tuple[str, Path | None, Path]]:
    """(case, prediction, truth) for two files, or for two folders matched by case name.

    A truth case without a prediction is refused (a mean over the others would leave a failure
    out), or with ``missing_as_empty`` kept with prediction None: scored as an empty prediction. A
    prediction without a truth is left out with a warning."""
    for path in (pred, truth):
        if not path.exists():
            raise InputError(f"Not found: {path}")
    if pred.is_file() and truth.is_file():
        return [(case_name(truth), pred, truth)]
    if not (pred.is_dir() and truth.is_dir()):
        raise InputError("--pred and --truth must both be files or both be folders.")
    preds, truths = _label_files(pred), _label_files(truth)
    common = sorted(preds.keys() & truths.keys())
    if not common:
        raise InputError(f"No case of {pred} matches one of {truth} by name (predictions: "
                         f"{', '.join(preds) or 'none'}; truths: {', '.join(truths) or 'none'}).")
    unscored = sorted(truths.keys() - preds.keys())
    if unscored and not missing_as_empty:
        raise InputError(f"{len(unscored)} truth case(s) have no prediction in {pred}: {_listed(unscored)}. "
                         "Add them, or give --missing-as-empty to score them as empty predictions.")
    extra = sorted(preds.keys() - truths.keys())
    if extra:
        print(f"warning: {len(extra)} prediction(s) without a truth, not evaluated: {_listed(extra)}", file=sys.stderr)
    if unscored:
        print(f"note: {len(unscored)} truth case(s) without a prediction scored as empty: {_listed(unscored)}",
              file=sys.stderr)
    return sorted([(name, preds.get(name), truths[name]) for name in truths.keys()])


def _listed(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def evaluate_case(name: str, pred_path: Path | None, truth_path: Path) -> tuple[list[dict], dict]:
    """One row per structure (case, structure and every ``case_metrics`` value) and the case's ``gap_row``;
    no ``pred_path``: an empty prediction."""
    truth = read_labels(truth_path, ours=True)
    if pred_path is None:
        empty = np.zeros_like(truth.array)
        return case_rows(name, empty, truth.array, truth.spacing[::-1]), gap_row(name, empty, truth.array)
    pred = read_labels(pred_path, ours=True)
    if difference := grid_difference(pred, truth, SPACING_TOL):
        raise InputError(f"Case '{name}': prediction and truth are on different grids ({difference}, "
                         "prediction first); resample the prediction onto the truth's grid.")
    return case_rows(name, pred.array, truth.array, truth.spacing[::-1]), gap_row(name, pred.array, truth.array)


def gap_row(name: str, pred: np.ndarray, truth: np.ndarray, **extra) -> dict:
    """The case's count of true tumors and its tumor Dice after each cumulative correction (``tumorgap.STEPS``)."""
    return {"case": name, **extra, TUMORS_IN_TRUTH: tumors_in_truth(truth), **tumor_dice_steps(pred, truth)}


def case_rows(name: str, pred: np.ndarray, truth: np.ndarray, spacing_zyx, **extra) -> list[dict]:
    """One row per structure of two label maps on one grid (``extra`` columns go first)."""
    return [{"case": name, **extra, "structure": structure, **case_metrics(mask(pred), mask(truth), spacing_zyx)}
            for structure, mask in STRUCTURES.items()]


# ---------------------------------------------------------------- summaries


def _mean_sd(values) -> dict:
    """Mean, population sd and bootstrap 95 % CI of the mean of the finite values, with how many were
    used and skipped (nan, inf)."""
    values = np.asarray(list(values), float)
    finite = values[np.isfinite(values)]
    mean, sd = (float(finite.mean()), float(finite.std())) if finite.size else (math.nan, math.nan)
    return {"mean": mean, "sd": sd, "ci95": list(mean_ci(finite)), "cases": int(finite.size),
            "skipped": int(values.size - finite.size)}


def summarize_structures(rows: list[dict]) -> dict:
    """Per structure: per-case mean +/- sd of each table metric, global Dice and the authors' protocol DSC."""
    summary = {}
    for structure in STRUCTURES:
        subset = [row for row in rows if row["structure"] == structure]
        dsc = summarize(subset, "dsc")
        summary[structure] = {
            "cases": len(subset),
            "metrics": {key: _mean_sd(row[key] for row in subset) for _, key in TABLE_ROWS},
            "global_dice": dsc["global_dice"],
            "authors_protocol": {"label": AUTHORS_LABEL, "definition": dsc["authors_protocol"],
                                 "dsc": dsc["authors_protocol_mean"], "excluded": dsc["authors_protocol_excluded"]},
        }
    return summary


def summary_markdown(summary: dict, title: str = "Evaluation", level: int = 1) -> str:
    """A Markdown table per structure, with the authors' protocol DSC below it, labelled."""
    parts = []
    for structure, s in summary.items():
        lines = [f"{'#' * (level + 1)} {structure} ({s['cases']} cases)", "", "| metric | per-case mean +/- sd | 95 % CI of the mean | cases (skipped) |",
                 "|---|---|---|---|"]
        for label, key in TABLE_ROWS:
            if structure == "liver" and key.startswith("lesion_"):  # lesion-wise detection means nothing for the organ
                continue
            m = s["metrics"][key]
            lo, hi = m["ci95"]
            ci = f"{lo:.4f}-{hi:.4f}" if math.isfinite(lo) else f"n/a ({m['cases']} case{'s' * (m['cases'] != 1)})"
            lines.append(f"| {label} | {m['mean']:.4f} +/- {m['sd']:.4f} | {ci} | {m['cases']} ({m['skipped']}) |")
        lines.append(f"| global Dice (pooled voxels) | {s['global_dice']:.4f} | | {s['cases']} (0) |")
        a = s["authors_protocol"]
        lines += ["", f"{a['label']}: DSC {a['dsc']:.4f} ({a['excluded']} zero-Dice or both-empty cases excluded).", ""]
        parts.append("\n".join(lines))
    note = ("Per-case means count a missed structure as DSC 0; distances skip cases where a mask is empty. "
            "95 % CI: percentile bootstrap of the per-case mean (9999 resamples, seed 0).\n")
    return f"{'#' * level} {title}\n\n" + note + "\n" + "\n".join(parts)


def metrics_csv(rows: list[dict]) -> str:
    """All rows as CSV, one per case and structure."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def save_boxplot(rows: list[dict], path: Path, title: str = "") -> Path:
    """Box plots of per-case DSC, ASSD and HD95 per structure, each case overlaid as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BOX_METRICS), figsize=(4 * len(BOX_METRICS), 4))
    jitter = np.random.default_rng(0)
    for ax, (label, key) in zip(axes, BOX_METRICS):
        data = [np.array([r[key] for r in rows if r["structure"] == s and math.isfinite(r[key])]) for s in STRUCTURES]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(STRUCTURES) + 1), list(STRUCTURES))
        for x, values in enumerate(data, start=1):
            ax.scatter(x + jitter.uniform(-0.12, 0.12, values.size), values, s=14, alpha=0.7, zorder=3)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{title}per-case metrics ({len({r['case'] for r in rows})} cases)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
