"""Gaussian-weighted sliding-window inference over fixed-size tiles, with batching and cancel.

Our own loop rather than ``monai.inferers.sliding_window_inference``: we need nnU-Net's evenly
spread steps, a progress callback and a cancel check between tile batches, and a retry that
moves the accumulators to the CPU (then halves the batch) on GPU out-of-memory.
"""

from __future__ import annotations

import contextlib
import itertools
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .devices import is_out_of_memory
from .errors import Cancelled, LiverTumorSegError

ProgressFn = Callable[[int, int], None]


@lru_cache(maxsize=8)
def gaussian_importance(tile: tuple[int, ...], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Gaussian weight map over a tile (sigma = tile * sigma_scale), max 1, no zeros."""
    delta = np.zeros(tile, dtype=np.float32)
    delta[tuple(t // 2 for t in tile)] = 1
    g = gaussian_filter(delta, [t * sigma_scale for t in tile], mode="constant", cval=0)
    g /= g.max()
    g[g == 0] = g[g > 0].min()
    return g


def window_starts(size: int, tile: int, step: float) -> list[int]:
    """Tile start indices covering ``size`` with steps of about ``tile * step``, evenly spread."""
    if size <= tile:
        return [0]
    n = int(np.ceil((size - tile) / (tile * step))) + 1
    return [int(round(i * (size - tile) / (n - 1))) for i in range(n)]


def tile_origins(shape: tuple[int, int, int], tile: tuple[int, int, int], step: float) -> list[tuple[int, int, int]]:
    return list(itertools.product(*(window_starts(s, t, step) for s, t in zip(shape, tile))))


def count_tiles(shape, tile, step) -> int:
    return int(np.prod([len(window_starts(max(s, t), t, step)) for s, t in zip(shape, tile)]))


def check_cancel(cancel) -> None:
    if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
        raise Cancelled("Cancelled by the user.")


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def mirror_sets(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every combination of flips of ``axes`` (spatial 0 = z, 1 = y, 2 = x), no flip first."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(sorted(set(axes)), r)]


def _softmax(net, x, mirrors) -> torch.Tensor:
    """Class probabilities of a batch, averaged over the mirrored copies (each flipped back)."""
    total = None
    for flips in mirrors:
        dims = [a + 2 for a in flips]
        p = torch.softmax(net(torch.flip(x, dims) if dims else x).float(), dim=1)
        p = torch.flip(p, dims) if dims else p
        total = p if total is None else total + p
    return total / len(mirrors)


def _predict(net, image, tile, step, batch, device, accum_device, amp_dtype, progress, cancel, mirrors) -> torch.Tensor:
    origins = tile_origins(tuple(image.shape), tile, step)
    classes = net.cfg.classes
    image = image.to(device)
    probs = torch.zeros((classes, *image.shape), dtype=torch.float32, device=accum_device)
    weights = torch.zeros(image.shape, dtype=torch.float32, device=accum_device)
    gauss = torch.from_numpy(gaussian_importance(tuple(tile))).to(accum_device)
    for done in range(0, len(origins), batch):
        check_cancel(cancel)
        slices = [tuple(slice(o, o + t) for o, t in zip(origin, tile)) for origin in origins[done : done + batch]]
        x = torch.stack([image[s] for s in slices]).unsqueeze(1)
        with _autocast(device, amp_dtype):
            out = _softmax(net, x, mirrors).to(accum_device)
        for s, p in zip(slices, out):
            probs[(slice(None), *s)] += p * gauss
            weights[s] += gauss
        if progress is not None:
            progress(min(done + batch, len(origins)), len(origins))
    probs /= weights
    return probs


@torch.inference_mode()
def sliding_window_probabilities(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    step: float = 0.5,
    batch: int = 2,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    mirror_axes: tuple[int, ...] = (),
    progress: ProgressFn | None = None,
    cancel=None,
) -> np.ndarray:
    """Class probabilities (C, Z, Y, X) float32 of ``net`` over ``image`` (Z, Y, X), normalised.

    ``mirror_axes``: test-time augmentation; each tile also runs flipped along every combination
    of these axes (2**n passes) and the probabilities are averaged.

    Volumes smaller than a tile are padded with 0 (the normalised background) and cropped back.
    On out-of-memory the accumulators move to the CPU, then the batch halves down to 1.
    """
    if int(batch) < 1:
        raise ValueError(f"batch must be 1 or more, not {batch}")
    device = torch.device(device)
    tile = tuple(net.cfg.tile)
    shape = image.shape
    pad = [(0, max(t - s, 0)) for s, t in zip(shape, tile)]
    img = torch.from_numpy(np.pad(np.asarray(image, np.float32), pad, constant_values=0))
    attempts = [(device, batch)] if device.type == "cpu" else [(device, batch), (torch.device("cpu"), batch)]
    b = batch
    while b > 1:
        b //= 2
        attempts.append((torch.device("cpu"), b))
    failure = ""
    for accum_device, b in attempts:
        try:
            probs = _predict(net, img, tile, step, b, device, accum_device, amp_dtype, progress, cancel,
                                 mirror_sets(mirror_axes))
            return probs[(slice(None), *(slice(0, s) for s in shape))].cpu().numpy()
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(err):
                raise
            failure = str(err).splitlines()[0]  # keep no reference to the failed attempt's tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
    raise LiverTumorSegError(
        f"Out of memory on {device} even with batch 1 and CPU accumulators ({failure}). "
        + ("Close other programs using the GPU, or run with --device cpu." if device.type == "cuda"
           else "Close other programs, or use a machine with more memory.")
    )
