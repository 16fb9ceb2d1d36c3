"""Measure the bundled models and write the numbers into their model cards.

    .venv/bin/python scripts/measure_bundled.py [--cases 48] [--seed0 2000] [--model NAME|FOLDER] [--no-write] [--cache DIR]
        [--metrics-csv DIR]

Fresh phantoms (the test seeds 2000-2047, never used in training or validation, no parameter set on them; default random
geometry, 512 matrix; 48 cases since 2026-11-29, 12 before: their per-case tumor Dice had a 95 %
CI 0.42 wide) and,
when present, 3D-IRCADb patient 1.1 (expert masks; liver + livertumor01..07 merged in memory,
the cyst kept apart). ``tumor_filter_on_truth``: the cyst filter (no dilation, no outline refinement) applied to the
true lesions, the most any network can reach with the filter at its default. Dice per case: a case with no lesion in truth and prediction counts 1,
a missed or spurious lesion case 0 (LiTS convention); global Dice pools all voxels.

``--cache DIR``: the phantoms' network outputs are read from (or written to) ``DIR``, the cache of
``tumor_gap.py`` (same models, default mode), so a change of the post-processing alone is measured
without rerunning the networks; the seconds per case are measured when the network ran on every case
(an empty cache), else those of the last such run (kept from the card, and marked so). ``--fit-whole-region``: the cyst filter fits every voxel of a
region, as before 2026-11-30 (print only). ``--min-peak P [P ...]``: the post-processing's confidence gate
at each value, from one network run per case (print only; several values: one result and one metrics folder,
``DIR/min_peak_P``, per value). ``--metrics-csv DIR``: the per-case Dice also as
``DIR/metrics.csv`` in ``evaluate``'s layout, so that ``livertumorseg compare`` pairs two models' runs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from LiverTumorSegLib.datasets import find_cases, load_case
from LiverTumorSegLib.cli import peak_gate
from LiverTumorSegLib.evaluate_cli import NETWORK, POSTPROCESSED, metrics_csv
from LiverTumorSegLib.evaluate_model import settings_text
from LiverTumorSegLib.imageio import write_text
from LiverTumorSegLib.metrics import dice, lesion_detection, mean_ci
from LiverTumorSegLib.modelfile import load_model, update_card
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib import pipeline
from LiverTumorSegLib.pipeline import segment
from LiverTumorSegLib.postprocess import PostParams, PostProcessor
from LiverTumorSegLib.registry import model_files
from tumor_gap import network_output

EVAL_SEED0 = 2000
IRCAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ircad-1.1"


def _scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    return {
        "liver": dice(pred > 0, truth > 0),
        "lesion": dice(pred == 2, np.isin(truth, (2, 3))),
        "tumor_only": dice(pred == 2, truth == 2),
        "inter": {k: int(np.logical_and(a, b).sum()) for k, (a, b) in
                  {"liver": (pred > 0, truth > 0), "lesion": (pred == 2, np.isin(truth, (2, 3)))}.items()},
        "sums": {"liver": int((pred > 0).sum() + (truth > 0).sum()), "lesion": int((pred == 2).sum() + np.isin(truth, (2, 3)).sum())},
    }


def summarize(rows: list[dict]) -> dict:
    out = {"cases": len(rows)}
    for k in ("liver", "lesion", "tumor_only"):
        vals = [r[k] for r in rows]
        out[f"{k}_dice_per_case_mean"] = round(float(np.mean(vals)), 4)
        out[f"{k}_dice_per_case_sd"] = round(float(np.std(vals)), 4)
    for k in ("liver", "lesion"):
        inter, sums = sum(r["inter"][k] for r in rows), sum(r["sums"][k] for r in rows)
        out[f"{k}_dice_global"] = round(2 * inter / sums, 4) if sums else 1.0
    if "tumor_after_filter" in rows[0]:
        for k in ("tumor_after_filter", "cyst_after_filter", "tumor_filter_on_truth"):
            out[f"{k}_dice_per_case_mean"] = round(float(np.mean([r[k] for r in rows])), 4)
        out["tumor_after_filter_dice_per_case_ci95"] = [round(x, 4) for x in mean_ci(r["tumor_after_filter"] for r in rows)]
        det = [r["tumor_detection"] for r in rows]
        found, total = sum(d["detected"] for d in det), sum(d["truth_lesions"] for d in det)
        out["tumors_detected_after_filter"] = f"{found} of {total}"
        out["false_positive_tumors_per_case"] = round(float(np.mean([d["false_positives"] for d in det])), 3)
        free = [d for d in det if d["truth_lesions"] == 0]
        out["tumor_free_cases_without_false_tumor"] = f"{sum(d['pred_lesions'] == 0 for d in free)} of {len(free)}"
        for when in ("before", "after"):
            sums = sum(r[f"tumor_sums_{when}"] for r in rows)
            out[f"tumor_dice_global_{when}_filter"] = round(2 * sum(r[f"tumor_inter_{when}"] for r in rows) / sums, 4) if sums else 1.0
    return out


def compare_rows(rows: list[dict]) -> list[dict]:
    """Per-case Dice rows in ``evaluate``'s metrics.csv layout (case, output, structure, dsc), for ``compare``."""
    fields = ((NETWORK, "liver", "liver"), (NETWORK, "lesion", "lesion"),
              (POSTPROCESSED, "tumor", "tumor_after_filter"), (POSTPROCESSED, "cyst", "cyst_after_filter"))
    return [{"case": f"phantom_{r['seed']}", "output": output, "structure": structure, "dsc": r[key]}
            for r in rows for output, structure, key in fields]


