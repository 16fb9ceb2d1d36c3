"""G-UNETR++: UNETR++ with two extra encoders fed with mixed second derivatives of the CT tile.

Our implementation of the architecture the papers describe (G-UNETR++, Lee et al.,
Appl. Sci. 2025; UNETR++, Shaker et al., IEEE TMI 2024). MONAI supplies the convolution blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, get_conv_layer
from torch import nn

from .netconfig import NetConfig

# For each shared axis, the two other tile axes in the order (x-like, y-like) of the paper's
# "first two elements of the last column of the Hessian".
_MIXED_PARTNERS = {0: (2, 1), 1: (2, 0), 2: (0, 1)}


def mixed_second_derivatives(x: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """d2I/(da db) for the two axes b != ``axis``, per sample, by central differences.

    ``x`` is (B, 1, Z, Y, X); each output has the same shape. No smoothing, unit voxel spacing,
    one-sided differences at the borders (as ``torch.gradient``).
    """
    vol = x[:, 0]
    (first,) = torch.gradient(vol, dim=1 + axis)
    out = []
    for other in _MIXED_PARTNERS[axis]:
        (second,) = torch.gradient(first, dim=1 + other)
        out.append(second.unsqueeze(1))
    return out[0], out[1]


class EPA(nn.Module):
    """Efficient paired attention: channel and linear spatial attention sharing queries and keys."""

    def __init__(self, tokens: int, dim: int, proj: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkvv = nn.Linear(dim, 4 * dim, bias=False)
        self.project_tokens = nn.Linear(tokens, proj)  # E = F, shared between keys and values
        self.temp_channel = nn.Parameter(torch.ones(heads, 1, 1))
        self.temp_spatial = nn.Parameter(torch.ones(heads, 1, 1))
        self.drop_channel = nn.Dropout(dropout)
        self.drop_spatial = nn.Dropout(dropout)
        self.out_spatial = nn.Linear(dim, dim // 2)
        self.out_channel = nn.Linear(dim, dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        # (4, B, heads, d, N): channels by tokens, per head
        q, k, v_channel, v_spatial = self.qkvv(x).reshape(b, n, 4, h, c // h).permute(2, 0, 3, 4, 1)
        k_proj = self.project_tokens(k)  # (B, h, d, p), from the unnormalised keys
        v_proj = self.project_tokens(v_spatial)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)

        attn_c = self.drop_channel((q @ k.transpose(-2, -1) * self.temp_channel).softmax(dim=-1))
        x_c = (attn_c @ v_channel).permute(0, 3, 1, 2).reshape(b, n, c)

        attn_s = self.drop_spatial((q.transpose(-2, -1) @ k_proj * self.temp_spatial).softmax(dim=-1))
        x_s = (attn_s @ v_proj.transpose(-2, -1)).permute(0, 2, 1, 3).reshape(b, n, c)
        return torch.cat([self.out_spatial(x_s), self.out_channel(x_c)], dim=-1)


class TransformerBlock(nn.Module):
    """Positional embedding, layer-scaled EPA, then a convolutional residual."""

    def __init__(self, tokens: int, dim: int, proj: int, heads: int, attn_dropout: float, conv_dropout: float,
                 conv_norm: str = "batch"):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        self.epa = EPA(tokens, dim, proj, heads, attn_dropout)
        self.conv = UnetResBlock(3, dim, dim, kernel_size=3, stride=1, norm_name=conv_norm)
        self.conv_out = nn.Sequential(nn.Dropout3d(conv_dropout), nn.Conv3d(dim, dim, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        t = x.flatten(2).transpose(1, 2) + self.pos_embed
        t = t + self.gamma * self.epa(self.norm(t))
        a = t.transpose(1, 2).reshape(b, c, d, h, w)
        return a + self.conv_out(self.conv(a))


def _transformer_stage(cfg: NetConfig, tokens: int, dim: int, proj: int, depth: int) -> nn.Sequential:
    return nn.Sequential(
        *(TransformerBlock(tokens, dim, proj, cfg.heads, cfg.attn_dropout, cfg.conv_dropout, cfg.conv_norm)
          for _ in range(depth))
    )


class Encoder(nn.Module):
    """Stem + three stride-2 downsamplings, each followed by EPA transformer blocks."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        d = cfg.dims
        self.down = nn.ModuleList(
            [nn.Sequential(get_conv_layer(3, 1, d[0], cfg.stem, cfg.stem, conv_only=True), nn.GroupNorm(1, d[0]))]
            + [
                nn.Sequential(get_conv_layer(3, d[i], d[i + 1], 2, 2, conv_only=True), nn.GroupNorm(d[i], d[i + 1]))
                for i in range(3)
            ]
        )
        self.stages = nn.ModuleList(
            _transformer_stage(cfg, cfg.tokens(i), d[i], cfg.proj[i], cfg.depths[i]) for i in range(4)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for down, stage in zip(self.down, self.stages):
            x = stage(down(x))
            feats.append(x)
        return feats


class UpBlock(nn.Module):
    """Transposed convolution, encoder skip added, then EPA blocks (or a residual conv block)."""

    def __init__(self, cfg: NetConfig, cin: int, cout: int, kernel, tokens: int | None):
        super().__init__()
        self.up = get_conv_layer(3, cin, cout, kernel, kernel, conv_only=True, is_transposed=True)
        if tokens is None:
            self.blocks = UnetResBlock(3, cout, cout, kernel_size=3, stride=1, norm_name="instance")
        else:
            self.blocks = _transformer_stage(cfg, tokens, cout, cfg.decoder_proj, cfg.decoder_depth)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.up(x) + skip)


