"""Model files: network weights and their model card in one safetensors file.

The card (JSON in the safetensors metadata) holds the network config, stage, labels,
preprocessing, training data, measured metrics, licence and intended use; the metadata also
holds the sha256 of the weights, checked on load.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelFileError
from .netconfig import NetConfig
from .network import GUNETRpp

G_UNETRPP, KUL_UNET = "g-unetr++", "kul-unet"  # card["architecture"]; absent in older cards: G-UNETR++
FORMAT = "livertumorseg-model"
FORMAT_VERSION = "1"
STAGES = ("liver", "tumor")
REQUIRED_CARD_KEYS = ("name", "stage", "net", "labels", "preprocessing", "inference", "training", "intended_use")


@dataclass
class StageModel:
    """A loaded network with its card; ``sha256`` is the file's, ``weights_sha256`` the weights' alone
    (it survives a card update such as written metrics)."""

    net: GUNETRpp
    card: dict
    path: Path
    sha256: str
    weights_sha256: str

    @property
    def cfg(self) -> NetConfig:
        return self.net.cfg

    def identity(self) -> dict:
        """How a card or report names this model: name, file name, file and weights sha256."""
        return {"name": self.card["name"], "file": self.path.name, "sha256": self.sha256,
                "weights_sha256": self.weights_sha256}

    def prediction_key(self) -> dict:
        """What this model's output depends on: its weights and every card field but the measured metrics."""
        settings = json.dumps({k: v for k, v in self.card.items() if k != "metrics"}, sort_keys=True)
        return {"weights_sha256": self.weights_sha256, "card_sha256": hashlib.sha256(settings.encode()).hexdigest()}


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_network(net: torch.nn.Module) -> tuple[str, dict]:
    """(architecture, net settings) for a card: G-UNETR++ and its NetConfig, or an imported network."""
    from .kulunet import KULUNet

    if isinstance(net, KULUNet):
        return KUL_UNET, {"config": net.cfg.name}
    return G_UNETRPP, net.cfg.to_dict()


def build_network(card: dict) -> torch.nn.Module:
    """An untrained network of the card's architecture and settings."""
    architecture = card.get("architecture", G_UNETRPP)
    if architecture == G_UNETRPP:
        return GUNETRpp(NetConfig.from_dict(card["net"]), deep_supervision=False)
    if architecture == KUL_UNET:
        from .kulunet import CONFIGS, KULUNet

        return KULUNet(CONFIGS[card["net"]["config"]])
    raise ValueError(f"unknown architecture {architecture!r}")


def save_model(net: torch.nn.Module, card: dict, path: Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write weights (cast to ``dtype``) and the card; fills ``card['architecture']`` and ``card['net']``."""
    architecture, settings = describe_network(net)
    card = dict(card, architecture=architecture, net=settings)
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}")
    state = {k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items() if v.is_floating_point()}
    state.update({k: v.detach().contiguous() for k, v in net.state_dict().items() if not v.is_floating_point()})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "card": json.dumps(card), "weights_sha256": weights_sha256(state)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def read_card(path: Path) -> dict:
    """The model card of a model file, without loading the weights."""
    return _open(Path(path))[0]


def _open(path: Path) -> tuple[dict, dict, dict]:
    if not path.is_file():
        raise ModelFileError(f"Model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad file
        raise ModelFileError(f"{path} is not a readable LiverTumorSeg model file (truncated or corrupt?): {err}") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a LiverTumorSeg model file (no '{FORMAT}' header).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path} has model format version {meta.get('format_version')}; this build reads {FORMAT_VERSION}.")
    try:
        card = json.loads(meta["card"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} has a damaged model card: {err}") from None
    return card, meta, state


def _check_card(card: dict, path: Path) -> None:
    """Refuse cards whose preprocessing or labels the engine could not follow."""
    from .preprocess import model_shape
    from .trainconfig import check_preprocessing

    pre = card["preprocessing"]
    if card.get("architecture", G_UNETRPP) != G_UNETRPP:
        return  # imported networks run their own preprocessing (see their card)
    try:
        NetConfig.from_dict(card["net"])
        check_preprocessing(pre, card["stage"])
        model_shape((8, 8, 8), (1.0, 1.0, 1.0), pre["resample"])
        inference = card["inference"]
        for key in ("threshold", "step", "fast_step"):
            value = inference.get(key, 0.5)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"inference.{key} must be a number in (0, 1], not {value!r}")
        if len(card["labels"]) != card["net"].get("classes", 2):
            raise ValueError(f"{len(card['labels'])} labels for {card['net'].get('classes', 2)} classes")
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{path}: the model card's network, preprocessing, inference settings or labels are invalid "
                             f"({err}).") from None


def load_model(path: Path, *, stage: str | None = None, device: str | torch.device = "cpu") -> StageModel:
    """Load and verify a model file; ``stage`` if given must match the card's."""
    path = Path(path)
    card, meta, state = _open(path)
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ModelFileError(f"{path}: model card lacks {', '.join(missing)}.")
    if stage is not None and card["stage"] != stage:
        raise ModelFileError(f"{path} is a '{card['stage']}' model, but a '{stage}' model is needed here.")
    if weights_sha256(state) != meta.get("weights_sha256"):
        raise ModelFileError(f"{path}: weights do not match their checksum (file damaged or edited).")
    if broken := [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise ModelFileError(f"{path}: {len(broken)} weight tensor(s) hold NaN or infinite values (first: {broken[0]}), as "
                             "a training run that diverged leaves them; retrain, or use another model.")
    _check_card(card, path)
    try:
        net = build_network(card)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ModelFileError(f"{path}: weights do not match the network described by its card: "
                             f"{' '.join(str(err).split())[:300]}") from None
    net.eval().to(device)
    return StageModel(net, card, path, file_sha256(path), meta["weights_sha256"])


def average_models(paths: list[Path], out: Path, *, note: str) -> Path:
    """The weight-by-weight mean of models of one stage, network and preprocessing (a "model soup":
    one network's cost, unlike an ensemble), saved fp16 under the last model's card, which then names
    every source (``training.averaged_from``) and says why (``note``); measured metrics are dropped."""
    if len(paths) < 2:
        raise ValueError("averaging needs at least two models")
    models = [load_model(p) for p in paths]
    same = ("stage", "architecture", "net", "labels", "preprocessing", "inference")
    for model in models[1:]:
        differing = [k for k in same if model.card.get(k) != models[0].card.get(k)]
        if differing:
            raise ModelFileError(f"{model.path} cannot be averaged with {models[0].path}: its {', '.join(differing)} differ.")
    states = [m.net.state_dict() for m in models]
    # summed pairwise from the first model's tensor (not from 0, which would turn -0.0 into +0.0)
    mean = {k: functools.reduce(torch.add, (s[k].float() for s in states)) / len(states) if v.is_floating_point() else v
            for k, v in states[0].items()}
    net = build_network(models[-1].card)
    net.load_state_dict(mean)
    card = {k: v for k, v in models[-1].card.items() if k != "metrics"}
    card["training"] = {**card["training"], "averaged_from": [m.identity() for m in models], "averaging": note}
    return save_model(net, card, out)


def update_card(path: Path, **fields) -> dict:
    """Rewrite a model file's card with ``fields`` changed (e.g. measured metrics); weights untouched."""
    path = Path(path)
    card, meta, state = _open(path)
    card.update(fields)
    meta = dict(meta, card=json.dumps(card))
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)
    return card