def _seconds(seconds: list[float], tumor_card: dict, cases: int) -> dict:
    """The mean seconds per case when the network ran on every case; else (outputs from a cache) the
    card's last measured figure, marked so."""
    if len(seconds) == cases:
        return {"mean_seconds": round(float(np.mean(seconds)), 1)}
    before = tumor_card.get("metrics", {}).get("fresh_phantoms", {})
    return {"mean_seconds": before.get("mean_seconds"),
            "mean_seconds_note": "network outputs read from a cache; seconds as last measured without one"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--seed0", type=int, default=EVAL_SEED0,
                    help="first phantom seed (default 2000, the test seeds; the tuning phantoms are 3024-3071)")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                    help="test-time mirroring, as segment does by default (--no-tta: normal mode)")
    ap.add_argument("--model", default="phantom-small", help="bundled name or a folder with liver.ltsm + tumor.ltsm")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update the model cards")
    ap.add_argument("--fit-whole-region", action="store_true",
                    help="the cyst filter fits every voxel of a region (the paper's rule), not its core (the default)")
    ap.add_argument("--cache", type=Path, help="network outputs of the phantoms from/into this folder (tumor_gap.py's; "
                                               "one folder per model, default mode only)")
    ap.add_argument("--min-peak", type=peak_gate, nargs="+", metavar="P",
                    help="the confidence gate (PostParams.min_peak_probability) at each value (default: the default's)")
    ap.add_argument("--metrics-csv", type=Path, metavar="DIR",
                    help="also write DIR/metrics.csv (per-case Dice, evaluate's layout) for livertumorseg compare")
    args = ap.parse_args(argv)
    if args.cache and (args.fast or not args.tta):
        ap.error("--cache holds outputs of the default mode (normal, mirrored): drop --fast / --no-tta")
    if (args.fit_whole_region or args.min_peak) and not args.no_write and args.seed0 == EVAL_SEED0:
        ap.error("the cards carry the default post-processing: add --no-write to --fit-whole-region / --min-peak")
    liver_path, tumor_path = model_files(args.model)
    models = load_model(liver_path, stage="liver"), load_model(tumor_path, stage="tumor")
    default = PostParams(fit_on_core=not args.fit_whole_region)
    gates = dict.fromkeys(args.min_peak or [default.min_peak_probability])  # in order, each once
    settings = [replace(default, min_peak_probability=g) for g in gates]
    rows, seconds = {p: [] for p in settings}, []
    for seed in tqdm(range(args.seed0, args.seed0 + args.cases), desc="phantoms", file=sys.stderr):
        ct, lab = generate_case(seed)
        labels, probabilities = network_output(seed, ct, models, args.cache, fast=args.fast, tta=args.tta, seconds=seconds)
        processor = PostProcessor.from_network(ct, labels, probabilities)
        perfect = np.where(lab.array >= 2, 2, lab.array).astype(np.uint8)  # the true lesions, tumor and cyst alike
        bound, _ = PostProcessor(ct, perfect).apply(replace(default, dilate_iterations=0, refine_outlines=False))
        ml = float(np.prod(ct.spacing)) / 1000
        common = dict(_scores(labels, lab.array), seed=seed, truth_lesion_ml=float(np.isin(lab.array, (2, 3)).sum() * ml),
                      pred_lesion_ml=float((labels == 2).sum() * ml), tumor_filter_on_truth=dice(bound == 2, lab.array == 2),
                      tumor_inter_before=int(np.logical_and(labels == 2, lab.array == 2).sum()),
                      tumor_sums_before=int((labels == 2).sum() + (lab.array == 2).sum()))
        for params in settings:
            post, _ = processor.apply(params)
            rows[params].append(dict(common, tumor_after_filter=dice(post == 2, lab.array == 2),
                                     cyst_after_filter=dice(post == 3, lab.array == 3),
                                     tumor_inter_after=int(np.logical_and(post == 2, lab.array == 2).sum()),
                                     tumor_sums_after=int((post == 2).sum() + (lab.array == 2).sum()),
                                     tumor_detection=lesion_detection(post == 2, lab.array == 2)))
    ircad = _ircad(args, models, settings)
    for params in settings:
        if len(settings) > 1:
            print(f"--- confidence gate (min_peak_probability) {params.min_peak_probability:g}")
        report(args, params, rows[params], seconds, models, ircad.get(params), liver_path, tumor_path,
               args.metrics_csv / f"min_peak_{params.min_peak_probability:g}" if args.metrics_csv and len(settings) > 1 else args.metrics_csv)


