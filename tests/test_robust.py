"""Robust training options and the shifted test site: each option changes training as stated,
and the val/test shift flag fires on a shifted test set only."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from stages import train
from stages.lib import shift, training
from stages.lib.augment import BatchAugment
from stages.lib.checkpoint import load_checkpoint
from stages.lib.inference import load_model, predict
from stages.lib.io import read_result
from stages.lib.models import Ensemble, build_model
from stages.lib.params import AugmentParams, ModelParams, SyntheticParams, TrainParams
from stages.lib.sources import synthetic
from tests.conftest import model_meta, write_params
from tests.test_train import (
    NO_AUG,
    assert_same_outputs,
    separable_data,
    train_in_process,
    write_processed,
)

# --- the shifted synthetic default ---------------------------------------------------------


@pytest.fixture(scope="module")
def sites():
    return synthetic.generate(SyntheticParams(n_patients=60, image_size=(96, 120), seed=2))


def test_test_site_patients_are_the_test_split_and_the_rest_train(sites):
    _, _, frame = sites
    params = SyntheticParams()
    assert params.test_site == "site-c" and set(frame["site"]) == {"site-a", "site-b", "site-c"}
    source = frame["site"].map(lambda s: synthetic.source_split(params, s))
    assert (source[frame["site"] == "site-c"] == "test").all()
    assert (source[frame["site"] != "site-c"] == "train").all()
    assert frame.groupby("patient_id")["site"].nunique().max() == 1  # one site per patient
    no_holdout = params.model_copy(update={"test_site": None})
    assert synthetic.source_split(no_holdout, "site-c") == ""


def test_sites_get_their_share_and_their_own_case_mix():
    sites = (
        {"name": "x", "share": 3.0, "prevalence": (0.8, 0.1, 0.1)},
        {"name": "y", "share": 1.0, "prevalence": (0.1, 0.1, 0.8)},
    )
    params = SyntheticParams(n_patients=400, sites=sites, test_site="y")
    site, label = synthetic.patient_assignments(params)
    assert np.bincount(site).tolist() == [300, 100]
    assert (label[site == 0] == 0).mean() > 0.7 and (label[site == 1] == 2).mean() > 0.7
    for k in range(3):  # every class present at every site, for every split
        assert (label[site == 1] == k).sum() >= 2


def test_the_held_out_site_renders_the_same_chest_differently():
    params = SyntheticParams(n_patients=6, image_size=(128, 128))
    a, c = params.sites[0], params.sites[2]
    at_a = synthetic.render_patient(params, 0, "normal", a)[0].image.astype(float)
    at_c = synthetic.render_patient(params, 0, "normal", c)[0].image.astype(float)
    inner = (slice(30, 100), slice(30, 100))
    # site c: darker mid-tones (gamma 1.3, gain 0.85) and blurrier, coarser detector
    assert at_c[inner].mean() < at_a[inner].mean() - 10
    assert np.corrcoef(at_a[inner].ravel(), at_c[inner].ravel())[0, 1] > 0.5  # same anatomy
    again = synthetic.render_patient(params, 0, "normal", c)[0].image
    assert np.array_equal(again, at_c.astype(np.uint8))


def test_site_params_are_checked_with_clear_messages():
    with pytest.raises(ValueError, match="test_site: 'nowhere' is not a site"):
        SyntheticParams(test_site="nowhere")
    with pytest.raises(ValueError, match="prevalence needs 3 values"):
        SyntheticParams(sites=({"name": "x", "share": 1, "prevalence": (1.0,)},), test_site=None)
    with pytest.raises(ValueError, match="names must be distinct"):
        SyntheticParams(sites=({"name": "x", "share": 1},) * 2, test_site=None)


# --- the shift flag ------------------------------------------------------------------------


def scored(n_patients, rng, normal_called_abnormal=0.05):
    """Three classes, 2 images per patient; a model that calls a share of normals viral."""
    y = np.repeat(rng.integers(0, 3, n_patients), 2)
    probs = np.full((len(y), 3), 0.05)
    probs[np.arange(len(y)), y] = 0.9
    flip = (y == 0) & (rng.random(len(y)) < normal_called_abnormal)
    probs[flip] = [0.1, 0.1, 0.8]
    patients = np.repeat(np.arange(n_patients), 2).astype(str)
    return y, probs, patients


def test_shift_flag_fires_on_a_shifted_test_set_and_not_on_an_unshifted_one():
    rng = np.random.default_rng(0)
    classes = ["normal", "bacterial", "viral"]
    val = scored(300, rng)
    same = shift.compare_splits(val, scored(300, rng), classes, 400, 0)
    assert not same["shift"].any()
    shifted = shift.compare_splits(val, scored(300, rng, 0.4), classes, 400, 0)
    flagged = shifted[shifted["shift"]]
    assert ("normal", "sensitivity") in set(zip(flagged["class"], flagged["figure"], strict=True))
    row = shifted[(shifted["class"] == "normal") & (shifted["figure"] == "sensitivity")].iloc[0]
    assert row["val"] > 0.9 and row["test"] < 0.7 and row["difference_ci"][1] < 0
    assert "SHIFT" in shift.headline_text(shifted) and "no val/test shift" in (
        shift.headline_text(same)
    )


def test_a_figure_at_one_is_not_flagged_for_a_difference_chance_explains():
    """Val: no normal image among 500 called viral (viral specificity 1.000; its bootstrap
    interval is [1, 1]). Test: 8 of 850 (0.991). Fisher's exact p is about 0.03, not
    significant at the Bonferroni level: the bootstrap alone would flag it."""
    classes = ["normal", "bacterial", "viral"]

    def split(n_normal, n_wrong):
        y = np.array([0] * n_normal + [1] * 300 + [2] * 300)
        probs = np.full((len(y), 3), 0.05)
        probs[np.arange(len(y)), y] = 0.9
        probs[:n_wrong] = [0.1, 0.1, 0.8]  # normal called viral
        return y, probs, None

    table = shift.compare_splits(split(500, 0), split(850, 8), classes, 400, 0)
    row = table[(table["class"] == "viral") & (table["figure"] == "specificity")].iloc[0]
    assert row["val"] == 1.0 and row["val_ci"] == [1.0, 1.0]
    assert row["difference_ci"][1] < 0  # the collapsed bootstrap interval excludes 0
    assert row["score_ci"][0] < 0 < row["score_ci"][1] and not row["shift"]
    # the same difference with enough images is flagged: 0 of 5,000 against 80 of 8,500
    table = shift.compare_splits(split(5000, 0), split(8500, 80), classes, 200, 0)
    row = table[(table["class"] == "viral") & (table["figure"] == "specificity")].iloc[0]
    assert row["score_ci"][1] < 0 and row["shift"]


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 against 48/80,
    # difference 0.2, method 10 interval 0.0524 to 0.3339 (here test - val, so negated)
    assert shift.newcombe_interval((56, 70), (48, 80), 0.95) == [-0.3339, -0.0524]


def test_class_figures_match_direct_counts():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    figures = shift.class_figures(y, probs, np.ones((1, 6)), bins=10)
    assert figures["sensitivity"][0].tolist() == [0.5, 1.0, 0.5]
    # specificity of class 0: of the 4 non-normal images, 1 is called normal
    assert figures["specificity"][0, 0] == pytest.approx(0.75)
    assert figures["calibration_error"].min() >= 0 and figures["calibration_error"].max() < 1


# --- training options ----------------------------------------------------------------------


def fit(params: TrainParams, aug: AugmentParams = NO_AUG, model_params=None, validate=None):
    torch.manual_seed(0)
    model_params = model_params or ModelParams(pretrained=False, name="resnet10t")
    model = build_model(model_params, 2, 1)
    recipe = training.Recipe(model_params, params, aug)
    state, history = training.fit(
        model, separable_data(), separable_data(seed=1), model_meta(), recipe
    )
    return model, state, history


# the raw loop: the default weight average and BN recomputation off unless a test turns them on
BASE = dict(epochs=2, batch_size=16, lr=0.01, patience=5, warmup_epochs=0, ema=0.0, precise_bn=0)


def test_ema_weights_differ_from_raw_and_are_saved_when_they_validate_better(monkeypatch):
    seen: list[nn.Module] = []
    real = training.validate

    def scripted(model, *args):  # the averaged weights validate better, and better each epoch
        scores = real(model, *args)
        seen.append(model)
        return scores | {"f1_macro": len(seen) / 10 if len(seen) % 2 == 0 else 0.0}

    monkeypatch.setattr(training, "validate", scripted)
    model, state, history = fit(TrainParams(**{**BASE, "ema": 0.9}))
    raw, averaged = seen[-2], seen[-1]
    assert raw is model and averaged is not model
    assert all(row["weights"] == "ema" for row in history)
    assert "ema_val_f1_macro" in history[0] and "ema_val_loss" in history[0]
    differs = [not torch.equal(state[k], model.state_dict()[k]) for k in state]
    assert any(differs)  # the kept state is not the raw weights ...
    assert all(torch.equal(state[k], averaged.state_dict()[k]) for k in state)  # ... but EMA's


def test_raw_weights_are_kept_when_they_validate_better(monkeypatch):
    real, calls = training.validate, []

    def scripted(model, *args):
        calls.append(model)
        return real(model, *args) | {"f1_macro": len(calls) / 10 if len(calls) % 2 else 0.0}

    monkeypatch.setattr(training, "validate", scripted)
    model, state, history = fit(TrainParams(**{**BASE, "ema": 0.9}))
    assert all(row["weights"] == "raw" for row in history)
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in state)


def test_mixup_targets_are_soft_and_blend_two_labels():
    mix = training.build_mixup(AugmentParams(mixup=0.4), 8, 3, multilabel=False)
    np.random.seed(0)
    x = torch.rand(8, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, soft = mix(x.clone(), y)
    assert soft.shape == (8, 3) and torch.allclose(soft.sum(1), torch.ones(8))
    assert ((soft > 0) & (soft < 1)).any()  # not one-hot
    assert not torch.equal(mixed, x)
    assert training.build_mixup(AugmentParams(), 8, 3, False) is None
    with pytest.raises(ValueError, match="even batch"):
        training.build_mixup(AugmentParams(cutmix=1.0), 7, 3, False)


def test_mixup_trains_with_soft_targets():
    _, _, history = fit(TrainParams(**BASE), NO_AUG.model_copy(update={"mixup": 0.4}))
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)


def test_smoothed_monitor_keeps_a_run_going_that_improves_after_one_lucky_epoch(monkeypatch):
    def run(smoothing):
        # epoch 3 is a lucky spike; afterwards the model improves steadily, below it
        scores = iter([0.5, 0.55, 0.9, 0.6, 0.62, 0.64, 0.66, 0.68, 0.7, 0.72])
        monkeypatch.setattr(
            training, "validate", lambda *a: {"loss": 1.0, "f1_macro": next(scores)}
        )
        params = TrainParams(**{**BASE, "epochs": 10, "patience": 3}, monitor_smoothing=smoothing)
        return fit(params)[2]

    raw, smooth = run(0.0), run(0.8)
    # raw: nothing beats the spike -> stops 3 epochs after it; smoothed: the average keeps
    # rising with the trend, so the run goes on to the last epoch
    assert len(raw) == 6 and len(smooth) == 10
    assert [r["epoch"] for r in smooth if r.get("best")] == [1, 2, 3]  # best = raw value


def test_intensity_augmentation_changes_each_image_and_is_off_at_zero():
    x = torch.rand(6, 1, 24, 24, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    none = AugmentParams(
        rotation=0, crop_scale=1, brightness=0, contrast=0, gamma=0, noise=0, blur=0
    )
    off = BatchAugment(none, torch.Generator().manual_seed(0)).train()
    assert torch.equal(off(x), x)

    def aug(**kw):
        params = none.model_copy(update=kw)
        return BatchAugment(params, torch.Generator().manual_seed(0)).train()(x)

    gamma = aug(gamma=0.5)
    ratio = (gamma.log() / x.log()).mean(dim=(1, 2, 3))  # the per-image exponent
    assert ratio.min() >= math.exp(-0.5) - 1e-4 and ratio.max() <= math.exp(0.5) + 1e-4
    assert ratio.std() > 0.01  # each image its own curve
    noisy = aug(noise=0.1)
    assert (noisy - x).std() > 0.01 and noisy.min() >= 0 and noisy.max() <= 1
    blurred = aug(blur=2.0, blur_prob=1.0)
    assert blurred.diff(dim=-1).abs().mean() < x.diff(dim=-1).abs().mean() * 0.8


def test_drop_path_sets_stochastic_depth_and_refuses_models_without_it():
    model = build_model(ModelParams(pretrained=False, name="resnet10t", drop_path=0.2), 2, 1)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    with pytest.raises(ValueError, match=r"model\.drop_path: vgg11 has no stochastic depth"):
        build_model(ModelParams(pretrained=False, name="vgg11", drop_path=0.1), 2, 1)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenetv3_large_100"])
def test_every_family_starts_at_uniform_predictions(name):
    """timm's EfficientNet/MobileNet heads start with logits of sd ~7 for 3 classes; the
    zero head starts every family at loss ln K."""
    model = build_model(ModelParams(pretrained=False, name=name), 3, 1).train()
    logits = model(torch.randn(8, 1, 64, 64))
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert loss.item() == pytest.approx(math.log(3), abs=1e-5)


def upscaled(n, seed):
    """separable_data at 64 px (16 px maps shrink to 1 x 1 in an EfficientNet)."""
    x, y = separable_data(n, 16, seed)
    return np.repeat(np.repeat(x, 4, axis=1), 4, axis=2), y


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenetv3_large_100"])
def test_precise_bn_turns_a_chance_level_model_from_scratch_into_a_working_one(name):
    """Train loss near 0 but eval-mode accuracy at chance: the BN running averages lag the
    weights. Recomputed statistics (PreciseBN) give the model its train-mode accuracy."""

    def val_accuracy(precise_bn):
        torch.manual_seed(0)
        model = build_model(ModelParams(pretrained=False, name=name), 2, 1)
        params = TrainParams(
            epochs=2, batch_size=16, warmup_epochs=1, lr=0.002, precise_bn=precise_bn
        )
        recipe = training.Recipe(ModelParams(pretrained=False, name=name), params, NO_AUG)
        _, history = training.fit(model, upscaled(128, 0), upscaled(64, 1), model_meta(), recipe)
        assert history[-1]["train_loss"] < 0.2
        return history[-1]["val_accuracy"]

    assert val_accuracy(0) < 0.7 and val_accuracy(4) == 1.0


# --- ensembles -----------------------------------------------------------------------------


@pytest.mark.parametrize("multilabel", [False, True])
def test_ensemble_probabilities_are_the_members_mean(multilabel):
    torch.manual_seed(0)
    members = [build_model(ModelParams(pretrained=False, name="resnet10t"), 3, 1) for _ in range(3)]
    for m in members:  # zero heads would make every member uniform
        nn.init.normal_(m.get_classifier().weight, std=0.5)
    ensemble = Ensemble(members, multilabel).eval()
    x = torch.randn(4, 1, 32, 32)
    act = torch.sigmoid if multilabel else (lambda z: z.softmax(dim=1))
    with torch.no_grad():
        mean = torch.stack([act(m.eval()(x)) for m in members]).mean(0)
        assert torch.allclose(act(ensemble(x)), mean, atol=1e-5)
        features = ensemble.forward_head(ensemble.forward_features(x), pre_logits=True)
    assert features.shape == (4, 3 * members[0].num_features)


def ensemble_project(root):
    write_processed(root, ["a", "b"])
    override = {"train": {"epochs": 2, "batch_size": 16, "ensemble": 2, "warmup_epochs": 0}}
    write_params(root / "params.yaml", override)
    return root


def test_ensemble_is_saved_as_one_model_of_its_members_and_scored_as_their_mean(tmp_path):
    root = ensemble_project(tmp_path)
    train_in_process(root)
    loaded = load_model(root / "models/model.pt", "cpu")
    model, meta = loaded.net, loaded.meta
    assert isinstance(model, Ensemble) and meta.members == 2 and len(model.members) == 2
    a, b = (m.state_dict()["fc.weight"] for m in model.members)
    assert not torch.equal(a, b)  # two seeds, two models
    summary = read_result(root / "metrics/train.json")
    assert summary["members"] == 2 and 0 <= summary["ensemble_val_f1_macro"] <= 1
    history = pd.read_csv(root / "plots/train/history.csv")
    assert sorted(set(history["member"])) == [0, 1]
    images = np.load(root / "data/processed/test_images.npy")
    meta_members = [m.eval() for m in model.members]
    probs = predict(model, images, meta, 64, torch.device("cpu"))
    each = [predict(m, images, meta, 64, torch.device("cpu")) for m in meta_members]
    assert np.allclose(probs, np.mean(each, axis=0), atol=1e-5)


def test_killed_ensemble_continues_with_the_member_it_was_training(tmp_path, monkeypatch):
    reference = ensemble_project(tmp_path / "reference")
    train_in_process(reference)
    root = ensemble_project(tmp_path / "killed")
    real, calls = training.fit, []

    def dies_in_second_member(*args, **kwargs):
        calls.append((kwargs["context"].resume_extra or {}).get("member"))
        if calls[-1] == 1:
            raise KeyboardInterrupt  # killed while training member 1
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "fit", dies_in_second_member)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(root)
    saved = torch.load(root / "models/last.pt", weights_only=True)
    assert len(saved["members_done"]) == 1 and not saved["finished"]
    monkeypatch.setattr(train, "fit", real)
    calls.clear()
    monkeypatch.setattr(
        train, "fit", lambda *a, **k: calls.append(k["context"].resume_extra) or real(*a, **k)
    )
    train_in_process(root)
    assert [c["member"] for c in calls] == [1]  # member 0 was not trained again
    assert_same_outputs(reference, root)


def test_an_ensemble_exports_as_one_model_that_matches_pytorch(tmp_path):
    from stages import export
    from stages.lib.models import save_checkpoint
    from stages.lib.params import ExportParams
    from tests.conftest import tiny_processed

    processed, single = tiny_processed(tmp_path, "multiclass", ["a", "b", "c"], n=8)
    meta = load_checkpoint(single).meta
    torch.manual_seed(0)
    members = [build_model(ModelParams(pretrained=False, name="resnet10t"), 3, 1) for _ in range(2)]
    for m in members:
        nn.init.normal_(m.get_classifier().weight, std=0.5)
    checkpoint = tmp_path / "ensemble.pt"
    save_checkpoint(
        checkpoint, Ensemble(members), meta.__class__(**{**meta.to_dict(), "members": 2})
    )
    line = export.run(
        ExportParams(check_images=8), processed, checkpoint, tmp_path / "model.ts",
        tmp_path / "model.onnx", tmp_path / "export.json",
    )  # fmt: skip
    result = read_result(tmp_path / "export.json")
    assert result["onnx_max_abs_diff"] < 1e-4 and result["torchscript_max_abs_diff"] < 1e-4
    assert "model.onnx" in line
