"""Sliding-window inference: single-pass equivalence, steps, OOM fallback, cancel, progress."""

import threading

import numpy as np
import pytest
import torch

from LiverTumorSegLib.errors import Cancelled
from LiverTumorSegLib.netconfig import SMALL
from LiverTumorSegLib.network import GUNETRpp
from LiverTumorSegLib.slidingwindow import (count_tiles, gaussian_importance, mirror_sets, sliding_window_probabilities,
                                            window_starts)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    return GUNETRpp(SMALL).eval()


def _single_pass(net, img):
    with torch.no_grad():
        return torch.softmax(net(torch.from_numpy(img)[None, None]), 1)[0].numpy()


def test_one_tile_equals_single_pass(net):
    img = np.random.default_rng(0).random(SMALL.tile, dtype=np.float32)
    assert np.allclose(sliding_window_probabilities(net, img), _single_pass(net, img), atol=1e-5)


def test_mirroring_averages_the_flipped_passes(net):
    img = np.random.default_rng(2).random(SMALL.tile, dtype=np.float32)
    by_hand = np.mean([np.flip(_single_pass(net, np.ascontiguousarray(np.flip(img, flips))), [a + 1 for a in flips])
                       for flips in [(), (1,), (2,), (1, 2)]], axis=0)
    out = sliding_window_probabilities(net, img, mirror_axes=(2, 1))
    assert np.allclose(out, by_hand, atol=1e-5)
    assert not np.allclose(out, _single_pass(net, img), atol=1e-3)  # the flips do change the result
    assert mirror_sets((0, 1, 2))[0] == () and len(mirror_sets((0, 1, 2))) == 8


def test_small_volume_is_padded_then_cropped(net):
    img = np.random.default_rng(1).random((20, 50, 60), dtype=np.float32)
    padded = np.zeros(SMALL.tile, np.float32)
    padded[:20, :50, :60] = img
    out = sliding_window_probabilities(net, img)
    assert out.shape == (2, 20, 50, 60)
    assert np.allclose(out, _single_pass(net, padded)[:, :20, :50, :60], atol=1e-5)


@pytest.mark.parametrize("size,tile,step", [(100, 64, 0.5), (64, 64, 0.5), (200, 64, 1.0), (65, 64, 0.5), (300, 32, 0.25)])
def test_window_starts_cover_evenly(size, tile, step):
    starts = window_starts(size, tile, step)
    assert starts[0] == 0 and starts[-1] == max(size - tile, 0)
    gaps = np.diff(starts)
    assert np.all(gaps <= tile * step + 1) and (len(gaps) == 0 or gaps.max() - gaps.min() <= 1)


def test_gaussian_importance():
    g = gaussian_importance((8, 16, 16))
    assert g.max() == 1 and g.min() > 0 and g[4, 8, 8] == 1


class _OomAboveBatchOne(torch.nn.Module):
    """Stands in for a network whose memory only fits one tile at a time."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cfg, self.calls = inner, inner.cfg, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_falls_back_to_smaller_batches(net):
    img = np.random.default_rng(2).random((40, 80, 80), dtype=np.float32)
    expected = sliding_window_probabilities(net, img, batch=1)
    flaky = _OomAboveBatchOne(net)
    out = sliding_window_probabilities(flaky, img, batch=4)
    assert np.allclose(out, expected, atol=1e-5)
    assert flaky.calls[0] == 4 and flaky.calls[-1] == 1


def test_cancel_and_progress(net):
    img = np.zeros((40, 100, 100), np.float32)
    seen = []
    sliding_window_probabilities(net, img, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] == count_tiles(img.shape, SMALL.tile, 0.5)
    event = threading.Event()

    def cancel_after_first(done, total):
        event.set()

    with pytest.raises(Cancelled):
        sliding_window_probabilities(net, img, progress=cancel_after_first, cancel=event)


def test_a_batch_under_one_is_refused(net):
    with pytest.raises(ValueError, match="batch"):  # it ran no tile and returned 0/0 = NaN everywhere
        sliding_window_probabilities(net, np.zeros((8, 16, 16), np.float32), batch=0)
