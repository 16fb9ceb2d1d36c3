"""The training recipe: samples as inference builds them, augmentation, configs, exact resume,
two-process data parallelism, and train + evaluate end to end on tiny phantoms."""

from __future__ import annotations

import dataclasses
import shutil
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from LiverTumorSegLib.augment import Augmenter
from LiverTumorSegLib.cli import main
from LiverTumorSegLib.datasets import gather_cases, load_case
from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.imageio import read_labels, write_labels, write_volume
from LiverTumorSegLib.modelfile import load_model
from LiverTumorSegLib.netconfig import SMALL
from LiverTumorSegLib.orientation import to_canonical
from LiverTumorSegLib.phantom import generate_case
from LiverTumorSegLib.pipeline import tumor_stage_input
from LiverTumorSegLib.postprocess import PostParams
from LiverTumorSegLib.registry import model_files
from LiverTumorSegLib.samplecache import predicted_liver, prepared_samples
from LiverTumorSegLib.trainconfig import bundled_configs, check_config, load_config, stage_recipe
from LiverTumorSegLib.trainer import PatchSampler, Sample, StageTrainer, build_sample

TINY_NET = {"tile": [16, 32, 32], "dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "decoder_depth": 1,
            "proj": [8, 8, 8, 8], "decoder_proj": 8, "attn_dropout": 0.0, "conv_dropout": 0.0}
TINY_PRE = {"liver": {"hu_window": [-250, 250], "resample": {"mode": "spacing", "spacing": [8.0, 5.0, 5.0]}},
            "tumor": {"hu_window": [-250, 250], "resample": {"mode": "spacing", "spacing": [4.0, 2.5, 2.5]},
                      "liver_margin_mm": 10.0}}
AUG = {"rotate90": 0.5, "mirror": 0.5, "scale": {"prob": 0.3, "min": 0.8, "max": 1.25},
       "intensity_shift": {"prob": 0.5, "max": 0.1}}


