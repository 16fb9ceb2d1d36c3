"""PNG pictures: axial CT slices with the segmentation outlined and filled."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .orientation import to_canonical
from .terminology import SEGMENTS
from .volume import Volume

WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window (W 400, L 40)


def pick_slices(labels_zyx: np.ndarray, n: int) -> list[int]:
    """Axial slices worth showing: the one with most tumor, then evenly through the liver."""
    z_any = np.flatnonzero(labels_zyx.any(axis=(1, 2)))
    if not len(z_any):
        return list(np.linspace(0, labels_zyx.shape[0] - 1, n).round().astype(int))
    picks = []
    tumor_area = (labels_zyx >= 2).sum(axis=(1, 2))
    if tumor_area.max() > 0:
        picks.append(int(tumor_area.argmax()))
    for z in np.linspace(z_any[0], z_any[-1], n + 2)[1:-1].round().astype(int):
        if len(picks) < n and all(abs(int(z) - p) > 1 for p in picks):
            picks.append(int(z))
    return sorted(picks)


def save_overlay_png(ct: Volume, labels: np.ndarray, path: Path, *, n_slices: int = 4, title: str = "") -> Path:
    """Axial slices (radiological convention: patient right on the left) with label overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    hu, spacing, reorient = to_canonical(ct)
    lab = reorient.to_canonical(np.asarray(labels))
    slices = pick_slices(lab, n_slices)
    colors = np.zeros((4, 4))
    for s in SEGMENTS:
        colors[s["label"]] = [*(c / 255 for c in s["color"]), 0.45]
    cmap = ListedColormap(colors)
    fig, axes = plt.subplots(1, len(slices), figsize=(4 * len(slices), 4.4), squeeze=False)
    aspect = spacing[1] / spacing[2]
    for ax, z in zip(axes[0], slices):
        ax.imshow(hu[z], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect, interpolation="nearest")
        ax.imshow(np.ma.masked_equal(lab[z], 0), cmap=cmap, vmin=0, vmax=3, aspect=aspect, interpolation="nearest")
        for s in SEGMENTS:
            if (lab[z] == s["label"]).any():
                ax.contour(lab[z] == s["label"], levels=[0.5], colors=[np.array(s["color"]) / 255], linewidths=0.8)
        ax.set_title(f"axial slice {z + 1} of {hu.shape[0]}", fontsize=9)
        for x, y, letter in ((0.02, 0.5, "R"), (0.98, 0.5, "L"), (0.5, 0.97, "A"), (0.5, 0.03, "P")):  # the patient's sides
            ax.text(x, y, letter, transform=ax.transAxes, ha="center", va="center", color="yellow", fontsize=9,
                    fontweight="bold")
        ax.axis("off")
    handles = [Patch(color=np.array(s["color"]) / 255, label=s["name"]) for s in SEGMENTS]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(title or "LiverTumorSeg", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_training_curves_png(history: list[dict], path: Path, title: str = "training") -> Path:
    """Training loss and validation Dice against epoch (``[{"epoch", "loss", "val_dice"?}, ...]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_loss.plot([h["epoch"] for h in history], [h["loss"] for h in history], color="tab:blue")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (deep supervision)")
    val = [(h["epoch"], h["val_dice"]) for h in history if "val_dice" in h and np.isfinite(h["val_dice"])]  # as the trainer picks
    if val:
        epochs, scores = zip(*val)
        ax_dice.plot(epochs, scores, marker="o", ms=3, color="tab:green")
        best = int(np.argmax(scores))
        ax_dice.scatter([epochs[best]], [scores[best]], s=60, facecolors="none", edgecolors="black", zorder=3,
                        label=f"best {scores[best]:.3f} (epoch {epochs[best]})")
        ax_dice.legend(fontsize=8, loc="lower right")
    else:
        ax_dice.text(0.5, 0.5, "no validation cases", ha="center", va="center", transform=ax_dice.transAxes)
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation Dice (per case)")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
