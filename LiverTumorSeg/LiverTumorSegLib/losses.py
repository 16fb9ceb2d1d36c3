"""Training losses for the two binary stages: the G-UNETR++ paper's Dice + CE + HD (liver) and Dice + focal + HD (tumor).

All functions take logits ``(B, 2, Z, Y, X)`` and an integer target ``(B, 1, Z, Y, X)`` in {0, 1}
and return a scalar tensor. ``StageLoss`` combines them per stage, with an HD ramp-in and deep
supervision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import HausdorffDTLoss

DS_WEIGHTS = (4 / 7, 2 / 7, 1 / 7)
"""Deep-supervision weights of the [full, 1/2, 1/4] outputs (1, 1/2, 1/4 normalised)."""

def _foreground(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probability of class 1."""
    return torch.softmax(logits, dim=1)[:, 1:]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - foreground soft Dice, sums over batch and space (nnU-Net ``batch_dice``)."""
    p, g = _foreground(logits), target.float()
    dice = (2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth)
    return 1 - dice


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Voxel-mean cross-entropy."""
    return F.cross_entropy(logits, target[:, 0].long())


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float | None = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Lin et al. focal loss, voxel mean: -alpha_t (1 - p_t)^gamma log p_t.

    alpha_t = ``alpha`` on foreground voxels and 1 - ``alpha`` on background; ``alpha=None``
    weighs every voxel 1 (with ``gamma=0`` this is plain cross-entropy).
    """
    t = target.long()
    log_pt = torch.log_softmax(logits, dim=1).gather(1, t)
    loss = -((1 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * torch.where(t == 1, alpha, 1 - alpha)
    return loss.mean()


def hausdorff_dt_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Karimi & Salcudean distance-transform HD loss on the foreground softmax probability.

    mean over voxels of (p - q)^2 * (d_p^alpha + d_q^alpha); d_p, d_q are per-sample unsigned
    EDT maps (no gradient) to the boundary of {p > 0.5} and of the target; a map is 0 where its
    mask is empty or full. This is MONAI ``HausdorffDTLoss(softmax=True, include_background=False)``
    with a one-hot target, used as is.
    """
    loss = HausdorffDTLoss(alpha=alpha, include_background=False, softmax=True, to_onehot_y=True)
    return loss(logits, target.long())


def godc_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Gradient-optimised Dice loss (Ming & Xiao 2023, seed 003, eq. 8): (1 - DC) * ||U||*.

    Reading of the seed (it leaves the details open): DC and the soft union
    U = sum(P + G - P*G) are per sample; ||U||* is U divided by its batch mean, used as a
    detached gradient scale (the seed calls it "gradient scaling"); the loss is the batch mean.
    With equal unions (or batch size 1) it is the per-sample soft Dice loss.
    """
    p, g = _foreground(logits), target.float()
    dims = tuple(range(1, p.dim()))
    inter = (p * g).sum(dims)
    union = (p + g - p * g).sum(dims)
    dice = (2 * inter + smooth) / (inter + union + smooth)
    scale = (union / union.mean().clamp_min(smooth)).detach()
    return ((1 - dice) * scale).mean()


TERMS = ("dice", "ce", "focal", "hd", "godc")
_DEFAULTS = {**dict.fromkeys(TERMS, 0.0), "hd_ramp_epochs": 0, "hd_alpha": 2.0, "focal_alpha": 0.25, "focal_gamma": 2.0}

LOSS_CONFIGS = {
    "liver": {"dice": 1.0, "ce": 1.0, "focal": 0.0, "hd": 0.1, "godc": 0.0,
              "hd_ramp_epochs": 50, "hd_alpha": 2.0, "focal_alpha": 0.25, "focal_gamma": 2.0},
    "tumor": {"dice": 1.0, "ce": 0.0, "focal": 1.0, "hd": 0.1, "godc": 0.0,
              "hd_ramp_epochs": 50, "hd_alpha": 2.0, "focal_alpha": 0.25, "focal_gamma": 2.0},
}
"""Defaults: liver Dice + CE + 0.1 HD, tumor Dice + focal(0.25, 2) + 0.1 HD; HD ramped in over
50 epochs; GODC off (set its weight to use it, alone or instead of ``dice``)."""


class StageLoss:
    """Weighted sum of the stage's loss terms; ``loss(outputs, target, epoch)``.

    ``config`` holds keys of ``LOSS_CONFIGS``: term weights (``TERMS``; missing ones are 0),
    ``hd_ramp_epochs`` (default 0), ``hd_alpha``, ``focal_alpha``, ``focal_gamma``.
    The HD weight is multiplied by min(1, epoch / hd_ramp_epochs) (full when the ramp is 0).
    """

    def __init__(self, config: dict):
        unknown = set(config) - set(_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown loss settings {sorted(unknown)}")
        self.config = {**_DEFAULTS, **config}

    def weights(self, epoch: float) -> dict:
        """Term weights at ``epoch`` (the HD ramp applied)."""
        c = self.config
        ramp = 1.0 if c["hd_ramp_epochs"] <= 0 else min(1.0, epoch / c["hd_ramp_epochs"])
        return {t: c[t] * (ramp if t == "hd" else 1.0) for t in TERMS}

    def single(self, logits: torch.Tensor, target: torch.Tensor, epoch: float) -> torch.Tensor:
        """Loss of one output; terms with weight 0 are not computed."""
        c = self.config
        terms = {
            "dice": lambda: soft_dice_loss(logits, target),
            "ce": lambda: cross_entropy(logits, target),
            "focal": lambda: focal_loss(logits, target, c["focal_alpha"], c["focal_gamma"]),
            "hd": lambda: hausdorff_dt_loss(logits, target, c["hd_alpha"]),
            "godc": lambda: godc_loss(logits, target),
        }
        total = logits.new_zeros(())
        for name, w in self.weights(epoch).items():
            if w:
                total = total + w * terms[name]()
        return total

    def __call__(self, outputs, target: torch.Tensor, epoch: float) -> torch.Tensor:
        """A tensor, or deep-supervision outputs [full, 1/2, 1/4] weighted by ``DS_WEIGHTS``."""
        if torch.is_tensor(outputs):
            return self.single(outputs, target, epoch)
        pairs = zip(DS_WEIGHTS, outputs)
        return sum(w * self.single(out, resize_target(target, out.shape[2:]), epoch) for w, out in pairs)


def resize_target(target: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour target on an output grid (unchanged when it already matches)."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    return F.interpolate(target.float(), size=tuple(size), mode="nearest").long()
