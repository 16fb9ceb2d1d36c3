"""Minimal trainer: sample building as inference does it, foreground oversampling, a loss that learns."""

import numpy as np
import torch

from LiverTumorSegLib.netconfig import SMALL
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.pipeline import tumor_stage_input
from LiverTumorSegLib.orientation import to_canonical
from LiverTumorSegLib.trainer import DEFAULT_PREPROCESSING, PatchSampler, TrainConfig, build_sample, train


def test_tumor_samples_are_built_like_inference_input():
    ct, lab = generate_case(3001, spacing=(1.5, 1.5, 4.0), matrix=240)
    img, target = build_sample(ct, lab, "tumor", DEFAULT_PREPROCESSING["tumor"])
    hu, spacing, ro = to_canonical(ct)
    expected, mask, _ = tumor_stage_input(hu, ro.to_canonical(lab.array) > 0, spacing, DEFAULT_PREPROCESSING["tumor"])
    assert np.array_equal(img, expected)
    assert target.shape == img.shape and not target[~mask].any()
    assert set(np.unique(target)) <= {0, 1}


def test_foreground_oversampling():
    img = np.zeros((40, 80, 80), np.float32)
    tgt = np.zeros((40, 80, 80), np.uint8)
    tgt[30:34, 70:74, 5:9] = 1  # a small object in a corner
    always = PatchSampler([(img, tgt)], SMALL.tile, 1.0, np.random.default_rng(0))
    never = PatchSampler([(img, tgt)], SMALL.tile, 0.0, np.random.default_rng(0))
    hits = lambda s: np.mean([s.patch()[1].any() for _ in range(40)])  # noqa: E731
    assert hits(always) == 1.0 and hits(always) > hits(never)


def test_training_reduces_the_loss():
    rng = np.random.default_rng(0)
    img = rng.normal(0.3, 0.05, (32, 64, 64)).astype(np.float32)
    tgt = np.zeros(img.shape, np.uint8)
    tgt[8:24, 16:48, 16:48] = 1
    img[tgt > 0] += 0.4
    cfg = TrainConfig(stage="liver", net=SMALL, preprocessing={}, steps=30, batch=2, lr=2e-3, log_every=10)
    torch.manual_seed(0)
    train([(img, tgt)], cfg)
    assert cfg.history[-1]["loss"] < 0.7 * cfg.history[0]["loss"]
