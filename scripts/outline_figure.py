"""Picture of the outline refinement: true tumor, the outline without the refinement and with it.

    PYTHONPATH=LiverTumorSeg .venv/bin/python scripts/outline_figure.py [--seeds 3048 3027 3026] [--cache DIR] [--png PATH]

For each phantom seed, the bundled models' output (read from ``--cache``, the cache of ``tumor_gap.py``,
when it holds the seed; else the networks run, mirrored, about a minute a case) goes through the
default post-processing with and without the outline refinement. One panel per seed: the axial
slice through the largest true tumor, CT at a liver window, the true tumor outline (green), the tumor
without the refinement (red) and with it (yellow), each panel's title giving the case's tumor Dice both ways.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cc3d
import numpy as np

from LiverTumorSegLib.metrics import dice
from LiverTumorSegLib.modelfile import load_model
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.postprocess import PostParams, PostProcessor
from LiverTumorSegLib.registry import model_files
from tumor_gap import network_output

TUMOR = 2


def panel(seed: int, models, cache: Path | None) -> dict:
    ct, truth = generate_case(seed)
    labels, probabilities = network_output(seed, ct, models, cache)
    processor = PostProcessor.from_network(ct, labels, probabilities)
    off, _ = processor.apply(PostParams(refine_outlines=False))
    on, _ = processor.apply(PostParams())
    true = truth.array == TUMOR
    largest = cc3d.largest_k(true, k=1, connectivity=26) > 0
    k = int(np.argmax(largest.sum(axis=(1, 2))))
    return {"seed": seed, "ct": ct.array[k], "truth": true[k], "off": off[k] == TUMOR, "on": on[k] == TUMOR,
            "dice": (dice(off == TUMOR, true), dice(on == TUMOR, true)), "box": np.argwhere(largest[k])}


def draw(panels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        lo, hi = p["box"].min(0) - 12, p["box"].max(0) + 13
        window = (slice(max(lo[0], 0), hi[0]), slice(max(lo[1], 0), hi[1]))
        ax.imshow(p["ct"][window], cmap="gray", vmin=-50, vmax=200)
        for key, colour, style in (("truth", "lime", "-"), ("off", "red", "--"), ("on", "yellow", "-")):
            mask = p[key][window]
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=colour, linestyles=style, linewidths=1.2)
        ax.set_title(f"phantom {p['seed']}: tumor Dice {p['dice'][0]:.3f} -> {p['dice'][1]:.3f}", fontsize=9)
        ax.set_axis_off()
    fig.legend(handles=[matplotlib.lines.Line2D([], [], color=c, linestyle=s, label=t) for c, s, t in (
        ("lime", "-", "true tumor"), ("red", "--", "without the refinement"), ("yellow", "-", "with it (default)"))],
        loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle("Outline refinement by HU (bundled models, synthetic phantoms: not for clinical use)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3048, 3027, 3026])
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--png", type=Path, default=Path("outline-refinement.png"))
    args = ap.parse_args(argv)
    models = tuple(load_model(path, stage=stage) for path, stage in zip(model_files("phantom-small"), ("liver", "tumor")))
    draw([panel(seed, models, args.cache) for seed in args.seeds], args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