def tiny_config(**changes) -> dict:
    raw = {"net": TINY_NET, "epochs": 4, "iterations_per_epoch": 3, "batch": 2,
           "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 3e-5}, "val_every": 2, "split": [3, 1, 1],
           "augmentation": AUG, "preprocessing": TINY_PRE,
           "loss": {"liver": {"dice": 1.0, "ce": 1.0, "hd": 0.1, "hd_ramp_epochs": 2},
                    "tumor": {"dice": 1.0, "focal": 1.0, "hd": 0.1}}}
    return check_config({**raw, **changes})


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Five small phantom cases in the layout the phantom command writes."""
    folder = tmp_path_factory.mktemp("phantoms")
    for seed in range(1100, 1105):
        ct, labels = generate_case(seed, spacing=(2.5, 2.5, 5.0), matrix=128)
        write_volume(ct, folder / f"case_{seed}_ct.nii.gz")
        write_labels(labels.array, ct, folder / f"case_{seed}_label.nii.gz")
    return folder


def _blob_samples(n: int = 2) -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        img = rng.normal(0.3, 0.05, (24, 48, 48)).astype(np.float32)
        tgt = np.zeros(img.shape, np.uint8)
        tgt[6:18, 12:36, 10 + i:34 + i] = 1
        img[tgt > 0] += 0.4
        samples.append(Sample(f"blob{i}", img, tgt))
    return samples


# ---------------------------------------------------------------- samples and patches


def test_tumor_samples_are_built_like_inference_input(monkeypatch):
    """A stage-2 training sample built on stage 1's predicted liver is, voxel for voxel, the image
    ``segment`` hands the tumor network (captured there) for the same CT and models."""
    import LiverTumorSegLib.pipeline as pipeline

    ct, lab = generate_case(3001, spacing=(2.0, 2.0, 5.0), matrix=176)
    liver_model, tumor_model = (load_model(f) for f in model_files("phantom-small"))
    fed = []
    run_network = pipeline.sliding_window_probabilities

    def capture(net, img, **kw):
        fed.append(img.copy())
        return run_network(net, img, **kw)

    monkeypatch.setattr(pipeline, "sliding_window_probabilities", capture)
    pipeline.segment(ct, liver_model, tumor_model, device="cpu", tta=True)  # the CLI's and panel's default
    assert len(fed) == 2  # stage 1, then stage 2
    monkeypatch.undo()
    predicted = predicted_liver(ct, liver_model, "cpu")  # what train --liver-model builds on by default
    assert not np.array_equal(predicted, predicted_liver(ct, liver_model, "cpu", tta=False))  # mirroring matters here
    sample = build_sample(ct, lab, "tumor", tumor_model.card["preprocessing"], liver=predicted)
    assert sample.image.shape == fed[1].shape and np.array_equal(sample.image, fed[1])
    assert sample.target.shape == sample.image.shape and set(np.unique(sample.target)) <= {0, 1} and sample.target.any()


def _back_on_grid(target: np.ndarray, shape) -> np.ndarray:
    """A model-grid target brought back to a grid of ``shape`` (linear, 0.5): as inference maps probabilities."""
    from scipy.ndimage import zoom

    back = zoom(target.astype(np.float32), [n / m for n, m in zip(shape, target.shape)], order=1, mode="nearest", grid_mode=True)
    assert back.shape == tuple(shape)
    return back >= 0.5


def _covered(truth: np.ndarray, found: np.ndarray) -> float:
    return float((truth & found).sum() / truth.sum())


def test_stage_targets_lie_on_the_structures_they_teach():
    """Brought back to the CT's grid, the liver target covers the liver with its tumors and cysts,
    and the lesion target covers each tumor and each cyst and little else."""
    ct, lab = generate_case(3014, spacing=(1.5, 1.5, 4.0), matrix=240)
    pre = load_config("small")["preprocessing"]
    hu, spacing, reorient = to_canonical(ct)
    canon = reorient.to_canonical(lab.array)
    assert (canon == 2).any() and (canon == 3).any()
    liver = _back_on_grid(build_sample(ct, lab, "liver", pre["liver"]).target, canon.shape)
    assert _covered(canon == 1, liver) > 0.95 and _covered(canon >= 2, liver) > 0.95
    assert _covered(liver, canon > 0) > 0.9  # precision
    sample = build_sample(ct, lab, "tumor", pre["tumor"])
    box = tumor_stage_input(hu, canon > 0, spacing, pre["tumor"])[2]
    lesions = _back_on_grid(sample.target, canon[box].shape)
    for label in (2, 3):
        assert _covered(canon[box] == label, lesions) > 0.85, label
    assert _covered(lesions, canon[box] >= 2) > 0.85


def test_tumor_samples_can_follow_another_liver_mask():
    """Stage 2 may learn on stage 1's predicted liver: the crop, mask and target follow that mask,
    given on the CT's own grid (this phantom is flipped on all three axes)."""
    ct, lab = generate_case(3007, spacing=(1.5, 1.5, 4.0), matrix=240)
    pre = load_config("small")["preprocessing"]["tumor"]
    hu, spacing, ro = to_canonical(ct)
    assert not np.array_equal(ro.to_canonical(lab.array), lab.array)
    given = lab.array > 0
    lesion_rows = np.nonzero((lab.array >= 2).any(axis=(0, 2)))[0]
    given[:, : (lesion_rows.min() + lesion_rows.max()) // 2 + 1] = False  # cuts through the lesions
    sample = build_sample(ct, lab, "tumor", pre, liver=given)
    expected, mask, box = tumor_stage_input(hu, ro.to_canonical(given), spacing, pre)
    assert np.array_equal(sample.image, expected) and np.array_equal(sample.mask, mask)
    reference = build_sample(ct, lab, "tumor", pre)
    assert 0 < sample.target.sum() < reference.target.sum()
    kept = ro.to_canonical(lab.array)[box] >= 2
    assert _covered(_back_on_grid(sample.target, kept.shape), kept) > 0.85  # what is learnt are lesions, cut where the given liver ends
    assert build_sample(ct, lab, "tumor", pre, liver=np.zeros_like(given)) is None


def test_tumor_stage_skips_a_case_without_liver():
    ct, lab = generate_case(3001, spacing=(3.0, 3.0, 6.0), matrix=96)
    assert build_sample(ct, lab.with_array(np.zeros_like(lab.array)), "tumor", TINY_PRE["tumor"]) is None


def test_foreground_oversampling():
    img = np.zeros((40, 80, 80), np.float32)
    tgt = np.zeros((40, 80, 80), np.uint8)
    tgt[30:34, 70:74, 5:9] = 1  # a small object in a corner
    always = PatchSampler([Sample("a", img, tgt)], SMALL.tile, 1.0)
    never = PatchSampler([Sample("a", img, tgt)], SMALL.tile, 0.0)
    rng = np.random.default_rng(0)
    hits = lambda s: np.mean([s.patch(rng)[1].any() for _ in range(40)])  # noqa: E731
    assert hits(always) == 1.0 and hits(always) > hits(never)


def test_component_sampling_gives_small_lesions_their_share():
    img = np.zeros((64, 128, 128), np.float32)
    tgt = np.zeros((64, 128, 128), np.uint8)
    tgt[4:28, 4:60, 4:60] = 1  # a large lesion (75264 voxels)
    tgt[50:52, 110:112, 110:112] = 2  # a small one (8 voxels), far from it; 2 only to find it
    rng = np.random.default_rng(1)

    def share(mode):
        sampler = PatchSampler([Sample("a", img, tgt)], SMALL.tile, 1.0, mode)
        hits = 0
        for _ in range(200):
            hits += bool((sampler.patch(rng)[1] == 2).any())
        return hits / 200

    assert share("voxel") < 0.02
    assert 0.35 < share("component") < 0.65


def test_fg_sampling_is_checked():
    cfg = load_config("small")
    assert stage_recipe(cfg, "tumor").fg_sampling == "voxel"
    cfg["fg_sampling"] = {"liver": "voxel", "tumor": "component"}
    assert stage_recipe(check_config(cfg), "tumor").fg_sampling == "component"
    cfg["fg_sampling"] = "lesions"
    with pytest.raises(InputError, match="fg_sampling"):
        check_config(cfg)


def test_prepared_samples_are_cached_and_memory_mapped(phantoms, tmp_path):
    cases = gather_cases([phantoms])
    names = sorted(cases)[:2]
    cache = tmp_path / "cache"
    first = prepared_samples(names, cases, "tumor", TINY_PRE["tumor"], cache, build=True)
    for sample in first:
        ct, labels = load_case(cases[sample.name])
        fresh = build_sample(ct, labels, "tumor", TINY_PRE["tumor"], sample.name)
        assert isinstance(sample.image, np.memmap)
        for a in ("image", "target", "mask"):
            assert np.array_equal(getattr(sample, a), getattr(fresh, a)), a
    stamp = (cache / names[0] / "meta.json").stat().st_mtime_ns
    again = prepared_samples(names, cases, "tumor", TINY_PRE["tumor"], cache, build=False)  # other processes
    assert [s.name for s in again] == names and (cache / names[0] / "meta.json").stat().st_mtime_ns == stamp
    copied = {n: dataclasses.replace(cases[n], image=tmp_path / "node1" / cases[n].image.name) for n in names}
    for n in names:  # another node's copy of the data: other paths and times
        copied[n].image.parent.mkdir(exist_ok=True)
        shutil.copy(cases[n].image, copied[n].image)
    assert [s.name for s in prepared_samples(names, copied, "tumor", TINY_PRE["tumor"], cache, build=False)] == names
    finer = {**TINY_PRE["tumor"], "resample": {"mode": "spacing", "spacing": [3.0, 2.0, 2.0]}}
    with pytest.raises(InputError, match="missing"):
        prepared_samples(names, cases, "tumor", finer, cache, build=False)
    rebuilt = prepared_samples(names, cases, "tumor", finer, cache, build=True)
    assert rebuilt[0].image.shape != first[0].image.shape


def test_a_mask_rewritten_in_place_is_prepared_again(tmp_path):
    """An IRCAD case's label is its masks folder: editing a mask file changes neither the folder's
    size nor its time, so the key stamps every file in it."""
    from LiverTumorSegLib.datasets import Case
    from LiverTumorSegLib.samplecache import cache_key

    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "liver.nii.gz").write_bytes(b"first")
    (tmp_path / "ct.nii.gz").write_bytes(b"ct")
    case = Case("p", tmp_path / "ct.nii.gz", masks, "ircad")
    before = cache_key(case, "tumor", TINY_PRE["tumor"])
    os.utime(masks, ns=(1, 1))
    (masks / "liver.nii.gz").write_bytes(b"other")  # same size, in place
    os.utime(masks / "liver.nii.gz", ns=(2, 2))
    os.utime(masks, ns=(1, 1))  # the folder looks untouched
    assert cache_key(case, "tumor", TINY_PRE["tumor"]) != before


def test_samples_prepared_by_worker_processes_equal_one_process(phantoms, tmp_path):
    """Two spawned workers, each loading stage 1 itself, write the files one process writes."""
    cases = gather_cases([phantoms])
    names = sorted(cases)[:2]
    liver_model = load_model(model_files("phantom-small")[0], stage="liver")
    common = dict(build=True, liver_model=liver_model, liver_tta=False)
    one = prepared_samples(names, cases, "tumor", TINY_PRE["tumor"], tmp_path / "one", **common)
    two = prepared_samples(names, cases, "tumor", TINY_PRE["tumor"], tmp_path / "two", workers=2, **common)
    assert [s.name for s in two] == [s.name for s in one] == names
    for a, b in zip(one, two):
        for array in ("image", "target", "mask"):
            assert np.array_equal(getattr(a, array), getattr(b, array)), (a.name, array)
        meta = [json.loads((tmp_path / run / a.name / "meta.json").read_text(encoding="utf-8")) for run in ("one", "two")]
        assert meta[0] == meta[1]
    corrupt = tmp_path / "corrupt_ct.nii.gz"
    corrupt.write_bytes(b"not a NIfTI file")
    broken = {**cases, names[0]: replace(cases[names[0]], image=corrupt)}
    with pytest.raises(InputError):  # a worker's error reaches the caller
        prepared_samples(names, broken, "tumor", TINY_PRE["tumor"], tmp_path / "broken", workers=2, **common)


