"""The pyliverlesionseg U-Nets ported to PyTorch: each layer type against hand-computed values in
Keras' conventions, the sizes and parameter counts of both networks, and weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from LiverTumorSegLib.kulunet import LESION, LIVER, Block, KULUNet, centre_crop, instance_norm, load_keras_weights


def test_instance_norm_adds_epsilon_to_the_population_std():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).reshape(1, 1, 4, 1, 1)
    mean, std = 3.0, np.sqrt(((np.array([1, 2, 3, 6]) - 3.0) ** 2).mean())  # population std = 1.8708
    expected = (np.array([1, 2, 3, 6]) - mean) / (std + 1e-7)
    np.testing.assert_allclose(instance_norm(x).flatten().numpy(), expected, rtol=1e-6)
    # per sample and per channel
    two = torch.stack([x[0], 10 * x[0] + 5])[:, :, :, :, :]
    np.testing.assert_allclose(instance_norm(two)[1].flatten().numpy(), expected, rtol=1e-5)
    # a constant patch: (x - mean) / 1e-7 = 0, not NaN
    assert torch.equal(instance_norm(torch.full((1, 1, 2, 2, 2), 0.5)), torch.zeros(1, 1, 2, 2, 2))


def test_keras_kernel_layout_is_cross_correlation_on_x_y_z():
    """A Keras Conv3D kernel (kx, ky, kz, in, out) applied as Keras does ('valid' cross-correlation)."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 5, 3)).astype(np.float32)  # (x, y, z), one channel
    kernel = rng.normal(size=(3, 3, 1, 1, 2)).astype(np.float32)  # an in-plane 3x3x1 kernel, 2 filters
    bias = np.array([0.5, -1.0], np.float32)
    by_hand = np.zeros((2, 2, 3, 3), np.float32)
    for o in range(2):
        for x in range(2):
            for y in range(3):
                for z in range(3):
                    by_hand[o, x, y, z] = (image[x:x + 3, y:y + 3, z] * kernel[:, :, 0, 0, o]).sum() + bias[o]
    block = Block(1, (2,), ((3, 3, 1),), "valid", residual=False, first=True)
    conv = block.convs[0]
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel).permute(4, 3, 0, 1, 2))
        conv.bias.copy_(torch.from_numpy(bias))
        out = block(torch.from_numpy(image)[None, None])[0].numpy()
    np.testing.assert_allclose(out, by_hand, rtol=1e-5, atol=1e-5)


def test_same_padding_is_symmetric_zero_padding_for_odd_kernels():
    block = Block(1, (1,), ((3, 3, 1),), "same", residual=False, first=True)
    with torch.no_grad():
        block.convs[0].weight.fill_(1.0)
        block.convs[0].bias.zero_()
        out = block(torch.ones(1, 1, 4, 4, 2))[0, 0]
    assert tuple(out.shape) == (4, 4, 2)
    assert out[0, 0, 0] == 4 and out[1, 1, 1] == 9 and out[0, 1, 0] == 6  # corner, inside, edge: zeros outside


def test_first_convolution_sees_the_raw_input_later_ones_norm_and_leaky_relu():
    block = Block(1, (1, 1), ((1, 1, 1), (1, 1, 1)), "valid", residual=False, first=True)
    with torch.no_grad():
        for conv in block.convs:
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    x = torch.tensor([-4.0, 0.0, 1.0, 3.0]).reshape(1, 1, 4, 1, 1)
    expected = F.leaky_relu(instance_norm(x), 0.01)  # conv 1 is identity on the raw input
    torch.testing.assert_close(block(x), expected)
    assert expected.flatten()[0] == pytest.approx(0.01 * (-4 - 0) / (np.sqrt(6.5) + 1e-7), rel=1e-5)


