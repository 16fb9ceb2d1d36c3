"""G-UNETR++: size of the paper configuration, shapes, derivative inputs, batch independence."""

import dataclasses

import pytest
import torch

from LiverTumorSegLib.netconfig import PAPER, SMALL, NetConfig
from LiverTumorSegLib.network import GUNETRpp, count_macs, count_parameters, mixed_second_derivatives


def test_paper_config_matches_published_size():
    net = GUNETRpp(PAPER)
    params = count_parameters(net)
    assert abs(params / 97.7e6 - 1) < 0.01, params
    macs = count_macs(net)
    assert abs(macs / 73.0e9 - 1) < 0.03, macs


def test_paper_parameters_split_as_documented():
    net = GUNETRpp(PAPER)
    pos = sum(p.numel() for n, p in net.named_parameters() if n.endswith("pos_embed"))
    one_encoder = count_parameters(net.encoders[0])
    assert abs(pos / 16.7e6 - 1) < 0.01
    assert abs(one_encoder / 27.39e6 - 1) < 0.01


@pytest.mark.parametrize("cfg", [SMALL, PAPER], ids=["small", "paper"])
def test_output_shapes(cfg):
    net = GUNETRpp(cfg)
    x = torch.rand(1, 1, *cfg.tile)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (1, cfg.classes, *cfg.tile)
    if cfg is SMALL:  # deep supervision heads: full, (1/2, 1/4, 1/4), (1/4, 1/8, 1/8)
        net.train()
        outs = net(torch.rand(2, 1, *cfg.tile))
        z, y, x_ = cfg.tile
        assert [tuple(o.shape) for o in outs] == [(2, 2, z, y, x_), (2, 2, z // 2, y // 4, x_ // 4), (2, 2, z // 4, y // 8, x_ // 8)]


def test_wrong_tile_size_is_refused():
    net = GUNETRpp(SMALL).eval()
    with pytest.raises(ValueError, match="tiles of shape"):
        net(torch.rand(1, 1, 16, 64, 64))


def _grid(shape):
    return torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij")


def test_mixed_derivatives_exact_on_analytic_volume():
    z, y, x = _grid((6, 7, 8))
    vol = torch.stack([x * z, 3 * y * z]).unsqueeze(1)  # two samples
    dxz, dyz = mixed_second_derivatives(vol, axis=0)
    assert torch.allclose(dxz[0], torch.ones_like(dxz[0])) and torch.allclose(dyz[0], torch.zeros_like(dyz[0]))
    assert torch.allclose(dxz[1], torch.zeros_like(dxz[1])) and torch.allclose(dyz[1], 3 * torch.ones_like(dyz[1]))


def test_authors_axis_convention():
    z, y, x = _grid((6, 7, 8))
    vol = (2 * z * x + 5 * y * x + z * y).reshape(1, 1, 6, 7, 8)
    dzx, dyx = mixed_second_derivatives(vol, axis=2)  # shared axis = tensor dim 2 (x)
    assert torch.allclose(dzx, torch.full_like(dzx, 2.0)) and torch.allclose(dyx, torch.full_like(dyx, 5.0))


def test_derivatives_are_per_sample_inside_forward():
    """The authors' code used sample 0's derivatives for the whole batch; ours must not."""
    torch.manual_seed(0)
    net = GUNETRpp(SMALL).eval()
    with torch.no_grad():
        for p in net.parameters():  # make the gradient encoders matter
            p.add_(torch.randn_like(p) * 0.05)
    a, b = torch.rand(1, 1, *SMALL.tile), torch.rand(1, 1, *SMALL.tile) ** 3
    with torch.no_grad():
        both = net(torch.cat([a, b]))
        assert torch.allclose(both[0], net(a)[0], atol=1e-4)
        assert torch.allclose(both[1], net(b)[0], atol=1e-4)


def test_config_round_trip_and_validation():
    assert NetConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError):
        dataclasses.replace(SMALL, tile=(30, 64, 64))
    with pytest.raises(ValueError):
        NetConfig.from_dict({**SMALL.to_dict(), "bogus": 1})