# ---------------------------------------------------------------- augmentation


def test_augmentation_is_reproducible_and_keeps_labels_binary():
    rng = np.random.default_rng(1)
    img = rng.random((16, 32, 32)).astype(np.float32)
    lab = (rng.random((16, 32, 32)) > 0.7).astype(np.uint8)
    aug = Augmenter(AUG)
    a, b = aug(img, lab, 5), aug(img, lab, 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    outputs = [aug(img, lab, s) for s in range(12)]
    assert any(not np.array_equal(o[0], img) for o in outputs)
    assert len({o[0].tobytes() for o in outputs}) > 6
    for o_img, o_lab in outputs:
        assert o_img.shape == img.shape and o_lab.shape == lab.shape and set(np.unique(o_lab)) <= {0, 1}


def test_mirroring_and_rotation_move_image_and_label_together():
    img = np.zeros((8, 16, 16), np.float32)
    img[2:4, 1:5, 10:15] = 1.0
    lab = (img > 0).astype(np.uint8)
    for seed in range(8):
        o_img, o_lab = Augmenter({"rotate90": 1.0, "mirror": 0.5})(img, lab, seed)
        assert np.array_equal(o_img > 0.5, o_lab > 0)
        assert o_lab.sum() == lab.sum()  # 90-degree steps and flips only permute voxels


def test_rotations_take_each_of_90_180_and_270_degrees_in_plane():
    rng = np.random.default_rng(2)
    img = rng.random((4, 12, 12)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    turns = []
    for seed in range(40):
        out, _ = Augmenter({"rotate90": 1.0})(img, lab, seed)
        turns += [k for k in range(4) if np.array_equal(out, np.rot90(img, k, axes=(1, 2)))]
    assert len(turns) == 40 and set(turns) == {1, 2, 3}


def test_scaling_zooms_image_and_label_together_about_the_centre():
    """A centred cube zoomed by s in [0.75, 1.33] stays centred (the crop back to the patch size may
    move it by half a voxel), its volume changes by about s**3, and its label lands on the image's
    voxels (PyTorch's plain "nearest" would shift the label by up to half a voxel: "nearest-exact")."""
    img = np.zeros((24, 48, 48), np.float32)
    img[8:16, 16:32, 16:32] = 1.0
    lab = (img > 0).astype(np.uint8)
    ratios = []
    for seed in range(10):
        o_img, o_lab = Augmenter({"scale": {"prob": 1.0, "min": 0.75, "max": 1.33}})(img, lab, seed)
        shown = o_img > 0.5
        assert o_img.shape == img.shape and 2 * (shown & (o_lab > 0)).sum() / (shown.sum() + o_lab.sum()) > 0.97
        centre = np.array(np.nonzero(o_lab)).mean(axis=1)
        assert np.allclose(centre, np.array(np.nonzero(shown)).mean(axis=1), atol=0.25)
        assert np.allclose(centre, (11.5, 23.5, 23.5), atol=0.75)
        ratios.append(o_lab.sum() / lab.sum())
    assert min(ratios) >= 0.75 ** 3 * 0.8 and max(ratios) <= 1.33 ** 3 * 1.2
    assert max(ratios) / min(ratios) > 1.3  # the zoom factor really varies


def test_intensity_shift_leaves_the_masked_background_at_zero():
    img = np.zeros((8, 16, 16), np.float32)
    img[:, 4:12, 4:12] = 0.5
    lab = np.zeros(img.shape, np.uint8)
    o_img, _ = Augmenter({"intensity_shift": {"prob": 1.0, "max": 0.2}})(img, lab, 3)
    assert np.all(o_img[img == 0] == 0)
    shift = np.unique(o_img[img > 0] - 0.5)
    assert np.allclose(shift, shift[0]) and 0 < abs(shift[0]) <= 0.2


# ---------------------------------------------------------------- configs


def test_bundled_configs_hold_the_papers_settings():
    assert {"small", "paper", "paper-sgd"} <= set(bundled_configs())
    paper, sgd = load_config("paper"), load_config("paper-sgd")
    assert paper["optimizer"] == {"name": "adam", "lr": 5e-4, "weight_decay": 3e-5}
    assert (paper["epochs"], paper["batch"], paper["net"]) == (1000, 8, "paper")
    assert sgd["optimizer"] == {"name": "sgd", "lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
    assert set(paper["augmentation"]) == {"rotate90", "mirror", "scale", "intensity_shift"}
    liver, tumor = stage_recipe(paper, "liver").loss, stage_recipe(paper, "tumor").loss
    assert liver["dice"] and liver["ce"] and liver["hd"] and not liver.get("focal")
    assert tumor["dice"] and tumor["focal"] and tumor["hd"] and (tumor["focal_alpha"], tumor["focal_gamma"]) == (0.25, 2.0)
    assert stage_recipe(load_config("small"), "tumor").fg_fraction == 0.5


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "epochs"),
    ({"optimizer": {"name": "rmsprop", "lr": 1}}, "optimizer"),
    ({"augmentation": {"elastic": 1}}, "augmentation"),
    ({"loss": {"liver": {"dice": 1, "dcie": 1}}}, "unknown loss"),
    ({"lr": 1}, "unknown keys"),
    ({"loss": {"livr": {"dice": 1}}}, "one entry per stage"),  # a typo'd stage would train the default loss
    ({"loss": {"liver": {"dice": "1"}}}, "loss.liver.dice"),
    ({"preprocessing": {**TINY_PRE, "liver": {**TINY_PRE["liver"], "hu_windw": [0, 1]}}}, "preprocessing.liver keys"),
    ({"preprocessing": {**TINY_PRE, "tumor": {**TINY_PRE["tumor"], "resample": {"mode": "spacng"}}}}, "resample is one of"),
    ({"preprocessing": {**TINY_PRE, "tumor": {**TINY_PRE["tumor"], "liver_margin": 5}}}, "preprocessing.tumor keys"),
    ({"augmentation": {**AUG, "scale": {"prob": 0.2, "min": 0.8, "mx": 1.2}}}, "augmentation.scale"),
    ({"batch": "2"}, "'batch' must be a whole number"),
    ({"amp": "false"}, "'amp' must be true or false"),
    ({"optimizer": {"name": "adam", "lr": "5e-4"}}, "optimizer.lr"),
    ({"split": "foo"}, "'split' is"),
    ({"split": [0.5, 0.5]}, "'split' is"),
    ({"split": [0.5, 0.3, 0.3]}, "do not add up to 1"),
    ({"fg_fraction": {"liver": 0.5}}, "one per stage"),
])
def test_config_mistakes_are_refused(change, message):
    with pytest.raises(InputError, match=message):
        tiny_config(**change)


