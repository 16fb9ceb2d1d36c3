"""Model files: round trip, and clear refusal of wrong, truncated, tampered or mismatched files."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from LiverTumorSegLib.errors import ModelFileError
from LiverTumorSegLib.modelfile import average_models, load_model, read_card, save_model, update_card
from LiverTumorSegLib.netconfig import SMALL, NetConfig
from LiverTumorSegLib.network import GUNETRpp
from LiverTumorSegLib.registry import model_files, model_summary, peek_card

CARD = {"name": "t", "stage": "liver", "labels": ["background", "liver"], "inference": {}, "training": {},
        "preprocessing": {"resample": {"mode": "spacing", "spacing": [4, 2.5, 2.5]}}, "intended_use": "tests"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net = GUNETRpp(SMALL).eval()
    path = save_model(net, CARD, tmp_path_factory.mktemp("m") / "liver.ltsm")
    return net, path


def test_round_trip(saved):
    net, path = saved
    model = load_model(path, stage="liver")
    assert NetConfig.from_dict(read_card(path)["net"]) == SMALL
    x = torch.rand(1, 1, *SMALL.tile)
    half = GUNETRpp(SMALL).eval()
    half.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in net.state_dict().items()})
    with torch.no_grad():
        assert torch.allclose(model.net(x), half(x), atol=1e-5)
    assert path.stat().st_size < 10e6


def test_identity_survives_written_metrics(saved, tmp_path):
    """Writing measured numbers into a card changes the file's sha256, not what the model predicts."""
    path = shutil.copyfile(saved[1], tmp_path / "liver.ltsm")
    before = load_model(path)
    update_card(path, metrics={"dice": 0.9})
    after = load_model(path)
    assert after.sha256 != before.sha256
    assert after.weights_sha256 == before.weights_sha256
    assert after.prediction_key() == before.prediction_key()
    assert after.identity() == dict(before.identity(), sha256=after.sha256)
    update_card(path, inference={"tumor_threshold": 0.4})  # a setting: the output may change
    assert load_model(path).prediction_key() != before.prediction_key()


def test_average_is_the_mean_of_the_weights_and_names_its_sources(saved, tmp_path):
    net, first = saved
    torch.manual_seed(1)
    other = save_model(GUNETRpp(SMALL).eval(), dict(CARD, name="u"), tmp_path / "other.ltsm")
    update_card(other, metrics={"dice": 0.5})
    out = average_models([first, other], tmp_path / "mean.ltsm", note="a test")
    a, b, mean = (load_model(p) for p in (first, other, out))
    for key, value in mean.net.state_dict().items():
        if value.is_floating_point():  # the mean of the stored fp16 weights, stored fp16 again
            expected = ((a.net.state_dict()[key] + b.net.state_dict()[key]) / 2).half().float()
            assert torch.equal(value, expected), key
    card = read_card(out)
    assert card["name"] == "u" and "metrics" not in card
    assert card["training"]["averaged_from"] == [a.identity(), b.identity()] and card["training"]["averaging"] == "a test"
    tumor = save_model(GUNETRpp(SMALL).eval(), dict(CARD, stage="tumor", labels=["background", "lesion"]), tmp_path / "t.ltsm")
    with pytest.raises(ModelFileError, match="stage, labels differ"):
        average_models([first, tumor], tmp_path / "bad.ltsm", note="")
    assert not (tmp_path / "bad.ltsm").exists()


def test_wrong_stage(saved):
    with pytest.raises(ModelFileError, match="'liver' model, but a 'tumor'"):
        load_model(saved[1], stage="tumor")


