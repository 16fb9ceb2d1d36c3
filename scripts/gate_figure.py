"""Picture of the confidence gate: each lesion region's peak network probability against its volume.

    PYTHONPATH=LiverTumorSeg:scripts .venv/bin/python scripts/gate_figure.py [--seed0 3024] [--cases 48] [--cache DIR]
        [--model NAME|FOLDER] [--png PATH]

For each phantom, the model's output (from ``--cache``, the cache of ``tumor_gap.py``, when it holds the seed;
else the networks run, mirrored) goes through the default post-processing. Every lesion region is one
point: its peak probability (x) and volume (y, log), coloured by what it is against the truth: a true
tumor, a true cyst (the larger overlap), or false (touching no true lesion), and marked by the
decision the default post-processing without its gate gives (tumor or cyst). Dashed lines: the gate values of the trial in BENCHMARKS.md. Prints the
counts below each line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cc3d
import numpy as np
from tqdm import tqdm

from LiverTumorSegLib.modelfile import load_model
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.postprocess import PostParams, PostProcessor
from LiverTumorSegLib.registry import model_files
from tumor_gap import network_output

GATES = (0.6, 0.7, 0.8, 0.9)
KINDS = ("tumor", "cyst", "false")


def regions(seed: int, models, cache: Path | None) -> list[dict]:
    """Each region of one phantom: peak, volume, what it is in truth, its decision without the gate."""
    ct, truth = generate_case(seed)
    labels, probabilities = network_output(seed, ct, models, cache)
    processor = PostProcessor.from_network(ct, labels, probabilities)
    _, rows = processor.apply(PostParams(min_peak_probability=0.0))  # every region decided, none gated away
    liver = labels > 0
    candidates = liver & (probabilities.tumor_full() >= probabilities.tumor_threshold)
    components = cc3d.connected_components(candidates, connectivity=26)  # the processor's region ids (raster order)
    out = []
    for row in rows:
        found = truth.array[components == row["id"]]
        tumor, cyst = int((found == 2).sum()), int((found == 3).sum())
        kind = "false" if tumor + cyst == 0 else ("tumor" if tumor >= cyst else "cyst")
        out.append({"seed": seed, "peak": row["peak_probability"], "ml": row["volume_ml"], "kind": kind,
                    "decision": row["decision"]})
    return out


def draw(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {"tumor": "#c44e52", "cyst": "#4c72b0", "false": "#222222"}
    for kind in KINDS:
        for decision, marker in (("tumor", "o"), ("cyst", "s")):
            sel = [p for p in points if p["kind"] == kind and p["decision"] == decision]
            if sel:
                ax.scatter([p["peak"] for p in sel], [p["ml"] for p in sel], s=18, marker=marker, c=colours[kind],
                           alpha=0.75, label=f"true {kind}, called {decision}" if kind != "false" else f"false, called {decision}")
    for g in GATES:
        ax.axvline(g, ls="--", c="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("peak network probability of the region")
    ax.set_ylabel("region volume (mL)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed0", type=int, default=3024, help="first phantom seed (default 3024: the tuning phantoms)")
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--model", default="phantom-small")
    ap.add_argument("--cache", type=Path, help="network outputs from/into this folder (tumor_gap.py's)")
    ap.add_argument("--png", type=Path, default=Path("confidence-gate.png"))
    args = ap.parse_args(argv)
    liver_path, tumor_path = model_files(args.model)
    models = load_model(liver_path, stage="liver"), load_model(tumor_path, stage="tumor")
    points = [p for seed in tqdm(range(args.seed0, args.seed0 + args.cases), desc="phantoms", file=sys.stderr)
              for p in regions(seed, models, args.cache)]
    for g in GATES:
        below = {k: sum(p["kind"] == k and p["peak"] < g for p in points) for k in KINDS}
        total = {k: sum(p["kind"] == k for p in points) for k in KINDS}
        print(f"peak < {g}: " + ", ".join(f"{below[k]} of {total[k]} {k}" for k in KINDS))
    draw(points, args.png, f"Lesion regions of phantoms {args.seed0}-{args.seed0 + args.cases - 1} ({args.model}, mirrored): "
                           "synthetic data, not for clinical use")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