# ---------------------------------------------------------------- the trainer


def _params(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_training_reduces_the_loss(tmp_path):
    config = tiny_config(net={**TINY_NET, "tile": [16, 32, 32]}, epochs=8, iterations_per_epoch=5, val_every=8,
                         augmentation={}, loss={"liver": {"dice": 1.0, "ce": 1.0}})
    trainer = StageTrainer(config, "liver", _blob_samples(), _blob_samples(1), tmp_path, torch.device("cpu"))
    history = trainer.run()["history"]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert history[-1]["val_dice"] > 0.5


def test_learning_rate_follows_the_poly_decay(tmp_path):
    """lr = lr0 (1 - it / total) ** 0.9 after each iteration (it counts iterations, not epochs)."""
    config = tiny_config(epochs=2, iterations_per_epoch=3, augmentation={})
    trainer = StageTrainer(config, "liver", _blob_samples(), [], tmp_path, torch.device("cpu"))
    lr0, total = config["optimizer"]["lr"], 6
    assert config["poly_exponent"] == 0.9 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0)
    for epoch in range(2):
        trainer.train_epoch()
        it = 3 * (epoch + 1)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * (1 - it / total) ** 0.9, abs=1e-12)


def test_optimizers_are_built_as_the_configs_say():
    """The paper's Adam (lr 5e-4, weight decay 3e-5) and the authors' SGD (lr 0.01, Nesterov momentum 0.99)."""
    from LiverTumorSegLib.trainer import make_optimizer

    params = list(torch.nn.Linear(2, 2).parameters())
    adam = make_optimizer(params, load_config("paper")["optimizer"])
    assert type(adam) is torch.optim.Adam
    assert (adam.defaults["lr"], adam.defaults["weight_decay"]) == (5e-4, 3e-5)
    sgd = make_optimizer(params, load_config("paper-sgd")["optimizer"])
    assert type(sgd) is torch.optim.SGD
    assert {k: sgd.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay")} == \
        {"lr": 0.01, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}


def test_the_trainer_uses_its_recipe(tmp_path):
    """Every deep-supervision output reaches the loss (which weights them 4/7, 2/7, 1/7: test_losses), and
    the patches follow the stage's foreground oversampling."""
    config = tiny_config(epochs=1, iterations_per_epoch=2, augmentation={}, fg_fraction={"liver": 0.5, "tumor": 0.9})
    trainer = StageTrainer(config, "tumor", _blob_samples(), [], tmp_path, torch.device("cpu"))
    assert trainer.sampler.fg_fraction == 0.9
    seen, loss = [], trainer.loss
    trainer.loss = lambda outputs, target, epoch: (seen.append([tuple(o.shape) for o in outputs]), loss(outputs, target, epoch))[1]
    trainer.train_epoch()
    full, *coarser = seen[0]
    assert full == (2, 2, *TINY_NET["tile"]) and len(coarser) == 2  # the full-resolution output and two coarser ones
    assert all(shape[:2] == (2, 2) and all(c < f for c, f in zip(shape[2:], full[2:])) for shape in coarser)


def test_the_best_validated_weights_are_the_model(tmp_path):
    """Validation every epoch scores 0.2, 0.9, 0.4: the model is the second epoch's weights, not the last."""
    config = tiny_config(epochs=3, val_every=1, augmentation={})
    trainer = StageTrainer(config, "liver", _blob_samples(), _blob_samples(1), tmp_path, torch.device("cpu"))
    scores, weights = iter([0.2, 0.9, 0.4]), {}
    trainer.validate = lambda: next(scores)
    trainer.run(on_epoch=lambda entry: weights.__setitem__(entry["epoch"], _params(trainer.net)))
    net, epoch = trainer.final_network()
    assert epoch == 2 and trainer.best == {"epoch": 2, "dice": 0.9}
    assert not all(torch.equal(v, weights[3][k]) for k, v in weights[2].items())
    for key, value in weights[2].items():
        assert torch.equal(value, net.state_dict()[key]), key


def test_interrupted_run_resumes_to_the_same_state(tmp_path):
    """Dropout on, as in the real networks: its random state must be restored too."""
    config = tiny_config(epochs=4, val_every=1, net={**TINY_NET, "attn_dropout": 0.15, "conv_dropout": 0.1})
    samples, val = _blob_samples(), _blob_samples(1)
    whole = StageTrainer(config, "liver", samples, val, tmp_path / "whole", torch.device("cpu"))
    whole.run()

    def interrupt(entry):
        if entry["epoch"] == 2:
            raise KeyboardInterrupt

    first = StageTrainer(config, "liver", samples, val, tmp_path / "split", torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt):
        first.run(on_epoch=interrupt)
    resumed = StageTrainer(config, "liver", samples, val, tmp_path / "split", torch.device("cpu"))
    resumed.run(resume=True)
    for key, value in _params(whole.net).items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history]
    assert whole.best == resumed.best
    assert whole.optimizer.state_dict()["state"][0]["exp_avg"].equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"])


def test_batches_drawn_by_loader_workers_train_to_the_same_weights(tmp_path):
    """Forked loader workers draw the very batches the training process would, and leave the
    dropout masks alone (dropout on here, so a consumed random number would show)."""
    config = tiny_config(epochs=2, net={**TINY_NET, "attn_dropout": 0.1, "conv_dropout": 0.1})
    runs = []
    for workers in (0, 2):
        trainer = StageTrainer(config, "liver", _blob_samples(), [], tmp_path / str(workers), torch.device("cpu"),
                               loader_workers=workers)
        trainer.run()
        runs.append(trainer)
    plain, loaded = runs
    assert loaded.loader_workers == 2
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in loaded.history]
    for key, value in _params(plain.net).items():
        assert torch.equal(value, loaded.net.state_dict()[key]), key


def test_sample_preparing_processes(monkeypatch):
    """Many cases are prepared in parallel, except where a liver model segments them on a GPU."""
    from LiverTumorSegLib.trainer_cli import prepare_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert prepare_workers(None, 16) == 8 and prepare_workers(None, 15) == 1
    assert prepare_workers(None, 100, gpu_model=True) == 1
    assert prepare_workers(3, 100, gpu_model=True) == 3  # as asked