class GUNETRpp(nn.Module):
    """Gradient-enhanced UNETR++ on fixed (1, Z, Y, X) tiles; returns logits (B, classes, Z, Y, X).

    In training mode with ``deep_supervision`` it returns [full, 1/2, 1/4]-resolution logits.
    """

    def __init__(self, cfg: NetConfig, deep_supervision: bool = True):
        super().__init__()
        self.cfg = cfg
        self.deep_supervision = deep_supervision
        d, fs = cfg.dims, cfg.feature_size
        self.encoders = nn.ModuleList(Encoder(cfg) for _ in range(3))  # CT, two mixed derivatives
        self.full_res_skip = UnetResBlock(3, 1, fs, kernel_size=3, stride=1, norm_name="instance")
        self.decoders = nn.ModuleList(
            [
                UpBlock(cfg, d[3], d[2], 2, cfg.tokens(2)),
                UpBlock(cfg, d[2], d[1], 2, cfg.tokens(1)),
                UpBlock(cfg, d[1], d[0], 2, cfg.tokens(0)),
                UpBlock(cfg, d[0], fs, cfg.stem, None),
            ]
        )
        self.head = UnetOutBlock(3, fs, cfg.classes)
        self.ds_heads = nn.ModuleList([UnetOutBlock(3, d[0], cfg.classes), UnetOutBlock(3, d[1], cfg.classes)])

    def forward(self, x: torch.Tensor):
        if tuple(x.shape[1:]) != (1, *self.cfg.tile):
            raise ValueError(f"G-UNETR++ takes tiles of shape (B, 1, {self.cfg.tile}), got {tuple(x.shape)}")
        with torch.no_grad():
            dxz, dyz = mixed_second_derivatives(x, self.cfg.hessian_axis)
        feats = [sum(parts) for parts in zip(*(enc(inp) for enc, inp in zip(self.encoders, (x, dxz, dyz))))]
        quarter = self.decoders[0](feats[3], feats[2])
        half = self.decoders[1](quarter, feats[1])
        stem_res = self.decoders[2](half, feats[0])
        full = self.decoders[3](stem_res, self.full_res_skip(x))
        logits = self.head(full)
        if self.training and self.deep_supervision:
            return [logits, self.ds_heads[0](stem_res), self.ds_heads[1](half)]
        return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, batch: int = 1) -> float:
    """Multiply-accumulates of one forward pass (convolutions, linear layers, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 1, *model.cfg.tile)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2
