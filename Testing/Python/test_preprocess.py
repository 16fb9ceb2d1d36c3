"""Preprocessing: HU scaling, model grids of both resampling modes, lean resize, label-aware resize."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from LiverTumorSegLib import preprocess
from LiverTumorSegLib.preprocess import model_shape, resize, resize_labels, scale_hu


def test_scale_hu_clips_and_scales():
    out = scale_hu(np.array([-1000, -250, 0, 250, 3000], np.int16))
    assert out.dtype == np.float32 and np.allclose(out, [0, 0, 0.5, 1, 1])


def test_model_shape_modes():
    spacing = (2.5, 0.7, 0.7)
    assert model_shape((200, 512, 512), spacing, {"mode": "spacing", "spacing": [5.0, 1.4, 1.4]}) == (100, 256, 256)
    paper = {"mode": "inplane_size", "size": 256}
    assert model_shape((200, 512, 512), spacing, paper) == (200, 256, 256)
    # a crop of the same image is scaled by the full image's factor, not squeezed to 256
    assert model_shape((80, 200, 160), spacing, paper, full_shape=(200, 512, 512)) == (80, 100, 80)
    with pytest.raises(ValueError, match="resampling mode"):
        model_shape((8, 8, 8), spacing, {"mode": "bogus"})


@pytest.mark.parametrize("src,dst", [((40, 100, 90), (20, 50, 60)), ((20, 50, 60), (40, 100, 90)), ((30, 64, 64), (50, 40, 80))])
def test_chunked_resize_equals_trilinear(monkeypatch, src, dst):
    monkeypatch.setattr(preprocess, "CHUNK_SLICES_VOXELS", 3000)  # force many chunks
    a = np.random.default_rng(0).normal(0, 100, src).astype(np.int16)
    ref = F.interpolate(torch.from_numpy(a.astype(np.float32))[None, None], size=dst, mode="trilinear", align_corners=False)[0, 0]
    assert np.allclose(resize(a, dst), ref.numpy(), atol=1e-3)
    p = np.random.default_rng(1).random(src, dtype=np.float32)
    ref_p = F.interpolate(torch.from_numpy(p)[None, None], size=dst, mode="trilinear", align_corners=False)[0, 0].numpy()
    u8 = resize(p, dst, dtype=np.uint8, scale=255.0)
    assert u8.dtype == np.uint8 and np.abs(u8.astype(int) - ref_p * 255).max() <= 0.5 + 1e-3


def test_label_aware_resize_keeps_small_classes_and_values():
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[5:15, 10:30, 10:30] = 1
    labels[8:12, 16:24, 16:24] = 2
    out = resize_labels(labels, (10, 20, 20))
    assert set(np.unique(out)) == {0, 1, 2}  # never an in-between value such as 1 from (0 + 2) / 2
    back = resize_labels(out, labels.shape)
    assert (back == labels).mean() > 0.97
