"""Where the per-case tumor Dice is lost: cumulative corrections of the shipped result on fresh phantoms.

    .venv/bin/python scripts/tumor_gap.py [--seed0 2000] [--cases 48] [--cache DIR] [--png PATH] [--json PATH]

For each phantom the bundled models run as ``measure_bundled.py`` runs them (normal mode, mirroring
on), followed by the post-processing at its defaults. The per-case tumor Dice (LiTS convention: no
tumor in truth and prediction counts 1, a missed or spurious case 0) is then recomputed after the
cumulative corrections of ``LiverTumorSegLib.tumorgap`` (also in ``livertumorseg evaluate``): the
tumor/cyst labels made right (on phantoms, what the HU cyst filter got wrong: the phantoms draw
each cyst's mean from 9-50 HU, so a cyst near or above 45 HU is called tumor at 45 HU even on its
true outline; the default fit on each region's core leaves out the partial-volume rim, which
raised a whole-region fit a little more), no false tumors, no missed
tumors; the rest up to 1 is the outline of the tumors found. The chart calls the first two rows
"shipped" and "filter right". The summary also gives the means of cases with tumors and of
tumor-free cases apart.

The step between two rows is what that cause costs in per-case mean Dice (order matters; this one
is fixed). Also printed: the shipped Dice at other cyst-filter thresholds (a slider in the panel),
and one row per true tumor (volume, contrast to the liver around it, its noise, found or not), which
the chart plots; the false tumors of tumor-free cases (size, HU, where, how sure); and every
true cyst the filter calls tumor on its own true outline (its fitted mean). ``--cache DIR`` keeps each case's network output (labels and probabilities) so a
rerun only redoes the analysis. Figures only, no assertion: the numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cc3d
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from LiverTumorSegLib.metrics import dice, mean_ci
from LiverTumorSegLib.modelfile import load_model
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.pipeline import Probabilities, segment
from LiverTumorSegLib.postprocess import PostParams, PostProcessor
from LiverTumorSegLib.registry import model_files
from LiverTumorSegLib.tumorgap import CYST, LIVER, STEPS, TUMOR, TUMORS_IN_TRUTH, summarize_steps, tumor_dice_steps, tumors_in_truth

THRESHOLDS_HU = (45.0, 50.0, 55.0, 60.0)
SHELL_MM = (2.0, 8.0)  # the liver around a tumor: this far outside its outline


def tumor_rows(ct: np.ndarray, spacing_zyx, truth: np.ndarray, post: np.ndarray) -> list[dict]:
    """One row per true tumor: mL, median HU, contrast to the liver shell around it, that shell's noise, found, Dice.

    Its Dice counts the predicted tumor regions touching it (within its box padded by the shell).
    """
    rows = []
    regions = cc3d.connected_components(truth == TUMOR, connectivity=26)
    ml = float(np.prod(spacing_zyx)) / 1000
    for i, box in enumerate(ndimage.find_objects(regions), start=1):
        pad = [int(np.ceil(SHELL_MM[1] / s)) + 1 for s in spacing_zyx]
        box = tuple(slice(max(b.start - p, 0), b.stop + p) for b, p in zip(box, pad))
        m = regions[box] == i
        dist = ndimage.distance_transform_edt(~m, sampling=spacing_zyx)
        shell = (dist > SHELL_MM[0]) & (dist <= SHELL_MM[1]) & (truth[box] == LIVER)
        hu, around = ct[box][m].astype(float), ct[box][shell].astype(float)
        pred_regions = cc3d.connected_components(post[box] == TUMOR, connectivity=26)
        pred = np.isin(pred_regions, np.unique(pred_regions[m])) & (pred_regions > 0)  # the predicted tumors touching it
        noise = 1.4826 * float(np.median(np.abs(around - np.median(around)))) if around.size else float("nan")
        rows.append({"ml": float(m.sum() * ml), "hu": float(np.median(hu)),
                     "contrast_hu": float(np.median(around) - np.median(hu)) if around.size else float("nan"),
                     "noise_hu": noise, "found": bool(pred.any()), "dice": dice(pred, m)})
    return rows


def false_tumor_rows(ct: np.ndarray, truth: np.ndarray, post: np.ndarray, probability: np.ndarray, ml: float) -> list[dict]:
    """One row per predicted tumor region touching no true lesion: mL, median HU, share outside the true liver, max p."""
    regions = cc3d.connected_components(post == TUMOR, connectivity=26)
    lesion = truth >= TUMOR
    rows = []
    for i, box in enumerate(ndimage.find_objects(regions), start=1):
        m = regions[box] == i
        if lesion[box][m].any():
            continue
        rows.append({"ml": float(m.sum() * ml), "hu": float(np.median(ct[box][m])),
                     "outside_liver": float((truth[box][m] == 0).mean()), "max_p": float(probability[box][m].max()) / 255})
    return rows


def cyst_rows(ct, truth: np.ndarray) -> list[dict]:
    """One row per true cyst: mL, the filter's fitted mean on the true outlines, and whether it calls it tumor there."""
    perfect = np.where(truth >= TUMOR, TUMOR, truth).astype(np.uint8)  # true lesions, tumor and cyst alike
    processor = PostProcessor(ct, perfect)
    params = PostParams(dilate_iterations=0, refine_outlines=False)  # the filter alone, on the true outlines
    bound, table = processor.apply(params)
    fitted = {r["id"]: r["fit_M"] for r in table}
    regions = cc3d.connected_components(perfect == TUMOR, connectivity=26)  # the processor's region ids (raster order)
    if [r["voxels"] for r in table] != np.bincount(regions.ravel())[1:].tolist():
        raise RuntimeError("region ids differ from the post-processor's")
    cysts = cc3d.connected_components(truth == CYST, connectivity=26)
    ml = float(np.prod(ct.spacing)) / 1000
    rows = []
    for i, box in enumerate(ndimage.find_objects(cysts), start=1):
        m = cysts[box] == i
        region = int(np.bincount(regions[box][m]).argmax())
        rows.append({"ml": float(m.sum() * ml), "fit_M": fitted.get(region, float("nan")),
                     "called_tumor": bool((bound[box][m] == TUMOR).mean() > 0.5)})
    return rows