def test_loader_workers_default_to_none_on_the_cpu_and_a_few_per_gpu(monkeypatch):
    from LiverTumorSegLib.trainer_cli import loader_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert loader_workers(None, torch.device("cpu")) == 0 and loader_workers(3, torch.device("cpu")) == 3
    assert loader_workers(None, torch.device("cuda")) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 GPU processes share 16 CPUs
    assert loader_workers(None, torch.device("cuda")) == 1
    with pytest.raises(InputError, match="0 or more"):
        loader_workers(-1, torch.device("cpu"))


def test_a_time_limit_stops_between_epochs_and_resume_finishes_the_run(tmp_path):
    """A limit no epoch fits in stops after the first (the checkpoint resumes to the whole run's
    state); a limit every epoch fits in changes nothing."""
    config = tiny_config(epochs=3, val_every=1)
    samples, val = _blob_samples(), _blob_samples(1)
    whole = StageTrainer(config, "liver", samples, val, tmp_path / "whole", torch.device("cpu"))
    assert whole.run(time_limit=1e9)["stopped"] is False and len(whole.history) == 3
    cut = StageTrainer(config, "liver", samples, val, tmp_path / "cut", torch.device("cpu"))
    outcome = cut.run(time_limit=1e-9)
    assert outcome["stopped"] is True and cut.epoch == 1 and len(outcome["history"]) == 1
    resumed = StageTrainer(config, "liver", samples, val, tmp_path / "cut", torch.device("cpu"))
    assert resumed.run(resume=True)["stopped"] is False
    for key, value in _params(whole.net).items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history]


def test_train_time_limit_writes_a_model_that_says_so(phantoms, tmp_path, capsys):
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(tiny_config(val_every=2)), encoding="utf-8")
    run = tmp_path / "run"
    args = ["train", "--stage", "liver", "--data", str(phantoms), "--config", str(cfg_file), "-o", str(run)]
    assert main([*args, "--epochs", "3", "--time-limit", "1e-6", "--loader-workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert "stopped at the time limit after epoch 1 of 3" in err and "not validated before the time limit" in out
    training = json.loads(main_card(run / "liver.ltsm"))["training"]
    assert training["stopped_at_time_limit"].startswith("after epoch 1 of 3") and len(training["history"]) == 1
    assert main([*args, "--epochs", "3", "--resume"]) == 0
    training = json.loads(main_card(run / "liver.ltsm"))["training"]
    assert "stopped_at_time_limit" not in training and len(training["history"]) == 3
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--time-limit", bad])
        assert exit_.value.code == 2
    assert "is not a number of minutes above 0" in capsys.readouterr().err


@pytest.mark.parametrize("failure", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                     MemoryError("Unable to allocate 1.5 GiB for an array")])
def test_out_of_memory_in_training_says_what_to_change(phantoms, tmp_path, capsys, monkeypatch, failure):
    """One error line naming the batch and tile and what to do, exit 2; the finished epochs stay resumable."""
    from LiverTumorSegLib import trainer

    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(tiny_config(epochs=3)), encoding="utf-8")
    run = tmp_path / "run"
    args = ["train", "--stage", "liver", "--data", str(phantoms), "--config", str(cfg_file), "-o", str(run)]
    train_epoch = trainer.StageTrainer.train_epoch

    def second_epoch_fails(self, *a, **k):
        if self.epoch == 1:
            raise failure
        return train_epoch(self, *a, **k)

    monkeypatch.setattr(trainer.StageTrainer, "train_epoch", second_epoch_fails)
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "Out of memory on cpu while training with the global batch 2 and the tile" in lines[0]
    assert "smaller 'batch' or 'tile'" in lines[0] and "--resume" in lines[0] and str(failure).split(".")[0] in lines[0]
    trained = []
    monkeypatch.setattr(trainer.StageTrainer, "train_epoch", lambda self, *a, **k: (trained.append(self.epoch),
                                                                                    train_epoch(self, *a, **k))[1])
    assert main([*args, "--resume"]) == 0
    assert trained == [1, 2]  # the first epoch was kept


def test_resume_refuses_another_config(tmp_path):
    StageTrainer(tiny_config(epochs=1), "liver", _blob_samples(), [], tmp_path, torch.device("cpu")).run()
    other = StageTrainer(tiny_config(epochs=2, batch=4), "liver", _blob_samples(), [], tmp_path, torch.device("cpu"))
    with pytest.raises(InputError, match="another training config"):
        other.run(resume=True)


def test_train_leaves_no_trace_of_a_refused_or_failed_start(phantoms, tmp_path, capsys):
    """A resume refused for another config keeps the run's own config (a plain --resume still
    works); a start that fails while preparing its samples writes no split or config, so a retry
    needs no --overwrite; cases without labels stay out of the split and the card."""
    cfg_file, other = tmp_path / "tiny.json", tmp_path / "other.json"
    cfg_file.write_text(json.dumps(tiny_config(epochs=1, split=[0.6, 0.2, 0.2])), encoding="utf-8")
    other.write_text(json.dumps(tiny_config(epochs=1, split=[0.6, 0.2, 0.2], optimizer={"name": "adam", "lr": 1e-2})),
                     encoding="utf-8")
    run = tmp_path / "run"
    base = ["train", "--stage", "liver", "--data", str(phantoms), "-o", str(run)]
    assert main([*base, "--config", str(cfg_file)]) == 0
    saved = (run / "liver.config.json").read_bytes()
    assert main([*base, "--config", str(other), "--resume", "--epochs", "2"]) == 2
    assert "another config" in capsys.readouterr().err and (run / "liver.config.json").read_bytes() == saved
    assert main([*base, "--resume", "--epochs", "2"]) == 0

    lits = tmp_path / "lits"  # the phantoms in the LiTS layout, and a sixth CT whose labels hold a 7
    lits.mkdir()
    cts = sorted(phantoms.glob("*_ct.nii.gz"))
    for n, ct_file in enumerate(cts):
        (lits / f"volume-{n}.nii.gz").symlink_to(ct_file)
        labels = read_labels(str(ct_file).replace("_ct.nii", "_label.nii"))
        write_labels(np.minimum(labels.array, 2), labels, lits / f"segmentation-{n}.nii.gz")
    (lits / f"volume-{len(cts)}.nii.gz").symlink_to(cts[0])
    first = read_labels(lits / "segmentation-0.nii.gz")
    write_labels(np.where(first.array > 0, 7, 0), first, lits / f"segmentation-{len(cts)}.nii.gz")
    fresh = tmp_path / "fresh"
    argv = ["train", "--stage", "liver", "--data", str(lits), "--config", str(cfg_file), "-o", str(fresh)]
    assert main(argv) == 2
    assert "outside 0..2" in capsys.readouterr().err
    assert not (fresh / "split.json").exists() and not (fresh / "liver.config.json").exists()
    (lits / f"segmentation-{len(cts)}.nii.gz").unlink()  # now unlabelled: out of the split, with a warning
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"1 case(s) have no labels and are left out: lits-{len(cts)}" in err
    split = json.loads((fresh / "split.json").read_text(encoding="utf-8"))
    assert sorted(sum(split.values(), [])) == sorted(f"lits-{n}" for n in range(len(cts)))
    data_card = json.loads(main_card(fresh / "liver.ltsm"))["training"]["data"]
    assert f"lits-{len(cts)}" not in data_card["train_cases"] + data_card["val_cases"] + data_card["test_cases"]
    (tmp_path / "notes.txt").write_text("a file", encoding="utf-8")  # a run folder that cannot be made
    assert main(["train", "--stage", "liver", "--data", str(phantoms), "-o", str(tmp_path / "notes.txt" / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and err.count("error:") == 1 and "unexpected" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(phantoms, tmp_path):
    """torchrun with 2 CPU processes (gloo), each half of the global batch, ends where one process
    ends. The loss is CE + focal: means over voxels, so the mean of the two halves' losses is the
    whole batch's loss (a batch Dice is not, and would only agree approximately). The transformer
    blocks use instance norm: CPU processes cannot synchronise batch statistics (GPUs do, with
    SyncBatchNorm). The two processes also draw their batches through a loader worker each, which
    must not change them."""
    config = tiny_config(net={**TINY_NET, "conv_norm": "instance", "stem": [1, 2, 2]}, epochs=2, iterations_per_epoch=3, batch=4, val_every=2,
                         loss={"liver": {"ce": 1.0, "focal": 1.0}})
    cfg_file = tmp_path / "ddp.json"
    cfg_file.write_text(json.dumps(config), encoding="utf-8")
    common = ["train", "--stage", "liver", "--data", str(phantoms), "--config", str(cfg_file), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "LiverTumorSegLib.cli", *common, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "LiverTumorSegLib.cli", *common, "--loader-workers", "1", "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "liver.checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "liver.checkpoint.pt", weights_only=False)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-4)
    assert a["history"][-1]["val_dice"] == pytest.approx(b["history"][-1]["val_dice"], abs=1e-3)
    # Same weights up to float summation order (Adam turns near-zero gradients' rounding into small
    # steps): the difference is tiny against how far training moved the weights from their start.
    start = StageTrainer(config, "liver", _blob_samples(), [], tmp_path / "x", torch.device("cpu")).net.state_dict()
    keys = [k for k, v in start.items() if v.is_floating_point()]
    norm = lambda tensors: float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))  # noqa: E731
    moved = norm(a["model"][k] - start[k] for k in keys)
    apart = norm(a["model"][k] - b["model"][k] for k in keys)
    assert moved > 0.5 and apart < 1e-2 * moved, (apart, moved)


