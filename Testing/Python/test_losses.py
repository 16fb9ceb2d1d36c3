"""Losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from LiverTumorSegLib.losses import (
    DS_WEIGHTS,
    LOSS_CONFIGS,
    StageLoss,
    cross_entropy,
    focal_loss,
    godc_loss,
    hausdorff_dt_loss,
    soft_dice_loss,
)

S = 1e-5  # default smoothing


def logits_for(probs, shape):
    """Two-class logits (background 0) whose foreground softmax is ``probs``, batch-major."""
    fg = torch.tensor([math.log(p / (1 - p)) for p in probs], dtype=torch.float64)
    return torch.stack([torch.zeros_like(fg), fg]).reshape(2, shape[0], *shape[1:]).transpose(0, 1).contiguous()


def target_of(labels, shape):
    return torch.tensor(labels, dtype=torch.int64).reshape(shape[0], 1, *shape[1:])


P1, G1 = [0.9, 0.2, 0.6, 0.3], [1, 0, 1, 1]
SHAPE = (1, 1, 2, 2)
LOGITS, TARGET = logits_for(P1, SHAPE), target_of(G1, SHAPE)
PT = [0.9, 0.8, 0.6, 0.3]  # probability of the true class


def test_soft_dice_sums_over_batch():
    p2, g2 = [0.1] * 4, [0] * 4  # second sample: empty target
    logits = logits_for(P1 + p2, (2, 1, 2, 2))
    target = target_of(G1 + g2, (2, 1, 2, 2))
    inter, psum, gsum = 0.9 + 0.6 + 0.3, sum(P1) + sum(p2), 3
    expected = 1 - (2 * inter + S) / (psum + gsum + S)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-9)


def test_cross_entropy_by_hand():
    expected = -sum(math.log(p) for p in PT) / 4
    assert cross_entropy(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-9)


def test_focal_by_hand():
    alpha_t = [0.25 if g else 0.75 for g in G1]
    expected = -sum(a * (1 - p) ** 2 * math.log(p) for a, p in zip(alpha_t, PT)) / 4
    assert focal_loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-9)


def test_focal_gamma0_alpha_none_is_cross_entropy():
    logits, target = torch.randn(2, 2, 3, 3, 3), torch.randint(0, 2, (2, 1, 3, 3, 3))
    expected = cross_entropy(logits, target).item()
    assert focal_loss(logits, target, alpha=None, gamma=0.0).item() == pytest.approx(expected, rel=1e-6)


def test_godc_by_hand():
    p2, g2 = [0.1] * 4, [0] * 4
    logits = logits_for(P1 + p2, (2, 1, 2, 2)).requires_grad_()
    loss = godc_loss(logits, target_of(G1 + g2, (2, 1, 2, 2)))
    i1, u1 = 1.8, sum(P1) + 3 - 1.8
    i2, u2 = 0.0, sum(p2)
    dc1, dc2 = (2 * i1 + S) / (i1 + u1 + S), (2 * i2 + S) / (i2 + u2 + S)
    mean_u = (u1 + u2) / 2
    expected = ((1 - dc1) * u1 / mean_u + (1 - dc2) * u2 / mean_u) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_godc_union_scale_is_detached():
    """The gradient is the per-sample Dice-loss gradient times the constant U_b / mean(U)."""
    logits = torch.randn(2, 2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 2, (2, 1, 2, 3, 3))
    godc_loss(logits, target).backward()
    p = torch.softmax(logits, 1)[:, 1:]
    g = target.double()
    inter, union = (p * g).sum((1, 2, 3, 4)), (p + g - p * g).sum((1, 2, 3, 4))
    scale = (union / union.mean()).detach()
    dice = (2 * inter + S) / (inter + union + S)
    (reference,) = torch.autograd.grad(((1 - dice) * scale).mean(), logits)
    assert torch.allclose(logits.grad, reference)


HD_PROBS, HD_TARGET = [0.2, 0.6, 0.7, 0.4], [0, 0, 1, 1]


def test_hd_by_hand():
    # prediction mask [0 1 1 0]: d_p = [1 1 1 1]; target [0 0 1 1]: d_q = [2 1 1 2] (voxel-centre EDT)
    logits = logits_for(HD_PROBS, (1, 1, 1, 4))
    d_p, d_q = [1, 1, 1, 1], [2, 1, 1, 2]
    expected = sum((p - q) ** 2 * (a**2 + b**2) for p, q, a, b in zip(HD_PROBS, HD_TARGET, d_p, d_q)) / 4
    assert expected == pytest.approx(0.725)
    assert hausdorff_dt_loss(logits, target_of(HD_TARGET, (1, 1, 1, 4))).item() == pytest.approx(expected, rel=1e-6)


def test_hd_has_gradient():
    logits = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64)
    target[..., 1:3, 1:3, 1:3] = 1
    hausdorff_dt_loss(logits, target).backward()
    assert logits.grad.abs().sum() > 0


def test_hd_zero_for_confident_perfect_prediction():
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64)
    target[..., 1:3, 1:3, 1:3] = 1
    sign = 2.0 * target - 1  # +1 inside, -1 outside
    logits = torch.cat([-10 * sign, 10 * sign], 1)
    assert hausdorff_dt_loss(logits, target).item() < 1e-12


def test_hd_zero_when_both_masks_empty():
    """Empty (or full) masks have no boundary: both distance maps are 0, whatever p below 0.5."""
    logits = torch.zeros(1, 2, 3, 3, 3)
    logits[:, 1] = -0.2
    assert hausdorff_dt_loss(logits, torch.zeros(1, 1, 3, 3, 3, dtype=torch.int64)).item() == 0.0


HD_LOGITS = logits_for(HD_PROBS, (1, 1, 1, 4))
HD_TGT = target_of(HD_TARGET, (1, 1, 1, 4))


@pytest.mark.parametrize("epoch, ramp", [(0, 0.0), (25, 0.5), (50, 1.0), (80, 1.0)])
def test_stage_loss_hd_ramp(epoch, ramp):
    cfg = LOSS_CONFIGS["tumor"]
    base = soft_dice_loss(HD_LOGITS, HD_TGT) + focal_loss(HD_LOGITS, HD_TGT, 0.25, 2.0)
    expected = base + ramp * cfg["hd"] * hausdorff_dt_loss(HD_LOGITS, HD_TGT)
    assert cfg["hd_ramp_epochs"] == 50 and cfg["hd"] > 0
    assert StageLoss(cfg)(HD_LOGITS, HD_TGT, epoch).item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("epoch, ramp", [(0, 0.0), (80, 1.0)])
def test_stage_loss_liver_terms(epoch, ramp):
    expected = (soft_dice_loss(HD_LOGITS, HD_TGT) + cross_entropy(HD_LOGITS, HD_TGT)
                + ramp * 0.1 * hausdorff_dt_loss(HD_LOGITS, HD_TGT))
    assert hausdorff_dt_loss(HD_LOGITS, HD_TGT).item() > 0.01  # the HD term counts at full ramp
    assert StageLoss(LOSS_CONFIGS["liver"])(HD_LOGITS, HD_TGT, epoch).item() == pytest.approx(expected.item(), rel=1e-9)


def test_stage_loss_godc_option():
    loss = StageLoss({"godc": 2.0})
    assert loss(LOGITS, TARGET, 0).item() == pytest.approx(2 * godc_loss(LOGITS, TARGET).item(), rel=1e-9)


def test_stage_loss_deep_supervision_weighting():
    torch.manual_seed(0)
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64)
    target[..., 1:4, 0:3, 1:3] = 1
    outputs = [torch.randn(1, 2, n, n, n) for n in (4, 2, 1)]
    loss = StageLoss(LOSS_CONFIGS["liver"])
    targets = [target, target[..., ::2, ::2, ::2], target[..., ::4, ::4, ::4]]

    def liver_terms(o, t):  # Dice + CE + 0.1 HD at full ramp, from the terms checked by hand above
        return soft_dice_loss(o, t) + cross_entropy(o, t) + 0.1 * hausdorff_dt_loss(o, t)

    expected = 4 / 7 * liver_terms(outputs[0], targets[0]) + 2 / 7 * liver_terms(outputs[1], targets[1]) \
        + 1 / 7 * liver_terms(outputs[2], targets[2])
    assert DS_WEIGHTS == pytest.approx((4 / 7, 2 / 7, 1 / 7))
    assert loss(outputs, target, 50).item() == pytest.approx(expected.item(), rel=1e-6)


def test_stage_loss_rejects_unknown_settings():
    with pytest.raises(ValueError, match="hd_weight"):
        StageLoss({"hd_weight": 0.1})