def _ircad(args, models, settings: list[PostParams]) -> dict:
    """3D-IRCADb 1.1's figures for each setting, from one network run (empty without the data)."""
    if not (IRCAD / "ct.nii.gz").exists():
        return {}
    ct, labels = load_case(find_cases(IRCAD, "ircad")[0])  # liver + livertumor* merged, the cyst apart
    truth = labels.array
    r = segment(ct, *models, fast=args.fast, tta=args.tta)
    s = _scores(r.labels, truth)
    processor = PostProcessor.from_network(ct, r.labels, r.probabilities)
    return {params: {"liver_dice": round(s["liver"], 4), "lesion_dice": round(s["lesion"], 4), "tumor_only_dice": round(s["tumor_only"], 4),
                     "tumor_dice_after_filter": round(dice(processor.apply(params)[0] == 2, truth == 2), 4),
                     "note": "real CT; never trained on; it picked the best epoch and was a condition of every adoption rule: not an independent estimate"}
            for params in settings}


def report(args, params: PostParams, rows: list[dict], seconds: list[float], models, ircad: dict | None, liver_path: Path,
           tumor_path: Path, metrics_dir: Path | None) -> None:
    """Print one setting's figures; write its metrics.csv and (test seeds, default setting) the cards."""
    phantom = dict(summarize(rows), seeds=f"{args.seed0}-{args.seed0 + args.cases - 1}", mode=("fast: step 1.0" if args.fast else "normal: step 0.5") + (f", mirrored ({2 ** len(pipeline.TTA_AXES)} passes)" if args.tta else ", not mirrored"),
                   **_seconds(seconds, models[1].card, args.cases), note="lesion = tumor + cyst (the network target); tumor-only is the network output; the after_filter figures follow the "
                        + ("default post-processing" if params == PostParams() else f"post-processing with {settings_text(params)}")
                        + " (confidence gate, cyst filter, small-tumor dilation, outline refinement)")
    result = {"fresh_phantoms": phantom, **({"ircad_1_1": ircad} if ircad else {})}
    print(json.dumps(result, indent=2))
    if metrics_dir:
        write_text(metrics_csv(compare_rows(rows)), metrics_dir / "metrics.csv", overwrite=True)
    for row in rows:
        print(f"seed {row['seed']}: liver {row['liver']:.4f} lesion {row['lesion']:.4f} tumor-only {row['tumor_only']:.4f} "
              f"-> after the cyst filter tumor {row['tumor_after_filter']:.4f} cyst {row['cyst_after_filter']:.4f} "
              f"(filter on the true lesions: tumor {row['tumor_filter_on_truth']:.4f}) "
              f"(lesion mL truth {row['truth_lesion_ml']:.1f}, predicted {row['pred_lesion_ml']:.1f}) "
              f"(tumors found {row['tumor_detection']['detected']} of {row['tumor_detection']['truth_lesions']}, "
              f"false tumors {row['tumor_detection']['false_positives']})")
    if not args.no_write and args.seed0 == EVAL_SEED0:  # cards carry the test seeds' numbers only
        update_card(liver_path, metrics={"fresh_phantoms": {k: v for k, v in phantom.items() if k.startswith(("liver", "cases", "seeds", "mode"))},
                                         **({"ircad_1_1": {"liver_dice": ircad["liver_dice"]}} if ircad else {})})
        update_card(tumor_path, metrics=result)


if __name__ == "__main__":
    main()
