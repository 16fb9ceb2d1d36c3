"""The training recipe of one stage: patches, augmentation, loss, optimiser, validation, checkpoints.

Stage samples are built by the functions inference uses (``pipeline.liver_stage_input``,
``pipeline.tumor_stage_input``). The tumor stage learns "lesion" (tumor and cyst together), as
public datasets label it, so the HU cyst filter has real work to do.

Reproducibility: every patch comes from its own seed (config seed, epoch, iteration, index in the
global batch), dropout is reseeded each epoch, and a checkpoint is written after every epoch, so
an interrupted run resumed from its checkpoint ends in the same state as an uninterrupted one,
N data-parallel processes each build 1/N of the same global batch one process would, and batches
drawn ahead by loader workers are the ones the training process would draw.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import torch

from . import distributed
from .augment import Augmenter
from .devices import cuda_bf16
from .errors import InputError
from .losses import StageLoss
from .metrics import dice
from .network import GUNETRpp
from .orientation import to_canonical
from .pipeline import liver_stage_input, tumor_stage_input
from .preprocess import resize_labels
from .slidingwindow import sliding_window_probabilities
from .trainconfig import StageRecipe, net_config, same_recipe, stage_recipe
from .volume import Volume

LESION_LABELS = (2, 3)
STAGE_LABELS = {"liver": ["background", "liver"], "tumor": ["background", "lesion (tumor or cyst)"]}
CHECKPOINT_FORMAT = 1


@dataclass
class Sample:
    """A case on the model grid: network input, binary target and (tumor stage) the inference mask."""

    name: str
    image: np.ndarray
    target: np.ndarray
    mask: np.ndarray | None = None


def build_sample(ct: Volume, labels: Volume, stage: str, pre: dict, name: str = "",
                 liver: np.ndarray | None = None) -> Sample | None:
    """The stage's sample of a labelled CT, exactly as inference prepares its input.

    Tumor stage: cropped and masked around ``liver`` (a mask on the CT's grid, e.g. stage 1's
    prediction), else around the reference liver; None when that liver is empty. The target is
    the reference lesions inside the mask, so lesions stage 1 leaves out are lost as at inference.
    """
    hu, spacing, reorient = to_canonical(ct)
    lab = reorient.to_canonical(labels.array)
    if stage == "liver":
        img = liver_stage_input(hu, spacing, pre)
        return Sample(name, img, resize_labels((lab > 0).astype(np.uint8), img.shape))
    if stage == "tumor":
        around = lab > 0 if liver is None else reorient.to_canonical(np.asarray(liver, bool))
        if not around.any():
            return None
        img, mask, box = tumor_stage_input(hu, around, spacing, pre)
        target = resize_labels(np.isin(lab[box], LESION_LABELS).astype(np.uint8), img.shape)
        target[~mask] = 0
        return Sample(name, img, target, mask)
    raise ValueError(f"unknown stage {stage!r}")


PATCHES, DROPOUT = 0, 1  # independent random streams


def derived_seed(seed: int, stream: int, *keys: int) -> int:
    """A seed for one draw of a stream: a patch (epoch, iteration, index in the global batch), or
    the dropout of an epoch in one process."""
    return int(np.random.SeedSequence([seed, stream, *keys]).generate_state(1)[0])


FG_POINTS = 10_000  # foreground voxels kept per case to centre patches on (nnU-Net keeps a sample too)


class PatchSampler:
    """Random tile-sized patches; a ``fg_fraction`` of them centred near a foreground voxel.

    ``fg_sampling`` "voxel": any foreground voxel alike (large regions get most patches);
    "component": a 26-connected foreground region first, each alike, then a voxel in it.
    Samples may be memory-mapped: only those smaller than a tile are copied (padded).
    """

    def __init__(self, samples: list[Sample], tile, fg_fraction: float, fg_sampling: str = "voxel"):
        self.tile, self.fg_fraction = tuple(tile), fg_fraction
        self.samples = [self._pad(s.image, s.target) for s in samples]
        split = fg_sampling == "component"
        self.fg = [self._foreground(t, split) for _, t in self.samples]

    def _pad(self, img, tgt):
        pad = [(0, max(t - s, 0)) for s, t in zip(img.shape, self.tile)]
        if not any(after for _, after in pad):
            return img, tgt
        return np.pad(img, pad), np.pad(tgt, pad)

    @staticmethod
    def _foreground(target, split: bool) -> list[np.ndarray]:
        """Foreground points to centre patches on: one array, or one per connected region."""
        fg = np.asarray(target) > 0
        points = np.argwhere(fg)
        if split:  # group the points by region in one pass (no full-volume scan per region)
            region = cc3d.connected_components(fg, connectivity=26)[tuple(points.T)]
            order = np.argsort(region, kind="stable")
            groups = np.split(points[order], np.flatnonzero(np.diff(region[order])) + 1)
        else:
            groups = [points]
        rng = np.random.default_rng(0)
        return [g if len(g) <= FG_POINTS else g[np.sort(rng.choice(len(g), FG_POINTS, replace=False))]
                for g in groups if len(g)]

    def patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        i = int(rng.integers(len(self.samples)))
        img, tgt = self.samples[i]
        groups = self.fg[i]
        if groups and rng.random() < self.fg_fraction:
            # one group ("voxel" mode) draws nothing here, so its patches stay those of earlier runs
            fg = groups[int(rng.integers(len(groups)))] if len(groups) > 1 else groups[0]
            centre = fg[rng.integers(len(fg))]
            start = [int(c) - t // 2 + int(rng.integers(-t // 4, t // 4 + 1)) for c, t in zip(centre, self.tile)]
        else:
            start = [int(rng.integers(0, s - t + 1)) for s, t in zip(img.shape, self.tile)]
        start = [min(max(s, 0), n - t) for s, n, t in zip(start, img.shape, self.tile)]
        sl = tuple(slice(s, s + t) for s, t in zip(start, self.tile))
        return img[sl], tgt[sl]


def make_optimizer(params, opt: dict) -> torch.optim.Optimizer:
    """Adam (the paper) or SGD with Nesterov momentum (the authors' code), from the config."""
    opt = dict(opt)
    name = opt.pop("name")
    if name == "adam":
        return torch.optim.Adam(params, lr=opt["lr"], weight_decay=opt.get("weight_decay", 0.0))
    return torch.optim.SGD(params, lr=opt["lr"], momentum=opt.get("momentum", 0.99),
                           nesterov=opt.get("nesterov", True), weight_decay=opt.get("weight_decay", 0.0))


def amp_settings(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use a gradient scaler): bf16 on GPUs that compute it natively, else fp16; none on CPU."""
    if not enabled or device.type != "cuda":
        return None, False
    if cuda_bf16(device):
        return torch.bfloat16, False
    return torch.float16, True


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StageTrainer:
    """Train one stage in ``run_dir``: ``<stage>.checkpoint.pt`` (every epoch, resumable),
    ``<stage>.best.pt`` (best validation Dice), ``<stage>.history.json``."""

    def __init__(self, config: dict, stage: str, train: list[Sample], val: list[Sample], run_dir: Path,
                 device: torch.device, world: distributed.World = distributed.World(), init: GUNETRpp | None = None,
                 loader_workers: int = 0):
        if not train:
            raise InputError(f"No training case has what the {stage} stage learns from.")
        if config["batch"] % world.size:
            raise InputError(f"The global batch {config['batch']} must be divisible by the {world.size} processes.")
        self.config, self.stage, self.val, self.world, self.device = config, stage, val, world, device
        self.recipe: StageRecipe = stage_recipe(config, stage)
        self.run_dir = Path(run_dir)
        self.files = {k: self.run_dir / f"{stage}.{k}" for k in ("checkpoint.pt", "best.pt", "history.json")}
        self.seed = int(config["seed"])
        torch.manual_seed(self.seed)
        self.net = GUNETRpp(net_config(config), deep_supervision=True)
        if init is not None:  # fine-tuning: start from a trained model's weights
            if init.cfg != self.net.cfg:
                raise InputError("The model to start from has another network configuration than the training config.")
            self.net.load_state_dict(init.state_dict())
        self.net.to(device)
        self.model = self.net
        if world.active:
            from torch.nn.parallel import DistributedDataParallel

            if device.type == "cuda":  # batch statistics over the global batch, as one GPU would have them
                self.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
            elif self.net.cfg.conv_norm == "batch" and world.main:
                print("warning: batch norm statistics are per process on CPUs (no SyncBatchNorm there); "
                      "results differ slightly from one process", file=sys.stderr)
            self.model = DistributedDataParallel(self.net, device_ids=[device] if device.type == "cuda" else None)
        self.optimizer = make_optimizer(self.net.parameters(), config["optimizer"])
        total = config["epochs"] * config["iterations_per_epoch"]
        power = float(config["poly_exponent"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: max(0.0, 1 - it / total) ** power)
        self.amp_dtype, use_scaler = amp_settings(device, bool(config["amp"]))
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.loss = StageLoss(self.recipe.loss)
        self.sampler = PatchSampler(train, self.net.cfg.tile, self.recipe.fg_fraction, self.recipe.fg_sampling)
        self.augment = Augmenter(config["augmentation"])
        self.local_batch = config["batch"] // world.size
        self.loader_workers = loader_workers if sys.platform.startswith("linux") else 0  # forked: Linux only
        self.epoch, self.history, self.best = 0, [], {"epoch": None, "dice": -1.0}

    # ------------------------------------------------------------ batches

    def batch(self, epoch: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of the global batch of (epoch, iteration), on the CPU."""
        first = self.world.rank * self.local_batch
        pairs = []
        for index in range(first, first + self.local_batch):
            rng = np.random.default_rng(derived_seed(self.seed, PATCHES, epoch, iteration, index))
            img, tgt = self.sampler.patch(rng)
            pairs.append(self.augment(img, tgt, int(rng.integers(2**31))))
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))[:, None]
        return x, y

    def batches(self, epoch: int):
        """The epoch's batches in order. With ``loader_workers``, forked processes draw them ahead while
        the network trains (the same batches: each depends only on its seeds)."""
        iterations = self.config["iterations_per_epoch"]
        if not self.loader_workers:
            return (self.batch(epoch, it) for it in range(iterations))
        return torch.utils.data.DataLoader(_EpochBatches(self, epoch, iterations), batch_size=None,
                                           num_workers=self.loader_workers, multiprocessing_context="fork",
                                           pin_memory=self.device.type == "cuda", prefetch_factor=2,
                                           generator=torch.Generator())  # not the global RNG, which seeds dropout

    # ------------------------------------------------------------ one epoch

    def train_epoch(self, progress=None) -> float:
        epoch, iterations = self.epoch, self.config["iterations_per_epoch"]
        torch.manual_seed(derived_seed(self.seed, DROPOUT, epoch, self.world.rank))
        self.model.train()
        losses = []
        for it, (x, y) in enumerate(self.batches(epoch)):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outputs = self.model(x)
            loss = self.loss([o.float() for o in outputs], y, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), float(self.config["grad_clip"]))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            losses.append(float(loss.item()))
            if progress is not None:
                progress(epoch, it + 1, iterations, losses[-1])
        return distributed.mean(self.world, float(np.mean(losses)))

    def validate(self) -> float | None:
        """Mean per-case Dice on the validation samples (a missed case counts 0), on the model grid."""
        if not self.val:
            return None
        self.net.eval()
        scores = []
        with torch.no_grad():
            for s in self.val:
                probs = sliding_window_probabilities(self.net, s.image, step=0.5, batch=2, device=self.device,
                                                     amp_dtype=self.amp_dtype)
                pred = probs[1] >= 0.5
                if s.mask is not None:
                    pred &= s.mask
                scores.append(dice(pred, s.target > 0))
        self.net.train()
        return float(np.mean(scores))

    # ------------------------------------------------------------ the run

    def run(self, *, resume: bool = False, progress=None, on_epoch=None, time_limit: float | None = None) -> dict:
        """Train to the configured number of epochs; ``on_epoch(entry)`` after each epoch's checkpoint.

        ``time_limit``: seconds for this call. After each epoch, stop if one more of the longest
        epoch so far would not fit (so at least one runs); the result's ``stopped`` is then True and
        the checkpoint lets ``resume`` continue. The learning rate keeps the full run's schedule."""
        if resume:
            self.load_checkpoint()
        t0 = time.perf_counter() - (self.history[-1]["seconds"] if self.history else 0.0)
        started, longest = time.perf_counter(), 0.0
        while self.epoch < self.config["epochs"]:
            epoch_start = time.perf_counter()
            loss = self.train_epoch(progress)
            entry = {"epoch": self.epoch + 1, "loss": round(loss, 5), "lr": self.scheduler.get_last_lr()[0]}
            last = self.epoch + 1 == self.config["epochs"]
            if self.world.main and ((self.epoch + 1) % self.config["val_every"] == 0 or last):
                score = self.validate()
                if score is not None:
                    entry["val_dice"] = round(score, 5)
                    if score > self.best["dice"]:
                        self.best = {"epoch": self.epoch + 1, "dice": score}
                        _atomic_save({"epoch": self.epoch + 1, "dice": score, "model": self.net.state_dict()}, self.files["best.pt"])
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            self.epoch += 1
            self.history.append(entry)
            if self.world.main:
                self.save_checkpoint()
            distributed.barrier(self.world)
            if on_epoch is not None:
                on_epoch(entry)
            longest = max(longest, time.perf_counter() - epoch_start)
            if time_limit is not None and self.epoch < self.config["epochs"]:
                out_of_time = time.perf_counter() - started + longest > time_limit
                if distributed.mean(self.world, float(out_of_time)) > 0:  # every process stops together
                    return {"history": self.history, "best": self.best, "stopped": True}
        return {"history": self.history, "best": self.best, "stopped": False}

    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "stage": self.stage, "config": self.config, "epoch": self.epoch,
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "history": self.history, "best": self.best, "world_size": self.world.size,
        }

    def save_checkpoint(self) -> None:
        _atomic_save(self.state(), self.files["checkpoint.pt"])
        text = json.dumps({"stage": self.stage, "best": self.best, "history": self.history}, indent=1)
        tmp = self.files["history.json"].with_name(self.files["history.json"].name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.files["history.json"])

    def load_checkpoint(self) -> None:
        path = self.files["checkpoint.pt"]
        if not path.is_file():
            raise InputError(f"Nothing to resume: {path} does not exist.")
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
            if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("stage") != self.stage:
                raise ValueError(f"not a {self.stage} checkpoint of this version")
        except Exception as err:  # noqa: BLE001 - any failure to read means a bad checkpoint
            raise InputError(f"Cannot resume from {path}: {err}") from None
        if not same_recipe(ckpt["config"], self.config):
            raise InputError(f"{path} was written with another training config; resume with the same one "
                             "(only --epochs may change), or start a new run.")
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"] and self.scaler.is_enabled():  # empty when it was off (CPU, bf16): a fresh one starts
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.history, self.best = ckpt["epoch"], ckpt["history"], ckpt["best"]

    def final_network(self) -> tuple[GUNETRpp, int]:
        """The best-validated weights (else the last) and their epoch."""
        if self.best["epoch"] is not None and self.files["best.pt"].is_file():
            best = torch.load(self.files["best.pt"], map_location="cpu", weights_only=False)
            net = GUNETRpp(self.net.cfg, deep_supervision=False)
            net.load_state_dict(best["model"])
            return net.eval(), best["epoch"]
        net = GUNETRpp(self.net.cfg, deep_supervision=False)
        net.load_state_dict(self.net.state_dict())
        return net.eval(), self.epoch


