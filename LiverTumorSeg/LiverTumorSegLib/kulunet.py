"""The whole-liver and liver-lesion U-Nets of pyliverlesionseg 0.3 (KU Leuven, Apache-2.0), in PyTorch.

Written from the published architecture (their ``create_unet_like_model``), not from their code:
a 4-level 3-D U-Net on one-channel patches indexed (x, y, z) in RAS order, channels first here
(their Keras tensors are channels last). Facts that matter for equal outputs:

- between layers a parameter-free instance norm, (x - mean) / (std + 1e-7) with the population
  std over the whole patch per channel (the epsilon is added to the std, not to the variance),
  then LeakyReLU(0.01); the very first convolution sees the raw input;
- the liver net: 'same' convolutions, max-pool 3, "linear" upsampling = trilinear interpolation
  with aligned corners from n to (n - 1) * 3 + 1 voxels (their repeat + 3-wide average pool);
- the lesion net: 'valid' convolutions, max-pool 2, nearest (repeat) upsampling, and residual
  blocks whose shortcut is the block input, centre-cropped, through a 1x1x1 convolution where the
  channel count changes;
- skips are centre-cropped to the upsampled size and concatenated before it ([skip, up]);
- one output channel with a sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EPSILON = 1e-7  # Keras' K.epsilon(), added to the std
IN_PLANE, CUBE = (3, 3, 1), (3, 3, 3)


@dataclass(frozen=True)
class KULConfig:
    """One of the two networks: kernels and features per level (down, up), the bottom level last."""

    name: str
    pool: int
    padding: str  # "same" or "valid"
    upsampling: str  # "linear" or "copy"
    residual: bool
    down_kernels: tuple
    up_kernels: tuple
    down_features: tuple
    up_features: tuple
    patch_in: tuple[int, int, int]  # (x, y, z)
    patch_out: tuple[int, int, int]


_DOWN_FEATURES = ((20, 40), (40, 80), (80, 160), (160, 160))
_UP_FEATURES = ((40, 20), (80, 40), (160, 80))
_UP_KERNELS = ((CUBE, IN_PLANE),) * 3

LIVER = KULConfig("liver", 3, "same", "linear", False, ((IN_PLANE, CUBE),) * 3 + ((CUBE, CUBE),), _UP_KERNELS,
                  _DOWN_FEATURES, _UP_FEATURES, (189, 162, 162), (163, 136, 136))
LESION = KULConfig("lesion", 2, "valid", "copy", True, ((IN_PLANE, CUBE),) * 4, _UP_KERNELS,
                   _DOWN_FEATURES, _UP_FEATURES, (180, 172, 86), (92, 84, 42))
CONFIGS = {"liver": LIVER, "lesion": LESION}


def instance_norm(x: torch.Tensor) -> torch.Tensor:
    """Their weight-free instance norm: (x - mean) / (population std + 1e-7), per sample and channel."""
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    std = (x - mean).pow(2).mean(dims, keepdim=True).sqrt()
    return (x - mean) / (std + EPSILON)


def centre_crop(x: torch.Tensor, size) -> torch.Tensor:
    """Crop the spatial axes symmetrically to ``size`` (their Cropping3D((l - r) // 2))."""
    slices = [slice(None), slice(None)]
    for n, m in zip(x.shape[2:], size):
        c = (n - m) // 2
        slices.append(slice(c, c + m))
    return x[tuple(slices)]


class Block(nn.Module):
    """Convolutions, each after norm + LeakyReLU (except the net's very first), optionally residual."""

    def __init__(self, cin: int, features, kernels, padding: str, residual: bool, first: bool):
        super().__init__()
        self.first = first
        chans = [cin, *features]
        self.convs = nn.ModuleList(
            nn.Conv3d(a, b, k, padding=tuple(s // 2 for s in k) if padding == "same" else 0)
            for a, b, k in zip(chans[:-1], chans[1:], kernels))
        self.residual = residual
        self.shortcut = nn.Conv3d(cin, features[-1], 1) if residual and cin != features[-1] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for j, conv in enumerate(self.convs):
            if not (self.first and j == 0):
                h = F.leaky_relu(instance_norm(h), 0.01)
            h = conv(h)
        if self.residual:
            s = centre_crop(x, h.shape[2:])
            h = h + (self.shortcut(s) if self.shortcut is not None else s)
        return h


class KULUNet(nn.Module):
    """Normalised image in (B, 1, X, Y, Z), sigmoid probabilities out (B, 1, X', Y', Z'): no logits."""

    def __init__(self, cfg: KULConfig):
        super().__init__()
        self.cfg = cfg
        levels = len(cfg.down_features)
        cin, self.down = 1, nn.ModuleList()
        for i in range(levels):
            self.down.append(Block(cin, cfg.down_features[i], cfg.down_kernels[i], cfg.padding, cfg.residual, first=i == 0))
            cin = cfg.down_features[i][-1]
        self.up = nn.ModuleList()
        for i in reversed(range(levels - 1)):
            skip = cfg.down_features[i][-1]
            self.up.append(Block(skip + cin, cfg.up_features[i], cfg.up_kernels[i], cfg.padding, cfg.residual, first=False))
            cin = cfg.up_features[i][-1]
        self.head = nn.Conv3d(cin, 1, 1)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        s = self.cfg.pool
        if self.cfg.upsampling == "copy":
            return x.repeat_interleave(s, 2).repeat_interleave(s, 3).repeat_interleave(s, 4)
        size = tuple((n - 1) * s + 1 for n in x.shape[2:])
        return F.interpolate(x, size=size, mode="trilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for i, block in enumerate(self.down):
            if i:
                h = F.max_pool3d(h, self.cfg.pool)
            h = block(h)
            skips.append(h)
        skips.pop()  # the bottom level's output is not a skip
        for block in self.up:
            h = self._upsample(h)
            h = block(torch.cat([centre_crop(skips.pop(), h.shape[2:]), h], dim=1))
        return torch.sigmoid(self.head(F.leaky_relu(instance_norm(h), 0.01)))

    def keras_order(self) -> list[nn.Conv3d]:
        """The convolutions in the order Keras created them (conv3d_1, conv3d_2, ...)."""
        order = []
        for block in [*self.down, *self.up]:
            order += list(block.convs)
            if block.shortcut is not None:
                order.append(block.shortcut)
        return [*order, self.head]


def load_keras_weights(net: KULUNet, layers: dict[str, tuple]) -> None:
    """Copy Keras Conv3D weights ``{"conv3d_N": (kernel (kx, ky, kz, in, out), bias (out,))}`` into ``net``,
    checking every shape; raises ValueError on any mismatch or leftover layer."""
    convs = net.keras_order()
    expected = [f"conv3d_{i}" for i in range(1, len(convs) + 1)]
    if sorted(layers, key=lambda n: int(n.rsplit("_", 1)[1])) != expected:
        raise ValueError(f"the weight file has conv layers {sorted(layers)}, the {net.cfg.name} net needs {expected}")
    with torch.no_grad():
        for name, conv in zip(expected, convs):
            kernel, bias = (torch.as_tensor(a) for a in layers[name])
            weight = kernel.permute(4, 3, 0, 1, 2)
            if tuple(weight.shape) != tuple(conv.weight.shape) or tuple(bias.shape) != tuple(conv.bias.shape):
                raise ValueError(f"{name}: kernel {tuple(kernel.shape)} / bias {tuple(bias.shape)} do not fit "
                                 f"{tuple(conv.weight.shape)} / {tuple(conv.bias.shape)}")
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