# ---------------------------------------------------------------- commands


def test_train_both_stages_then_evaluate_the_pair(phantoms, tmp_path, capsys):
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(tiny_config()), encoding="utf-8")
    run = tmp_path / "run"
    for stage in ("liver", "tumor"):
        assert main(["train", "--stage", stage, "--data", str(phantoms), "--format", "phantom",
                     "--config", str(cfg_file), "-o", str(run)]) == 0
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    assert [len(split[p]) for p in ("train", "val", "test")] == [3, 1, 1]
    for name in ("liver.ltsm", "tumor.ltsm", "liver.curves.png", "tumor.history.json", "tumor.checkpoint.pt"):
        assert (run / name).is_file(), name
    card = json.loads(main_card(run / "tumor.ltsm"))
    assert card["training"]["data"]["test_cases"] == split["test"]
    assert card["training"]["recipe"]["optimizer"]["name"] == "adam"
    assert "NOT FOR CLINICAL USE" in card["intended_use"]

    # a finished run is not overwritten by accident; --resume with more epochs goes on
    assert main(["train", "--stage", "liver", "--data", str(phantoms), "-o", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--stage", "liver", "--data", str(phantoms), "-o", str(run), "--resume", "--epochs", "5"]) == 0
    history = json.loads((run / "liver.history.json").read_text(encoding="utf-8"))["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]

    # fine-tuning starts from a trained model's weights and says so in the card
    tuned = tmp_path / "tuned"
    assert main(["train", "--stage", "liver", "--data", str(phantoms), "--config", str(cfg_file), "--epochs", "1",
                 "--init", str(run / "liver.ltsm"), "-o", str(tuned)]) == 0
    start = json.loads(main_card(tuned / "liver.ltsm"))["training"]["initialised_from"]
    assert start["file"] == "liver.ltsm" and len(start["sha256"]) == 64
    assert main(["train", "--stage", "liver", "--data", str(phantoms), "--config", "small", "--epochs", "1",
                 "--init", str(run / "liver.ltsm"), "-o", str(tmp_path / "mismatch")]) == 2
    assert "another network configuration" in capsys.readouterr().err

    # the tumor stage can learn on stage 1's predicted livers (here the bundled liver model's)
    cascade = tmp_path / "cascade"
    assert main(["train", "--stage", "tumor", "--data", str(phantoms), "--config", str(cfg_file), "--epochs", "1",
                 "--liver-model", "phantom-small", "-o", str(cascade)]) == 0
    liver_model = load_model(model_files("phantom-small")[0], stage="liver")
    training = json.loads(main_card(cascade / "tumor.ltsm"))["training"]
    assert "liver predicted by stage 1" in training["target"]
    assert training["liver_masks_from"] == {**liver_model.identity(), "mirrored": True}
    name = sorted(json.loads((cascade / "split.json").read_text(encoding="utf-8"))["train"])[0]
    cached = json.loads((cascade / "cache" / "tumor" / name / "meta.json").read_text(encoding="utf-8"))
    assert cached["key"]["liver_model"] == liver_model.prediction_key() and cached["key"]["liver_tta"] is True
    ct, labels = load_case(gather_cases([phantoms])[name])
    predicted = predicted_liver(ct, liver_model, "cpu")
    assert not np.array_equal(predicted, labels.array > 0)
    own = build_sample(ct, labels, "tumor", TINY_PRE["tumor"], liver=predicted)
    assert np.array_equal(np.load(cascade / "cache" / "tumor" / name / "mask.npy"), own.mask)
    # unmirrored on request (as the bundled tumor stage was trained): the card and the cache say so
    plain = tmp_path / "cascade-plain"
    assert main(["train", "--stage", "tumor", "--data", str(phantoms), "--config", str(cfg_file), "--epochs", "1",
                 "--liver-model", "phantom-small", "--no-liver-tta", "-o", str(plain)]) == 0
    assert json.loads(main_card(plain / "tumor.ltsm"))["training"]["liver_masks_from"]["mirrored"] is False
    cached = json.loads((plain / "cache" / "tumor" / name / "meta.json").read_text(encoding="utf-8"))
    assert cached["key"]["liver_tta"] is False
    unmirrored = build_sample(ct, labels, "tumor", TINY_PRE["tumor"], liver=predicted_liver(ct, liver_model, "cpu", tta=False))
    assert np.array_equal(np.load(plain / "cache" / "tumor" / name / "mask.npy"), unmirrored.mask)
    assert main(["train", "--stage", "tumor", "--data", str(phantoms), "--config", str(cfg_file), "--epochs", "1",
                 "--no-liver-tta", "-o", str(tmp_path / "no-liver")]) == 2
    assert "give --liver-model too" in capsys.readouterr().err
    assert main(["train", "--stage", "liver", "--data", str(phantoms), "--config", str(cfg_file),
                 "--liver-model", "phantom-small", "-o", str(tmp_path / "wrong")]) == 2
    assert "--liver-model is for the tumor stage" in capsys.readouterr().err

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--data", str(phantoms), "-o", str(out)]) == 0
    rows = (out / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("case,output,structure")
    assert len(rows) == 1 + 2 * 3  # one test case, two outputs, three structures
    assert all(r.split(",")[0] == split["test"][0] for r in rows[1:])
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary) == {"network", "post-processed", "tumor_gap", "postprocessing"}
    assert summary["postprocessing"] == dataclasses.asdict(PostParams())
    assert summary["tumor_gap"]["cases"] == 1 and sum(summary["tumor_gap"]["cost"].values()) == pytest.approx(
        1 - summary["post-processed"]["tumor"]["metrics"]["dsc"]["mean"])  # the steps start from the post-processed tumor Dice
    gap = (out / "tumor_gap.csv").read_text(encoding="utf-8").splitlines()
    assert gap[0] == "case,output,tumors in truth,as is,labels right,no false tumors,no missed tumors" and len(gap) == 2
    text = (out / "summary.md").read_text(encoding="utf-8")
    assert "Network output (before post-processing)" in text and "After post-processing (default parameters)" in text
    assert "Where the tumor Dice is lost" in text and "over 1 case(s)" in text
    assert (out / "boxplot.png").stat().st_size > 1000
    # the post-processing flags reach evaluate's post-processed output, which says what it ran
    tuned = tmp_path / "eval-tuned"
    assert main(["evaluate", "--model", str(run), "--data", str(phantoms), "-o", str(tuned),
                 "--no-cyst-filter", "--min-peak", "0.7"]) == 0
    summary = json.loads((tuned / "summary.json").read_text(encoding="utf-8"))
    assert summary["postprocessing"] == dataclasses.asdict(PostParams(cyst_filter=False, min_peak_probability=0.7))
    assert "After post-processing (cyst_filter=False, min_peak_probability=0.7)" in (tuned / "summary.md").read_text(encoding="utf-8")
    assert summary["network"] == json.loads((out / "summary.json").read_text(encoding="utf-8"))["network"]


def main_card(path: Path) -> str:
    from LiverTumorSegLib.modelfile import read_card

    return json.dumps(read_card(path))


def test_pseudo_labels_train_the_liver_stage_and_say_so(phantoms, tmp_path, capsys):
    """A teacher (here the bundled model, offline) labels CTs; train marks the card; the tumor stage
    leaves liver-only pseudo-labels out."""
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for ct in sorted(phantoms.glob("*_ct.nii.gz"))[:4]:
        (unlabelled / ct.name.replace("_ct", "")).symlink_to(ct)
    pseudo = tmp_path / "pseudo"
    assert main(["pseudolabel", str(unlabelled), "-o", str(pseudo), "--model", "phantom-small", "--device", "cpu"]) == 0
    manifest = json.loads((pseudo / "pseudo-labels.json").read_text(encoding="utf-8"))
    assert manifest["pseudo_labels"] and "liver 1 only" in manifest["what"] and len(manifest["cases"]) == 4
    assert set(manifest["teacher"]) == {"liver"}
    from LiverTumorSegLib.imageio import read_labels as read

    assert set(np.unique(read(pseudo / "case_1100_label.nii.gz").array)) == {0, 1}
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(tiny_config(epochs=1, split=[2, 1, 1])), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--stage", "liver", "--data", str(pseudo), "--config", str(cfg_file), "-o", str(run)]) == 0
    card = json.loads(main_card(run / "liver.ltsm"))
    assert card["training"]["data"]["pseudo_labels"][0]["teacher"]["liver"]["name"] == "phantom-small-liver"
    capsys.readouterr()
    assert main(["train", "--stage", "tumor", "--data", str(pseudo), "--config", str(cfg_file), "-o", str(run)]) == 2
    assert "liver-only pseudo-labels" in capsys.readouterr().err


def test_pseudolabel_names_are_unique_and_nothing_is_overwritten(phantoms, tmp_path, capsys):
    from LiverTumorSegLib.registry import model_files
    from LiverTumorSegLib.teacher import unique_names

    assert unique_names([Path("a/ct.nii.gz"), Path("b/ct.nii.gz"), Path("b/x.nrrd")]) == ["a_ct", "b_ct", "x"]
    with pytest.raises(InputError, match="a_ct"):
        unique_names([Path("p/a/ct.nii.gz"), Path("q/a/ct.nii.gz")])
    ct = sorted(phantoms.glob("*_ct.nii.gz"))[0]
    out = tmp_path / "pseudo"
    out.mkdir()
    mine = out / ct.name  # X_ct.nii.gz is written as X_ct.nii.gz (the _ct is not doubled)
    mine.write_bytes(b"the user's file")
    liver_only = model_files("phantom-small")[0]  # stage 1 given alone: no --model lookup, no tumor file needed
    assert main(["pseudolabel", str(ct), "-o", str(out), "--model", "no-such-model", "--liver-model", str(liver_only),
                 "--device", "cpu"]) != 0
    assert "exists" in capsys.readouterr().err and mine.read_bytes() == b"the user's file"
    assert not (out / "pseudo-labels.json").exists()


def test_a_corrupt_init_model_fails_before_the_run_folder_is_made(phantoms, tmp_path, capsys):
    bad = tmp_path / "cut.ltsm"
    bad.write_bytes(model_files("phantom-small")[0].read_bytes()[:4000])
    code = main(["train", "--stage", "liver", "--data", str(phantoms), "--init", str(bad), "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "truncated or corrupt" in err and err.count("error:") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("capability, expected", [((8, 0), (torch.bfloat16, False)), ((9, 0), (torch.bfloat16, False)),
                                                  ((7, 0), (torch.float16, True)), ((7, 5), (torch.float16, True))])
def test_mixed_precision_on_cuda_only(monkeypatch, capability, expected):
    """CUDA trains and segments in bf16 where the GPU computes it natively (Ampere, capability 8, or later),
    else fp16 (with a gradient scaler in training), whatever torch says of emulated bf16; the CPU trains in
    fp32. (No GPU here: the capability of the asked device is stubbed, the choice is what is tested.)"""
    from LiverTumorSegLib.devices import amp_dtype
    from LiverTumorSegLib.trainer import amp_settings

    assert amp_settings(torch.device("cpu"), True) == (None, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # true of emulated bf16 too
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability if device == torch.device("cuda:1")
                        else (0, 0))
    assert amp_settings(torch.device("cuda:1"), True) == expected
    assert amp_settings(torch.device("cuda:1"), False) == (None, False)
    assert amp_dtype(torch.device("cuda:1"), fast=False) == expected[0]


def test_a_run_resumes_where_the_gradient_scaler_changes(tmp_path, monkeypatch):
    """A run started without a gradient scaler (CPU, bf16 GPU) resumes on an fp16 GPU with a fresh one,
    and the other way round. (No GPU here: CUDA's scaler is made available on the CPU.)"""
    import torch.cuda.amp.common as amp_common

    import LiverTumorSegLib.trainer as trainer

    config = tiny_config(epochs=2, iterations_per_epoch=1, augmentation={}, amp=True)
    first = trainer.StageTrainer(config, "liver", _blob_samples(), [], tmp_path, torch.device("cpu"))
    first.train_epoch()
    first.epoch = 1
    first.save_checkpoint()
    assert torch.load(tmp_path / "liver.checkpoint.pt", weights_only=False)["scaler"] == {}
    monkeypatch.setattr(amp_common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(trainer, "amp_settings", lambda device, enabled: (None, True))
    scaled = trainer.StageTrainer(config, "liver", _blob_samples(), [], tmp_path, torch.device("cpu"))
    assert scaled.scaler.is_enabled()
    scaled.load_checkpoint()
    assert scaled.epoch == 1 and scaled.scaler.get_scale() == 2.0 ** 16  # a fresh scaler
    scaled.scaler.load_state_dict(dict(scaled.scaler.state_dict(), scale=1024.0))  # as after some fp16 steps
    scaled.save_checkpoint()
    again = trainer.StageTrainer(config, "liver", _blob_samples(), [], tmp_path, torch.device("cpu"))
    again.load_checkpoint()
    assert again.scaler.get_scale() == 1024.0  # a saved scale is kept
    monkeypatch.undo()
    plain = trainer.StageTrainer(config, "liver", _blob_samples(), [], tmp_path, torch.device("cpu"))
    plain.load_checkpoint()
    assert plain.epoch == 1 and not plain.scaler.is_enabled()


def test_a_split_given_in_another_order_is_the_same_split():
    from LiverTumorSegLib.trainer_cli import same_split

    a = {"train": ["c1", "c2"], "val": ["c3"], "test": ["c4"]}
    assert same_split(a, {"train": ["c2", "c1"], "val": ["c3"], "test": ["c4"]})
    assert not same_split(a, {"train": ["c1", "c3"], "val": ["c2"], "test": ["c4"]})


def test_pseudolabel_never_writes_where_its_inputs_are_and_always_leaves_a_manifest(phantoms, tmp_path, capsys):
    """-o on the inputs' folder is refused even with --overwrite; a labelled folder's label files are
    not labelled again; a folder holding other pairs is refused; the manifest lists each pair as it
    is written (a run stopped half-way leaves no pair unmarked)."""
    from LiverTumorSegLib import teacher

    folder = tmp_path / "cts"
    folder.mkdir()
    for f in sorted(phantoms.glob("case_110[01]_*.nii.gz")):
        (folder / f.name).symlink_to(f)
    before = sorted(p.name for p in folder.iterdir())
    base = ["pseudolabel", str(folder), "--model", "phantom-small", "--device", "cpu"]
    assert main([*base, "-o", str(folder), "--overwrite"]) == 2
    assert "holds inputs" in capsys.readouterr().err and sorted(p.name for p in folder.iterdir()) == before
    assert [p.name for p in teacher.find_inputs([folder])] == ["case_1100_ct.nii.gz", "case_1101_ct.nii.gz"]
    assert "labelled pair(s)" in capsys.readouterr().err

    seen = []
    real_write = teacher.write_labels

    def watching(labels, ct, path, **kw):  # the manifest already lists the case when its pair is written
        listed = json.loads((tmp_path / "out" / teacher.MANIFEST).read_text(encoding="utf-8"))
        seen.append((path.name, [c["case"] for c in listed["cases"]], listed["complete"]))
        return real_write(labels, ct, path, **kw)

    teacher.write_labels = watching
    try:
        assert main([*base, "-o", str(tmp_path / "out")]) == 0
    finally:
        teacher.write_labels = real_write
    assert seen == [("case_1100_label.nii.gz", ["case_1100"], False),
                    ("case_1101_label.nii.gz", ["case_1100", "case_1101"], False)]
    assert json.loads((tmp_path / "out" / teacher.MANIFEST).read_text(encoding="utf-8"))["complete"] is True
    one = tmp_path / "one"
    one.mkdir()
    (one / "x.nii.gz").symlink_to(sorted(phantoms.glob("*_ct.nii.gz"))[2])
    assert main(["pseudolabel", str(one), "--model", "phantom-small", "--device", "cpu", "-o", str(tmp_path / "out"),
                 "--overwrite"]) == 2  # the earlier pairs would stay, described by no manifest
    assert "holds other pairs" in capsys.readouterr().err


def test_the_paper_configs_train_on_the_papers_lits_split(tmp_path):
    from LiverTumorSegLib.datasets import lits_paper_split
    from LiverTumorSegLib.trainer_cli import choose_split

    for name in ("paper", "paper-sgd"):
        config = load_config(name)
        split, source = choose_split({f"lits-{n}": None for n in range(131)}, config, tmp_path, None)
        assert split == lits_paper_split(seed=config["seed"]) and "paper's LiTS split" in source, name


def test_training_curves_show_the_loss_and_the_best_validation(tmp_path):
    """Two panels with lines drawn (not a blank figure), whatever epochs were validated."""
    import matplotlib.image

    from LiverTumorSegLib.overlay import save_training_curves_png

    history = [{"epoch": e, "loss": 2.0 / e, **({"val_dice": 0.1 * e} if e % 2 == 0 else {})} for e in range(1, 9)]
    path = save_training_curves_png(history, tmp_path / "curves.png", "liver stage")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)[..., :3]
    height, width = image.shape[:2]
    assert width > 2 * height  # two panels side by side
    dark = image.mean(axis=2) < 0.5
    left, right = dark[:, : width // 2], dark[:, width // 2:]
    assert left.sum() > 2000 and right.sum() > 2000  # axes, ticks, lines and text in both panels
    coloured = (image.max(axis=2) - image.min(axis=2)) > 0.3  # the blue loss and green Dice lines
    assert coloured[:, : width // 2].sum() > 200 and coloured[:, width // 2:].sum() > 200
    unvalidated = matplotlib.image.imread(save_training_curves_png([{"epoch": 1, "loss": 1.0}], tmp_path / "none.png"))[..., :3]
    assert ((unvalidated.max(axis=2) - unvalidated.min(axis=2)) > 0.3)[:, width // 2:].sum() < 50  # no Dice line to draw