class _EpochBatches(torch.utils.data.Dataset):
    """One epoch's batches by iteration, for a DataLoader's forked workers."""

    def __init__(self, trainer: StageTrainer, epoch: int, iterations: int):
        self.trainer, self.epoch, self.iterations = trainer, epoch, iterations

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, iteration: int):
        return self.trainer.batch(self.epoch, iteration)


def make_card(name: str, config: dict, stage: str, *, data: dict, best: dict, history: list, epoch: int,
              seconds: float, hardware: str, command: str, init: dict | None = None,
              liver_masks: dict | None = None, stopped: bool = False) -> dict:
    """A model card for a network this recipe produced (test-set metrics are measured separately);
    ``liver_masks``: the liver model whose predictions the tumor samples were built around;
    ``stopped``: the run ended at its time limit, before the configured epochs."""
    from . import __version__

    recipe = stage_recipe(config, stage)
    return {
        "name": name,
        "version": __version__,
        "stage": stage,
        "labels": STAGE_LABELS[stage],
        "preprocessing": recipe.preprocessing,
        "inference": {"step": 0.5, "fast_step": 1.0, "threshold": 0.5},
        "hessian_axis": "net.hessian_axis 0 = mixed derivatives with the slice axis (paper intent: d2I/dxdz, d2I/dydz)",
        "training": {
            "data": data,
            "target": "liver (labels 1-3)" if stage == "liver" else
            f"lesion = tumor + cyst (labels 2-3) inside the {'reference liver' if liver_masks is None else 'liver predicted by stage 1'} + margin",
            **({"liver_masks_from": liver_masks} if liver_masks else {}),
            "recipe": {k: v for k, v in config.items() if k != "preprocessing"},
            "initialised_from": init or "random (seed in the recipe)",
            "weights_from_epoch": epoch,
            **({"stopped_at_time_limit": f"after epoch {len(history)} of {config['epochs']} (resumable; the "
                                         "learning rate had not finished its decay)"} if stopped else {}),
            "best_validation": best,
            "seconds": round(seconds), "hardware": hardware, "command": command,
            "history": history,
        },
        "metrics": {},
        "intended_use": "Research and demonstration only. NOT FOR CLINICAL USE.",
        "licence": "Apache-2.0",
    }


def hardware(device: torch.device, world: distributed.World) -> str:
    """Where training ran, for the card."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{world.size} x {what}" if world.active else what