def network_output(seed: int, ct, models, cache: Path | None, *, fast: bool = False, tta: bool = True,
                   seconds: list[float] | None = None) -> tuple[np.ndarray, Probabilities]:
    """The models' labels and probabilities for one phantom, from ``cache`` when it has them (the cache
    holds the default mode only). ``seconds`` gets the network's time of each run (none for a cached case)."""
    if cache is not None and (cache / f"{seed}.npz").exists():
        with np.load(cache / f"{seed}.npz") as z:
            labels = z["labels"]
        return labels, Probabilities.load(cache / f"{seed}.prob.npz")
    r = segment(ct, *models, fast=fast, tta=tta)
    if seconds is not None:
        seconds.append(r.report["timings"]["total_s"])
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        r.probabilities.save(cache / f"{seed}.prob.npz", overwrite=True)
        np.savez_compressed(cache / f"{seed}.npz", labels=r.labels)
    return r.labels, r.probabilities


def draw(summary: dict, tumors: list[dict], path: Path) -> None:
    """Left: per-case mean tumor Dice after each correction; right: true tumors by size and contrast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    means = [summary["per_case_mean"][s] for s in STEPS] + [1.0]
    labels = ["shipped", "filter right", *STEPS[2:], "perfect outlines"]
    a.bar(range(len(means)), means, color=["#c44e52", "#dd8452", "#55a868", "#4c72b0", "#8c8c8c"])
    for x, v in enumerate(means):
        a.text(x, v + 0.01, f"{v:.3f}", ha="center", fontsize=9)
    a.axhline(0.80, ls="--", c="k", lw=1)
    a.text(len(means) - 0.5, 0.81, "target 0.80", ha="right", fontsize=8)
    a.set_xticks(range(len(means)), labels, rotation=20, fontsize=8)
    a.set_ylim(0, 1.08)
    a.set_ylabel("tumor Dice per case (mean)")
    a.set_title(f"Cumulative corrections, phantoms {summary['seeds']}", fontsize=10)
    cnr = np.array([t["contrast_hu"] / t["noise_hu"] if t["noise_hu"] > 0 else np.nan for t in tumors])
    ml = np.array([t["ml"] for t in tumors])
    found = np.array([t["found"] for t in tumors])
    sc = b.scatter(ml[found], cnr[found], c=[t["dice"] for t in tumors if t["found"]], cmap="viridis",
                   vmin=0, vmax=1, label="found (colour: its Dice)")
    b.scatter(ml[~found], cnr[~found], marker="x", c="#c44e52", s=50, label="missed")
    b.set_xscale("log")
    b.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    b.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    b.axhline(0, c="grey", lw=0.8)
    b.set_xlabel("true tumor volume (mL)")
    b.set_ylabel("contrast / noise (liver around minus tumor, HU / HU)")
    b.set_title("True tumors: size and visibility", fontsize=10)
    b.legend(fontsize=8, loc="upper left")
    fig.colorbar(sc, ax=b, fraction=0.04)
    fig.text(0.5, 0.005, "Synthetic phantoms; phantom-trained models, not for clinical use.", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed0", type=int, default=2000, help="first phantom seed (2000: the test seeds)")
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--model", default="phantom-small", help="bundled name or a folder with liver.ltsm + tumor.ltsm")
    ap.add_argument("--cache", type=Path, help="folder keeping each case's network output (one folder per model: "
                                               "what is there is reused as it is)")
    ap.add_argument("--png", type=Path, help="write the chart here")
    ap.add_argument("--json", type=Path, help="write the summary, cases and tumors here")
    args = ap.parse_args(argv)
    models = tuple(load_model(p, stage=s) for p, s in zip(model_files(args.model), ("liver", "tumor")))
    cases, tumors, false_tumors, cysts = [], [], [], []
    for seed in tqdm(range(args.seed0, args.seed0 + args.cases), desc="phantoms", file=sys.stderr):
        ct, lab = generate_case(seed)
        truth = lab.array
        labels, probs = network_output(seed, ct, models, args.cache)
        processor = PostProcessor.from_network(ct, labels, probs)
        post, _ = processor.apply(PostParams())
        row = {"seed": seed, TUMORS_IN_TRUTH: tumors_in_truth(truth), **tumor_dice_steps(post, truth)}
        for t in THRESHOLDS_HU[1:]:
            row[f"as is at {t:.0f} HU"] = dice(processor.apply(PostParams(cyst_threshold_hu=t))[0] == TUMOR, truth == TUMOR)
        cases.append(row)
        tumors += [dict(r, seed=seed) for r in tumor_rows(ct.array, ct.spacing[::-1], truth, post)]
        ml = float(np.prod(ct.spacing)) / 1000
        false_tumors += [dict(r, seed=seed) for r in false_tumor_rows(ct.array, truth, post, probs.tumor_full(), ml)]
        cysts += [dict(r, seed=seed) for r in cyst_rows(ct, truth)]
    keys = list(STEPS) + [f"as is at {t:.0f} HU" for t in THRESHOLDS_HU[1:]]
    summary = {"seeds": f"{args.seed0}-{args.seed0 + args.cases - 1}", "cases": len(cases),
               "per_case_mean": {k: round(float(np.mean([c[k] for c in cases])), 4) for k in keys},
               "shipped_ci95": [round(x, 4) for x in mean_ci(c[STEPS[0]] for c in cases)],
               "groups": summarize_steps(cases)["groups"],
               "tumors": len(tumors), "tumors_missed": sum(not t["found"] for t in tumors),
               "cysts": len(cysts), "cysts_called_tumor_on_true_outline": sum(c["called_tumor"] for c in cysts)}
    print(json.dumps(summary, indent=2))
    print("seed  " + "  ".join(f"{k[:16]:>16}" for k in keys))
    for c in cases:
        print(f"{c['seed']}  " + "  ".join(f"{c[k]:16.3f}" for k in keys))
    print("missed tumors (seed, mL, median HU, contrast HU, noise HU):")
    for t in sorted((t for t in tumors if not t["found"]), key=lambda t: t["ml"]):
        print(f"  {t['seed']}  {t['ml']:7.2f}  {t['hu']:5.0f}  {t['contrast_hu']:6.1f}  {t['noise_hu']:5.1f}")
    print("false tumors in tumor-free cases (seed, mL, median HU, share outside the true liver, max p):")
    free = {c["seed"] for c in cases if c[TUMORS_IN_TRUTH] == 0}
    for t in (t for t in false_tumors if t["seed"] in free):
        print(f"  {t['seed']}  {t['ml']:6.3f}  {t['hu']:5.0f}  {t['outside_liver']:4.2f}  {t['max_p']:4.2f}")
    print("true cysts called tumor on their true outline (seed, mL, fitted mean HU):")
    for c in (c for c in cysts if c["called_tumor"]):
        print(f"  {c['seed']}  {c['ml']:6.2f}  {c['fit_M']:5.1f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cases": cases, "tumors": tumors,
                                         "false_tumors": false_tumors, "cysts": cysts}, indent=1))
    if args.png:
        draw(summary, tumors, args.png)


if __name__ == "__main__":
    main()
