"""Network configurations: the paper's G-UNETR++ and a small one, sharing one code path."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from math import prod


@dataclass(frozen=True)
class NetConfig:
    """Everything that sets the shape of a G-UNETR++ network.

    Axes are (z, y, x) = (slice, row, column). ``hessian_axis`` is the tile axis the two mixed
    second derivatives share: 0 = the slice axis (paper intent: d2I/dxdz, d2I/dydz), 2 = the
    authors' code (tensor dim 2, an in-plane axis: d2I/dzdx, d2I/dydx). ``conv_norm`` is the
    normalisation of the transformer blocks' convolutional residual: ``batch`` as in UNETR++, or
    ``instance`` (independent of the batch, so data-parallel training matches one process exactly
    even where batch statistics cannot be synchronised, as on CPUs).
    """

    tile: tuple[int, int, int] = (64, 128, 128)
    stem: tuple[int, int, int] = (2, 4, 4)
    dims: tuple[int, int, int, int] = (32, 64, 128, 256)
    depths: tuple[int, int, int, int] = (3, 3, 3, 3)
    decoder_depth: int = 3
    heads: int = 4
    proj: tuple[int, int, int, int] = (64, 64, 64, 32)
    decoder_proj: int = 64
    classes: int = 2
    hessian_axis: int = 0
    attn_dropout: float = 0.15
    conv_dropout: float = 0.1
    conv_norm: str = "batch"

    def __post_init__(self):
        sizes = {"tile": (self.tile, 3), "stem": (self.stem, 3), "dims": (self.dims, 4), "depths": (self.depths, 4),
                 "proj": (self.proj, 4), "heads": ((self.heads,), 1), "decoder_depth": ((self.decoder_depth,), 1),
                 "decoder_proj": ((self.decoder_proj,), 1), "classes": ((self.classes,), 1)}
        for name, (values, length) in sizes.items():
            if len(values) != length or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
                raise ValueError(f"{name} must be {length} whole number(s) of at least 1, not {values}")
        if not all(isinstance(p, (int, float)) and 0 <= p < 1 for p in (self.attn_dropout, self.conv_dropout)):
            raise ValueError("dropout rates must be in [0, 1)")
        grid = self.token_grid(0)
        if any(t % s for t, s in zip(self.tile, self.stem)):
            raise ValueError(f"tile {self.tile} is not divisible by the stem stride {self.stem}")
        if any(g % 8 for g in grid):
            raise ValueError(f"token grid {grid} must be divisible by 8 (three stride-2 stages)")
        if self.hessian_axis not in (0, 1, 2):
            raise ValueError("hessian_axis must be 0, 1 or 2")
        if self.conv_norm not in ("batch", "instance"):
            raise ValueError("conv_norm must be batch or instance")
        if any(d % self.heads for d in self.dims) or self.dims[0] % 2:
            raise ValueError("dims must be even and divisible by the number of heads")

    @property
    def feature_size(self) -> int:
        """Channels of the full-resolution decoder stage (half the first encoder width)."""
        return self.dims[0] // 2

    def token_grid(self, stage: int) -> tuple[int, int, int]:
        """Token grid (z, y, x) of encoder stage 0..3."""
        return tuple(t // s // 2**stage for t, s in zip(self.tile, self.stem))

    def tokens(self, stage: int) -> int:
        return prod(self.token_grid(stage))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PAPER = NetConfig()
"""G-UNETR++ as published: 64x128x128 tiles, 97.7 M parameters, 73.0 GMAC per tile."""

SMALL = NetConfig(
    tile=(32, 64, 64),
    dims=(12, 24, 48, 96),
    depths=(1, 1, 1, 1),
    decoder_depth=1,
    proj=(32, 32, 16, 8),
    decoder_proj=32,
)
"""A small configuration for CPU inference, bundled models and fast tests."""

CONFIGS = {"paper": PAPER, "small": SMALL}