def test_missing(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.ltsm")


def test_truncated(saved, tmp_path):
    bad = tmp_path / "cut.ltsm"
    bad.write_bytes(saved[1].read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(bad)


def test_not_a_model_file(tmp_path):
    junk = tmp_path / "junk.ltsm"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not weights" * 10)
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(junk)
    other = tmp_path / "other.ltsm"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(ModelFileError, match="not a LiverTumorSeg model"):
        load_model(other)


def test_tampered_weights(saved, tmp_path):
    data = bytearray(saved[1].read_bytes())
    data[-100] ^= 0xFF
    bad = tmp_path / "tampered.ltsm"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(bad)


def test_card_does_not_match_weights(saved, tmp_path):
    from safetensors import safe_open

    with safe_open(str(saved[1]), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    card = json.loads(meta["card"])
    card["net"]["dims"] = [16, 32, 64, 128]
    meta["card"] = json.dumps(card)
    bad = tmp_path / "mismatch.ltsm"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(ModelFileError, match="do not match the network"):
        load_model(bad)


@pytest.mark.parametrize("change", [{"heads": 0}, {"tile": [0, 0, 0]}, {"tile": [32, 64]}, {"dims": [12, 24, 48, -96]},
                                    {"depths": [1, 1, 1, 1.5]}, {"attn_dropout": 1.5}])
def test_a_card_with_an_impossible_network_is_refused(saved, tmp_path, change):
    """One clear message, not a division by zero or a page of state_dict mismatches."""
    bad = tmp_path / "edited.ltsm"
    shutil.copy(saved[1], bad)
    update_card(bad, net={**read_card(bad)["net"], **change})
    with pytest.raises(ModelFileError, match="network, preprocessing") as refused:
        load_model(bad)
    assert "\n" not in str(refused.value)


def test_weights_holding_nan_are_refused(saved, tmp_path):
    """A diverged training run saves NaN weights with a matching checksum: they would give an empty result."""
    from safetensors import safe_open

    from LiverTumorSegLib.modelfile import weights_sha256

    with safe_open(str(saved[1]), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k, v in state.items() if v.is_floating_point())[3]
    state[name] = torch.full_like(state[name], float("nan"))
    meta["weights_sha256"] = weights_sha256(state)
    bad = tmp_path / "diverged.ltsm"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(ModelFileError, match=f"NaN or infinite values \\(first: {name}\\)"):
        load_model(bad)


def test_unknown_model_name():
    with pytest.raises(ModelFileError, match="Unknown model"):
        model_files("no-such-model")


def test_bundled_tumor_card_names_the_bundled_liver_model():
    """The bundled tumor stage learned on masks of the bundled liver stage's weights, and says so."""
    liver_path, tumor_path = model_files("phantom-small")
    liver, tumor = load_model(liver_path, stage="liver"), load_model(tumor_path, stage="tumor")
    assert tumor.card["training"]["liver_masks_from"]["weights_sha256"] == liver.weights_sha256


def test_bundled_cards_say_what_they_were_trained_on_and_hold_fp16_weights():
    from safetensors import safe_open

    for path in model_files("phantom-small"):
        card = read_card(path)
        assert "NOT FOR CLINICAL USE" in card["intended_use"] and "synthetic phantoms" in card["intended_use"]
        assert "not an independent estimate" in card["intended_use"]  # 3D-IRCADb 1.1 helped choose
        assert "scripts/train_bundled.py" in card["training"]["reproduce"]
        assert peek_card(path) == card  # the torch-free reader sees the same card
        with safe_open(str(path), framework="pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert torch.float16 in dtypes and not dtypes & {torch.float32, torch.float64, torch.bfloat16}
    # one recipe made the pair: both cards tell the same way to rerun it (train_bundled.py's REPRODUCE)
    assert len({read_card(path)["training"]["reproduce"] for path in model_files("phantom-small")}) == 1


def test_summary_and_docs_quote_the_bundled_cards():
    """The figures users read (panel, `models`, README, BENCHMARKS) are the ones measured into the cards."""
    from conftest import REPO

    metrics = read_card(model_files("phantom-small")[1])["metrics"]
    phantoms, ircad = metrics["fresh_phantoms"], metrics["ircad_1_1"]
    low, high = phantoms["tumor_after_filter_dice_per_case_ci95"]
    figures = [f"{phantoms['tumor_after_filter_dice_per_case_mean']:.3f}", f"{low:.3f}-{high:.3f}",
               f"{phantoms['liver_dice_per_case_mean']:.3f}", f"{ircad['liver_dice']:.3f}",
               f"{ircad['tumor_dice_after_filter']:.3f}"]
    summary = model_summary("phantom-small")
    assert "NOT FOR CLINICAL USE" in summary and f"{phantoms['cases']} synthetic test phantoms" in summary
    for text in (summary, (REPO / "README.md").read_text(encoding="utf-8"), (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")):
        assert [f for f in figures if f not in text] == []


def test_summary_of_a_model_without_measured_figures(tmp_path):
    for path in model_files("phantom-small"):
        shutil.copyfile(path, tmp_path / path.name)
        update_card(tmp_path / path.name, metrics={})
    assert model_summary(tmp_path).endswith("Its cards hold no measured figures.")


def test_peek_card_refuses_a_truncated_file(saved, tmp_path):
    bad = tmp_path / "cut.ltsm"
    bad.write_bytes(saved[1].read_bytes()[:20])
    with pytest.raises(ModelFileError, match="no readable model card"):
        peek_card(bad)
    assert peek_card(saved[1]) == read_card(saved[1])


@pytest.mark.parametrize("fields", [{"inference": {"threshold": 2.0}}, {"inference": {"step": 0}},
                                    {"preprocessing": {"resample": {"mode": "spacing", "spacing": [-4, 2.5, 2.5]}}},
                                    {"preprocessing": {"resample": {"mode": "spacing", "spacing": [0, 2.5, 2.5]}}},
                                    {"preprocessing": {"resample": {"mode": "spacing", "spacing": [4, 2.5, 2.5]},
                                                       "hu_window": ["-250", 250]}}])
def test_a_card_with_settings_inference_cannot_follow_is_refused(saved, tmp_path, fields):
    """The checksum covers the weights only: an edited card is checked on its own (an empty result,
    or a division by zero, would follow)."""
    bad = tmp_path / "edited.ltsm"
    shutil.copy(saved[1], bad)
    update_card(bad, **fields)
    with pytest.raises(ModelFileError, match="invalid"):
        load_model(bad)
