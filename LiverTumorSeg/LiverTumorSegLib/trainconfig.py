"""Training configuration files: bundled ones by name (``configs/*.json``) or a user's JSON file.

A config holds the whole recipe for both stages; ``StageRecipe`` is the part one stage uses.
Unknown keys are errors (a typo must not silently train something else).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .losses import LOSS_CONFIGS, StageLoss
from .netconfig import CONFIGS, NetConfig

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = ("liver", "tumor")
OPTIMIZERS = {"adam": {"lr", "weight_decay"}, "sgd": {"lr", "weight_decay", "momentum", "nesterov"}}
AUGMENTATIONS = {"rotate90", "mirror", "scale", "intensity_shift"}
# How a foreground-centred patch picks its centre: any foreground voxel alike ("voxel"), or first a
# connected foreground region, each alike, then a voxel in it ("component": small lesions get as
# many patches as large ones).
FG_SAMPLING = ("voxel", "component")
REQUIRED = ("net", "epochs", "iterations_per_epoch", "batch", "optimizer", "loss", "preprocessing")
DEFAULTS = {
    "description": "",
    "poly_exponent": 0.9,
    "grad_clip": 12.0,
    "fg_fraction": 0.33,
    "fg_sampling": "voxel",
    "amp": True,
    "val_every": 5,
    "seed": 0,
    "split": [0.7, 0.15, 0.15],
    "augmentation": {},
}


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> dict:
    """A bundled config by name (``small``, ``paper``, ``paper-sgd``) or a JSON file, checked."""
    key = str(name_or_path)
    path = CONFIG_DIR / f"{key}.json" if key in bundled_configs() else Path(key)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"No training config '{key}': give a file or one of {', '.join(bundled_configs())}.") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"The training config '{path}' is not valid JSON: {exc}") from None
    return check_config(raw, str(path))


def check_config(raw: dict, where: str = "config") -> dict:
    """The config with defaults filled in; one clear error for anything wrong."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a training config is a JSON object.")
    unknown = set(raw) - set(REQUIRED) - set(DEFAULTS)
    missing = [k for k in REQUIRED if k not in raw]
    if unknown or missing:
        raise InputError(f"{where}: unknown keys {sorted(unknown)}, missing keys {missing}.")
    cfg = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(raw)}
    try:
        net_config(cfg)
        for key in ("epochs", "iterations_per_epoch", "batch", "val_every"):
            if int(cfg[key]) < 1:
                raise ValueError(f"'{key}' must be at least 1")
        opt = dict(cfg["optimizer"])
        name = opt.pop("name", None)
        if name not in OPTIMIZERS or set(opt) - OPTIMIZERS[name]:
            raise ValueError(f"optimizer needs name adam or sgd and only the keys {sorted(OPTIMIZERS.get(name, ()))}")
        if set(cfg["augmentation"]) - AUGMENTATIONS:
            raise ValueError(f"augmentation keys are {sorted(AUGMENTATIONS)}")
        for stage in STAGES:
            recipe = stage_recipe(cfg, stage)
            StageLoss(recipe.loss)
            if "resample" not in recipe.preprocessing:
                raise ValueError(f"preprocessing.{stage} needs 'resample'")
            if not 0.0 <= recipe.fg_fraction <= 1.0:
                raise ValueError("fg_fraction must be within 0..1")
            if recipe.fg_sampling not in FG_SAMPLING:
                raise ValueError(f"fg_sampling must be one of {FG_SAMPLING}")
        if cfg["augmentation"].get("rotate90") and len(set(net_config(cfg).tile[1:])) != 1:
            raise ValueError("rotate90 needs a square in-plane tile")
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{where}: {exc}") from None
    return cfg


def net_config(cfg: dict) -> NetConfig:
    """The network: a configuration name (``small``, ``paper``) or a dict of ``NetConfig`` fields."""
    net = cfg["net"]
    if isinstance(net, str):
        if net not in CONFIGS:
            raise ValueError(f"net must be one of {sorted(CONFIGS)} or a dict of network settings")
        return CONFIGS[net]
    return NetConfig.from_dict(net)


@dataclass(frozen=True)
class StageRecipe:
    """What one stage takes from a config."""

    stage: str
    loss: dict
    preprocessing: dict
    fg_fraction: float
    fg_sampling: str


def _per_stage(value, stage: str):
    """A setting given once for both stages, or as {"liver": ..., "tumor": ...}."""
    if isinstance(value, dict) and set(value) <= set(STAGES) and value:
        return value[stage]
    return value


def stage_recipe(cfg: dict, stage: str) -> StageRecipe:
    if stage not in STAGES:
        raise InputError(f"Unknown stage '{stage}': liver or tumor.")
    loss = cfg["loss"].get(stage, LOSS_CONFIGS[stage])
    return StageRecipe(stage, dict(loss), dict(cfg["preprocessing"][stage]), float(_per_stage(cfg["fg_fraction"], stage)),
                       str(_per_stage(cfg["fg_sampling"], stage)))