def test_linear_upsampling_equals_their_repeat_then_average_pool():
    """Keras: UpSampling3D(3) then AveragePooling3D(3, strides 1, 'valid') along each axis."""
    net = KULUNet(LIVER)
    x = torch.tensor([0.0, 3.0, 9.0]).reshape(1, 1, 3, 1, 1).expand(1, 1, 3, 2, 2).contiguous()
    repeated = np.repeat([0.0, 3.0, 9.0], 3)  # 0 0 0 3 3 3 9 9 9
    theirs = np.convolve(repeated, np.ones(3) / 3, mode="valid")  # 0 1 2 3 5 7 9
    ours = net._upsample(x)[0, 0, :, 0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert tuple(net._upsample(x).shape[2:]) == (7, 4, 4)


def test_copy_upsampling_repeats_and_crops_are_centred():
    net = KULUNet(LESION)
    x = torch.arange(4.0).reshape(1, 1, 2, 2, 1)
    up = net._upsample(x)[0, 0, :, :, 0]
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    y = torch.arange(10.0).reshape(1, 1, 10, 1, 1)
    assert centre_crop(y, (6, 1, 1)).flatten().tolist() == [2, 3, 4, 5, 6, 7]


def test_residual_block_adds_the_cropped_input_through_a_one_by_one_convolution():
    block = Block(1, (2, 2), ((3, 3, 1), (3, 3, 3)), "valid", residual=True, first=True)
    with torch.no_grad():
        for conv in block.convs:
            conv.weight.zero_()
            conv.bias.zero_()
        block.shortcut.weight.fill_(2.0)
        block.shortcut.bias.fill_(1.0)
    x = torch.arange(7 * 7 * 5, dtype=torch.float32).reshape(1, 1, 7, 7, 5)
    out = block(x)
    assert tuple(out.shape[2:]) == (3, 3, 3)  # (3,3,1) then (3,3,3) 'valid': -4, -4, -2
    torch.testing.assert_close(out[0, 0], 2 * x[0, 0, 2:5, 2:5, 1:4] + 1)


@pytest.mark.parametrize("cfg, params", [(LIVER, 3_874_961), (LESION, 3_464_221)])
def test_networks_have_the_published_size_and_patch_geometry(cfg, params):
    net = KULUNet(cfg).eval()
    assert sum(p.numel() for p in net.parameters()) == params
    small_in = (27 * 2, 27 * 2, 27 * 2) if cfg is LIVER else (100, 100, 54)
    with torch.no_grad():
        out = net(torch.randn(1, 1, *small_in))
    expected = tuple(n - 26 for n in small_in) if cfg is LIVER else (12, 12, 10)
    assert tuple(out.shape[2:]) == expected and 0 <= float(out.min()) and float(out.max()) <= 1
    assert tuple(np.array(cfg.patch_in) - np.array(cfg.patch_out)) == ((26, 26, 26) if cfg is LIVER else (88, 88, 44))


def test_weights_load_in_keras_creation_order_with_shape_checks():
    net = KULUNet(LESION)
    rng = np.random.default_rng(1)
    layers = {}
    for i, conv in enumerate(net.keras_order(), start=1):
        w = conv.weight.detach().numpy()
        layers[f"conv3d_{i}"] = (rng.normal(size=w.transpose(2, 3, 4, 1, 0).shape).astype(np.float32),
                                 rng.normal(size=conv.bias.shape).astype(np.float32))
    load_keras_weights(net, layers)
    torch.testing.assert_close(net.keras_order()[2].weight, torch.from_numpy(layers["conv3d_3"][0]).permute(4, 3, 0, 1, 2))
    assert net.keras_order()[2].weight.shape == (40, 1, 1, 1, 1)  # enc1 shortcut, as in their file
    broken = dict(layers)
    broken["conv3d_5"] = (broken["conv3d_5"][0][:, :, :2], broken["conv3d_5"][1])
    with pytest.raises(ValueError, match="conv3d_5"):
        load_keras_weights(net, broken)
    with pytest.raises(ValueError, match="needs"):
        load_keras_weights(net, {k: v for k, v in layers.items() if k != "conv3d_21"})


def test_resampling_is_pymircs_zoom3d_on_hand_computed_cases():
    from LiverTumorSegLib.kulpipeline import resample, zoom_weights

    # up x2: centres at -0.25, 0.25, 0.75, 1.25 of the input; neighbours outside count 0 (edges darken)
    assert np.allclose(zoom_weights(2, 2.0) @ np.array([1.0, 2.0]), [0.75, 1.25, 1.75, 1.5])
    # down x0.5: means of pairs; a partial edge bin stays under-filled
    assert np.allclose(zoom_weights(4, 0.5) @ np.array([1.0, 2.0, 3.0, 4.0]), [1.5, 3.5])
    assert np.allclose(zoom_weights(3, 0.5) @ np.ones(3), [0.75, 0.75])
    assert zoom_weights(129, 1.6 / 1.5).shape == (138, 129)  # ceil(n / (1 / zoom))
    # separable, one axis after the other; factor 1 leaves an axis alone
    rng = np.random.default_rng(0)
    vol = rng.random((5, 6, 7)).astype(np.float32)
    out = resample(vol, (2.0, 1.0, 1.5), (1.0, 1.0, 3.0))
    expected = np.einsum("ai,ck,ijk->ajc", zoom_weights(5, 2.0), zoom_weights(7, 0.5), vol)
    assert out.shape == (10, 6, 4) and np.allclose(out, expected, atol=1e-6)


def test_liver_net_creation_order_matches_their_weight_file():
    """Kernel shapes (Keras layout kx, ky, kz, in, out) of conv3d_1..15 as their HDF5 file stores them:
    an order written down from their file, not derived from ``keras_order``."""
    theirs = [(3, 3, 1, 1, 20), (3, 3, 3, 20, 40), (3, 3, 1, 40, 40), (3, 3, 3, 40, 80), (3, 3, 1, 80, 80),
              (3, 3, 3, 80, 160), (3, 3, 3, 160, 160), (3, 3, 3, 160, 160), (3, 3, 3, 320, 160), (3, 3, 1, 160, 80),
              (3, 3, 3, 160, 80), (3, 3, 1, 80, 40), (3, 3, 3, 80, 40), (3, 3, 1, 40, 20), (1, 1, 1, 20, 1)]
    ours = [tuple(c.weight.permute(2, 3, 4, 1, 0).shape) for c in KULUNet(LIVER).keras_order()]
    assert ours == theirs


def test_out_of_memory_in_an_imported_network_gives_advice(monkeypatch):
    """One patch has nothing smaller to retry: the message names the device and what to do."""
    from LiverTumorSegLib import kulpipeline
    from LiverTumorSegLib.errors import LiverTumorSegError

    net = KULUNet(LESION).eval()

    def exhausted(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(KULUNet, "forward", exhausted)
    with pytest.raises(LiverTumorSegError, match=r"Out of memory on cpu .* \(100, 100, 54\) patch .*more memory"):
        kulpipeline._run(net, np.zeros((100, 100, 54), np.float32))
    monkeypatch.setattr(KULUNet, "forward", lambda self, x: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # any other failure is not dressed up as memory
        kulpipeline._run(net, np.zeros((100, 100, 54), np.float32))
