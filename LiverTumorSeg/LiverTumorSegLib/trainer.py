"""A minimal trainer: Adam, Dice + cross-entropy, deep supervision, foreground-oversampled patches.

Stage samples are built by the same functions inference uses (``pipeline.liver_stage_input``,
``pipeline.tumor_stage_input``). The tumor stage learns "lesion" (tumor and cyst together), as
public datasets label it, so the HU cyst filter has real work to do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.losses import DiceCELoss

from .losses import DS_WEIGHTS, resize_target
from .netconfig import NetConfig
from .network import GUNETRpp
from .orientation import to_canonical
from .pipeline import liver_stage_input, tumor_stage_input
from .preprocess import resize_labels
from .volume import Volume

LESION_LABELS = (2, 3)


@dataclass
class TrainConfig:
    stage: str
    net: NetConfig
    preprocessing: dict
    steps: int = 2000
    batch: int = 2
    lr: float = 5e-4
    weight_decay: float = 3e-5
    fg_fraction: float = 0.5
    intensity_shift: float = 0.05
    seed: int = 0
    log_every: int = 50
    history: list = field(default_factory=list)


def build_sample(ct: Volume, labels: Volume, stage: str, pre: dict) -> tuple[np.ndarray, np.ndarray]:
    """(network input, binary target) on the model grid, exactly as inference prepares the input."""
    hu, spacing, reorient = to_canonical(ct)
    lab = reorient.to_canonical(labels.array)
    if stage == "liver":
        img = liver_stage_input(hu, spacing, pre)
        return img, resize_labels((lab > 0).astype(np.uint8), img.shape)
    if stage == "tumor":
        img, mask, box = tumor_stage_input(hu, lab > 0, spacing, pre)
        target = resize_labels(np.isin(lab[box], LESION_LABELS).astype(np.uint8), img.shape)
        target[~mask] = 0
        return img, target
    raise ValueError(f"unknown stage {stage!r}")


class PatchSampler:
    """Random tile-sized patches; a ``fg_fraction`` of them centred on a foreground voxel."""

    def __init__(self, samples, tile, fg_fraction: float, rng: np.random.Generator):
        self.tile, self.fg_fraction, self.rng = tuple(tile), fg_fraction, rng
        self.samples = [self._pad(img, tgt) for img, tgt in samples]
        self.fg = [np.argwhere(t > 0) for _, t in self.samples]

    def _pad(self, img, tgt):
        pad = [(0, max(t - s, 0)) for s, t in zip(img.shape, self.tile)]
        return np.pad(img, pad), np.pad(tgt, pad)

    def patch(self) -> tuple[np.ndarray, np.ndarray]:
        i = int(self.rng.integers(len(self.samples)))
        img, tgt = self.samples[i]
        fg = self.fg[i]
        if len(fg) and self.rng.random() < self.fg_fraction:
            centre = fg[self.rng.integers(len(fg))]
            start = [int(c) - t // 2 + int(self.rng.integers(-t // 4, t // 4 + 1)) for c, t in zip(centre, self.tile)]
        else:
            start = [int(self.rng.integers(0, s - t + 1)) for s, t in zip(img.shape, self.tile)]
        start = [min(max(s, 0), n - t) for s, n, t in zip(start, img.shape, self.tile)]
        sl = tuple(slice(s, s + t) for s, t in zip(start, self.tile))
        return img[sl], tgt[sl]

    def batch(self, n: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.patch() for _ in range(n)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        if shift:
            x = x + torch.empty(n, 1, 1, 1, 1).uniform_(-shift, shift) * (x > 0)
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))[:, None]
        return x.float(), y


def deep_supervision_loss(outputs, target, loss_fn) -> torch.Tensor:
    """Weighted loss over [full, 1/2, 1/4] outputs; targets reduced by nearest neighbour."""
    return sum(w * loss_fn(out, resize_target(target, out.shape[2:])) for w, out in zip(DS_WEIGHTS, outputs))


def train(samples, cfg: TrainConfig, progress=None, checkpoint=None, checkpoint_every: int = 500) -> GUNETRpp:
    """Train a network from scratch on (image, target) samples.

    ``progress(step, steps, loss)`` is called each step; ``checkpoint(net, step)`` every
    ``checkpoint_every`` steps (the network is put back in training mode afterwards).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = GUNETRpp(cfg.net, deep_supervision=True).train()
    sampler = PatchSampler(samples, cfg.net.tile, cfg.fg_fraction, rng)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / cfg.steps) ** 0.9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    t0, running = time.perf_counter(), []
    for step in range(cfg.steps):
        x, y = sampler.batch(cfg.batch, cfg.intensity_shift)
        loss = deep_supervision_loss(net(x), y, loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        sched.step()
        value = loss.item()
        running.append(value)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            cfg.history.append({"step": step + 1, "loss": float(np.mean(running)), "seconds": round(time.perf_counter() - t0, 1)})
            running = []
        if progress is not None:
            progress(step + 1, cfg.steps, value)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            checkpoint(net.eval(), step + 1)
            net.train()
    return net.eval()


DEFAULT_PREPROCESSING = {
    "liver": {"hu_window": [-250, 250], "resample": {"mode": "spacing", "spacing": [4.0, 2.5, 2.5]}},
    "tumor": {"hu_window": [-250, 250], "resample": {"mode": "spacing", "spacing": [2.0, 1.25, 1.25]}, "liver_margin_mm": 10.0},
}
"""Model grids (z, y, x mm) of the small configuration: coarse for the liver, finer for tumors."""

STAGE_LABELS = {"liver": ["background", "liver"], "tumor": ["background", "lesion (tumor or cyst)"]}


def make_card(name: str, cfg: TrainConfig, data: str, seconds: float, command: str) -> dict:
    """A model card for a network this trainer produced (metrics are measured separately)."""
    import platform

    from . import __version__

    return {
        "name": name,
        "version": __version__,
        "stage": cfg.stage,
        "labels": STAGE_LABELS[cfg.stage],
        "preprocessing": cfg.preprocessing,
        "inference": {"step": 0.5, "fast_step": 1.0, "threshold": 0.5},
        "hessian_axis": "net.hessian_axis 0 = mixed derivatives with the slice axis (paper intent: d2I/dxdz, d2I/dydz)",
        "training": {
            "data": data,
            "target": "liver (labels 1-3)" if cfg.stage == "liver" else "lesion = tumor + cyst (labels 2-3) inside the ground-truth liver + margin",
            "trainer": "minimal: Adam, poly lr, Dice + CE, deep supervision 4/7 2/7 1/7, foreground-oversampled patches, intensity shift",
            "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "fg_fraction": cfg.fg_fraction,
            "seconds": round(seconds), "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "command": command, "loss_history": cfg.history,
        },
        "metrics": {},
        "intended_use": "Research and demonstration only. NOT FOR CLINICAL USE.",
        "licence": "Apache-2.0",
    }
