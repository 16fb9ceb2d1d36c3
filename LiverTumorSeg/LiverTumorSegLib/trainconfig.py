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
            if _integer(cfg[key], key) < 1:
                raise ValueError(f"'{key}' must be at least 1")
        _integer(cfg["seed"], "seed")
        for key in ("poly_exponent", "grad_clip"):
            _number(cfg[key], key)
        if not isinstance(cfg["amp"], bool):
            raise ValueError(f"'amp' must be true or false, not {cfg['amp']!r}")
        opt = dict(cfg["optimizer"])
        name = opt.pop("name", None)
        if name not in OPTIMIZERS or set(opt) - OPTIMIZERS[name]:
            raise ValueError(f"optimizer needs name adam or sgd and only the keys {sorted(OPTIMIZERS.get(name, ()))}")
        for key, value in opt.items():
            if key == "nesterov" and not isinstance(value, bool) or key != "nesterov" and _number(value, f"optimizer.{key}") < 0:
                raise ValueError(f"optimizer.{key} must be {'true or false' if key == 'nesterov' else '0 or more'}")
        _check_augmentation(cfg["augmentation"])
        _check_split_setting(cfg["split"])
        for key in ("loss", "preprocessing"):
            if not isinstance(cfg[key], dict) or set(cfg[key]) - set(STAGES):
                raise ValueError(f"'{key}' holds one entry per stage ({', '.join(STAGES)}), not {sorted(cfg[key])}")
        for key in ("fg_fraction", "fg_sampling"):
            if isinstance(cfg[key], dict) and set(cfg[key]) != set(STAGES):
                raise ValueError(f"'{key}' is one value, or one per stage ({', '.join(STAGES)}), not {sorted(cfg[key])}")
        for stage in STAGES:
            if stage not in cfg["preprocessing"]:
                raise ValueError(f"preprocessing needs a '{stage}' entry")
            check_preprocessing(cfg["preprocessing"][stage], stage)
            loss = cfg["loss"].get(stage, {})
            if not isinstance(loss, dict):
                raise ValueError(f"loss.{stage} is an object of term weights and settings")
            for key, value in loss.items():
                _number(value, f"loss.{stage}.{key}")
            _probability(_per_stage(cfg["fg_fraction"], stage), "fg_fraction")
            recipe = stage_recipe(cfg, stage)
            StageLoss(recipe.loss)
            if recipe.fg_sampling not in FG_SAMPLING:
                raise ValueError(f"fg_sampling must be one of {FG_SAMPLING}")
        if cfg["augmentation"].get("rotate90") and len(set(net_config(cfg).tile[1:])) != 1:
            raise ValueError("rotate90 needs a square in-plane tile")
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{where}: {exc}") from None
    return cfg


PREPROCESSING_KEYS = {"hu_window", "resample", "liver_margin_mm"}
RESAMPLE_KEYS = {"spacing": {"mode", "spacing"}, "inplane_size": {"mode", "size"}, "none": {"mode"}}
AUGMENTATION_KEYS = {"scale": {"prob", "min", "max"}, "intensity_shift": {"prob", "max"}}


def _number(value, key: str) -> float:
    """A JSON number (not a string, not true/false)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"'{key}' must be a number, not {value!r}")
    return float(value)


def _integer(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'{key}' must be a whole number, not {value!r}")
    return value


def _probability(value, key: str) -> None:
    if not 0.0 <= _number(value, key) <= 1.0:
        raise ValueError(f"'{key}' is a probability: within 0..1")


def _check_augmentation(aug) -> None:
    if not isinstance(aug, dict) or set(aug) - AUGMENTATIONS:
        raise ValueError(f"augmentation keys are {sorted(AUGMENTATIONS)}")
    for key in ("rotate90", "mirror"):
        if key in aug:
            _probability(aug[key], f"augmentation.{key}")
    for key, allowed in AUGMENTATION_KEYS.items():
        if key not in aug:
            continue
        if not isinstance(aug[key], dict) or set(aug[key]) != allowed:
            raise ValueError(f"augmentation.{key} needs exactly the keys {sorted(allowed)}")
        _probability(aug[key]["prob"], f"augmentation.{key}.prob")
        values = {k: _number(v, f"augmentation.{key}.{k}") for k, v in aug[key].items()}
        if key == "scale" and not 0 < values["min"] <= values["max"]:
            raise ValueError("augmentation.scale needs 0 < min <= max")


def _check_split_setting(split) -> None:
    """``lits-paper``, or three shares summing to 1 (numbers with a decimal point) or three whole counts."""
    if split == "lits-paper":
        return
    if not isinstance(split, list) or len(split) != 3:
        raise ValueError(f"'split' is \"lits-paper\" or three shares or counts [train, val, test], not {split!r}")
    values = [_number(v, "split") for v in split]
    if min(values) < 0:
        raise ValueError("'split' values must be 0 or more")
    if not all(isinstance(v, int) for v in split) and abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"'split' shares {split} do not add up to 1 (whole numbers are counts of cases)")


def check_preprocessing(pre, stage: str) -> None:
    where = f"preprocessing.{stage}"
    if not isinstance(pre, dict) or set(pre) - PREPROCESSING_KEYS:
        raise ValueError(f"{where} keys are {sorted(PREPROCESSING_KEYS)}")
    if "resample" not in pre:
        raise ValueError(f"{where} needs 'resample'")
    resample = pre["resample"]
    mode = resample.get("mode") if isinstance(resample, dict) else None
    if mode not in RESAMPLE_KEYS or set(resample) != RESAMPLE_KEYS[mode]:
        raise ValueError(f"{where}.resample is one of " + "; ".join(
            f"mode {m!r} with {sorted(k - {'mode'}) or 'nothing else'}" for m, k in RESAMPLE_KEYS.items()))
    if mode == "spacing" and not (isinstance(resample["spacing"], list) and len(resample["spacing"]) == 3
                                  and all(_number(v, f"{where}.resample.spacing") > 0 for v in resample["spacing"])):
        raise ValueError(f"{where}.resample.spacing is three sizes in mm (z, y, x), each above 0")
    if mode == "inplane_size" and _integer(resample["size"], f"{where}.resample.size") < 8:
        raise ValueError(f"{where}.resample.size must be at least 8")
    if "hu_window" in pre:
        window = pre["hu_window"]
        if not (isinstance(window, list) and len(window) == 2
                and _number(window[0], f"{where}.hu_window") < _number(window[1], f"{where}.hu_window")):
            raise ValueError(f"{where}.hu_window is [low, high] HU with low < high")
    if "liver_margin_mm" in pre and _number(pre["liver_margin_mm"], f"{where}.liver_margin_mm") < 0:
        raise ValueError(f"{where}.liver_margin_mm must be 0 or more")


def same_recipe(a: dict, b: dict) -> bool:
    """Whether two configs train the same way: a run resumes only with its own config (--epochs may change)."""
    return {**a, "epochs": 0} == {**b, "epochs": 0}


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
