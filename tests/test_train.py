import json
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages import evaluate, train
from stages.lib import metrics, runtime, training
from stages.lib.checkpoint import load_checkpoint
from stages.lib.inference import load_model, predict
from stages.lib.io import read_result, write_json
from stages.lib.labels import LABEL_SEPARATOR
from stages.lib.models import build_model
from stages.lib.optim import class_weights
from stages.lib.params import AugmentParams, EvaluateParams, ModelParams, TrainParams
from tests.conftest import BIN, model_meta, write_params

NO_AUG = AugmentParams(
    rotation=0, crop_scale=1.0, brightness=0, contrast=0, gamma=0, noise=0, blur=0
)


def recipe(
    params: TrainParams, aug: AugmentParams = NO_AUG, freeze_epochs: int = 0
) -> training.Recipe:
    """The recipe `training.fit` takes: a from-scratch resnet10t with these train params."""
    model = ModelParams(pretrained=False, name="resnet10t", freeze_epochs=freeze_epochs)
    return training.Recipe(model, params, aug)


def plain(**changes) -> TrainParams:
    """Train params without the default's weight average and BN recomputation: the tests here
    are about the raw training loop (those two have theirs in test_robust)."""
    return TrainParams(**({"ema": 0.0, "precise_bn": 0} | changes))


CHEST14 = [f"finding{k:02d}" for k in range(14)]


def test_class_weights_are_inverse_frequency():
    weights = class_weights(np.array([0, 0, 0, 1]), 2)
    assert torch.allclose(weights, torch.tensor([4 / 6, 2.0]))


def test_policy_transform_keeps_shape_and_dtype():
    transform = training.build_transform(AugmentParams(policy="trivialaugment", hflip=0.5))
    img = torch.randint(0, 255, (1, 32, 32), dtype=torch.uint8)
    out = transform(img)
    assert out.shape == (1, 32, 32) and out.dtype == torch.uint8
    assert training.build_transform(AugmentParams()) is None  # the rest runs on whole batches


def test_loader_gathers_whole_batches_with_a_policy():
    images = np.arange(10 * 8 * 8, dtype=np.uint8).reshape(10, 8, 8, 1)
    dataset = training.ArrayDataset(
        images, np.arange(10), training.build_transform(AugmentParams())
    )
    x, y = dataset.__getitems__([3, 1])
    assert x.shape == (2, 1, 8, 8) and torch.equal(x[1, 0], torch.from_numpy(images[1, :, :, 0]))
    assert y.tolist() == [3, 1]
    policy = training.build_transform(AugmentParams(policy="randaugment"))
    loader = training.build_loader(
        training.ArrayDataset(images, np.arange(10), policy),
        plain(batch_size=4),
        torch.Generator().manual_seed(0),
        runtime.DistInfo(),
        False,
    )
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 1, 8, 8)] * 2  # last partial dropped
    assert all(x.dtype == torch.uint8 for x, _ in batches)


def test_freeze_leaves_only_the_head_trainable():
    model = build_model(ModelParams(pretrained=False, name="resnet10t"), 3, 1)
    training.set_trainable(model, head_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    training.set_trainable(model, head_only=False)
    assert all(p.requires_grad for p in model.parameters())


def separable_data(n=96, size=16, seed=0):
    """Class 1 has a bright square: a model must learn it within a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 80, (n, size, size, 1)).astype(np.uint8)
    x[y == 1, 4:12, 4:12] = 220
    return x, y


def multilabel_data(n=96, size=16, seed=0, k=len(CHEST14)):
    """Label j lights up cell j of a 4x4 grid; each label present with p = 0.3."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.float32)
    x = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
    cell = size // 4
    for j in range(k):
        r, c = divmod(j, 4)
        x[y[:, j] == 1, r * cell + 1 : (r + 1) * cell - 1, c * cell + 1 : (c + 1) * cell - 1] = 230
    return x, y


def write_processed(root: Path, classes: list[str], multilabel: bool = False, n: int = 48) -> Path:
    """A data/processed folder as the preprocess stage writes it, from generated arrays."""
    out = root / "data/processed"
    out.mkdir(parents=True)
    for i, split in enumerate(("train", "val", "test")):
        if multilabel:
            x, y = multilabel_data(n if split == "train" else n // 2, seed=i)
            labels = [LABEL_SEPARATOR.join(np.array(classes)[row == 1]) for row in y]
        else:
            x, y = separable_data(n if split == "train" else n // 2, seed=i)
            labels = list(np.array(classes)[y])
        np.save(out / f"{split}_images.npy", x)
        frame = pd.DataFrame({"image": [f"img{j}.png" for j in range(len(x))], "label": labels})
        frame.assign(patient_id=frame["image"]).to_csv(out / f"{split}.csv", index=False)
    meta = {
        "classes": classes,
        "task": "multilabel" if multilabel else ("binary" if len(classes) == 2 else "multiclass"),
        "dataset": "fixture",
        "preprocess": {"size": 16, "channels": 1},
        "mean": [0.3],
        "std": [0.3],
    }
    write_json(out / "meta.json", meta)
    return out


def test_fit_learns_a_separable_task_and_is_deterministic():
    meta = model_meta(["a", "b"])
    params = plain(epochs=4, batch_size=16, lr=0.01, patience=4, warmup_epochs=0)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(ModelParams(pretrained=False, name="resnet10t"), 2, 1)
        state, history = training.fit(
            model, separable_data(), separable_data(seed=1), meta, recipe(params)
        )
        results.append(history)
    assert results[0][-1]["val_accuracy"] > 0.9
    assert [r["val_loss"] for r in results[0]] == [r["val_loss"] for r in results[1]]
    assert set(state) == set(model.state_dict())


def test_train_json_is_rewritten_after_every_epoch(tmp_path, monkeypatch):
    """The live view: metrics/train.json holds the run so far after each epoch."""
    processed = write_processed(tmp_path, ["a", "b"])
    metrics_file = tmp_path / "metrics/train.json"
    seen = []
    real_fit = training.fit

    def spying_fit(*args, context):
        def spy(rows):
            context.on_epoch(rows)
            seen.append(read_result(metrics_file)["epochs_run"])

        return real_fit(*args, context=replace(context, on_epoch=spy))

    monkeypatch.setattr(train, "fit", spying_fit)
    params = plain(epochs=3, batch_size=16, patience=3, warmup_epochs=0)
    out = {k: tmp_path / k for k in ("model.pt", "plots", "last.pt", "dvclive")}
    train.run(
        ModelParams(pretrained=False, name="resnet10t"),
        params,
        NO_AUG,
        processed,
        train.TrainOutputs(
            out["model.pt"], metrics_file, out["plots"], out["last.pt"], out["dvclive"]
        ),
    )
    assert seen == [1, 2, 3]
    summary = read_result(metrics_file)
    assert summary["epochs_run"] == 3 and summary["train_seconds"] > 0


def test_freeze_then_unfreeze_moves_the_backbone_only_after_freeze_epochs():
    meta = model_meta(["a", "b"])
    snapshots = []
    for epochs in (1, 2):
        torch.manual_seed(0)
        model = build_model(ModelParams(pretrained=False, name="resnet10t"), 2, 1)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        params = plain(epochs=epochs, batch_size=16, warmup_epochs=0, unfreeze_lr_factor=0.1)
        train_set, val_set = separable_data(48), separable_data(24, seed=1)
        training.fit(model, train_set, val_set, meta, recipe(params, freeze_epochs=1))
        snapshots.append((start, model.state_dict()))
    (start1, end1), (start2, end2) = snapshots
    assert torch.equal(start1["layer1.0.conv1.weight"], end1["layer1.0.conv1.weight"])
    assert not torch.equal(start1["fc.weight"], end1["fc.weight"])
    assert not torch.equal(start2["layer1.0.conv1.weight"], end2["layer1.0.conv1.weight"])


def test_balanced_sampler_fills_batches_evenly():
    targets = np.array([0] * 60 + [1] * 6)
    dataset = training.ArrayDataset(np.zeros((66, 8, 8, 1), np.uint8), targets, torch.nn.Identity())
    params = plain(batch_size=6, sampler="balanced")
    loader = training.build_loader(
        dataset, params, torch.Generator().manual_seed(0), runtime.DistInfo(), False
    )
    drawn = torch.cat([y for _, y in loader]).numpy()
    assert len(drawn) == 66 and 0.35 < drawn.mean() < 0.65  # minority is 9% of the images


def test_grad_clip_bounds_the_sgd_step():
    meta = model_meta(["a", "b"])
    params = plain(
        epochs=1, batch_size=16, optimizer="sgd", lr=0.1, weight_decay=0, momentum=0,
        warmup_epochs=0, scheduler="none", grad_clip=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(ModelParams(pretrained=False, name="resnet10t"), 2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    training.fit(model, separable_data(48), separable_data(24, seed=1), meta, recipe(params))
    steps = 48 // 16
    change = max(
        (p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before, strict=True)
    )
    assert 0 < change <= steps * 0.1 * 1e-6 * 1.01


def test_multilabel_fixture_trains_with_bce_and_scores_macro_auc(in_tmp):
    processed = write_processed(in_tmp, CHEST14, multilabel=True, n=96)
    params = plain(
        epochs=4, batch_size=16, lr=0.01, warmup_epochs=0, monitor="val_roc_auc", patience=4
    )
    line = train.run(
        ModelParams(pretrained=False, name="resnet10t"), params, NO_AUG, processed_dir=processed
    )
    assert "val_roc_auc" in line
    history = pd.read_csv(in_tmp / "plots/train/history.csv")
    auc = history["val_roc_auc"]
    assert auc.notna().all() and auc.max() > 0.75 and auc.max() > auc[0]  # it learns
    loaded = load_model(in_tmp / "models/model.pt", "cpu")
    model, meta = loaded.net, loaded.meta
    assert meta.task == "multilabel" and meta.classes == CHEST14
    x, y = multilabel_data(64, seed=2)
    probs = predict(model, x, meta, 64, torch.device("cpu"))
    assert probs.shape == (64, 14)
    scores = metrics.summarize_multilabel(y, probs)
    assert scores["roc_auc"] > 0.75 and 0 <= scores["f1_macro"] <= 1
    # and the evaluate stage scores it per label
    evaluate.run(EvaluateParams(bootstrap=20, latency_runs=1), processed_dir=processed)
    result = read_result(in_tmp / "metrics/evaluate.json")
    assert set(result["per_class"]) == set(CHEST14) and result["roc_auc"] > 0.75


def test_early_stopping_ends_after_patience_and_keeps_the_best_epoch(monkeypatch):
    losses = iter([0.5, 0.3, 0.4, 0.35, 0.2, 0.1, 0.1, 0.1])  # scripted validation losses
    monkeypatch.setattr(
        training, "validate", lambda *a: {"loss": next(losses), "f1_macro": 0.5, "accuracy": 0.5}
    )
    meta = model_meta(["a", "b"])
    params = plain(epochs=8, batch_size=16, warmup_epochs=0, patience=2, monitor="val_loss")
    model = build_model(ModelParams(pretrained=False, name="resnet10t"), 2, 1)
    data = separable_data(32)
    _, history = training.fit(model, data, data, meta, recipe(params))
    # lower val_loss is better: epoch 2 is best; epochs 3 and 4 do not beat it -> stop after 4
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert [bool(row.get("best")) for row in history] == [True, True, False, False]


def test_summarize_multilabel_on_known_values():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
    perfect = metrics.summarize_multilabel(y, y * 0.8 + 0.1)
    assert perfect["roc_auc"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["f1_macro"] == 1
    flipped = metrics.summarize_multilabel(y, 1 - y)
    assert flipped["roc_auc"] == 0.0 and flipped["accuracy"] == 0.0


def deterministic_outputs(root: Path) -> tuple[dict, pd.DataFrame, dict]:
    """train.json and history without timings, and the weights: what must not vary."""
    summary = read_result(root / "metrics/train.json")
    for key in train.TIMING_KEYS:
        summary.pop(key)
    history = pd.read_csv(root / "plots/train/history.csv")
    history = history.drop(columns=["images_per_second", "epoch_seconds"])
    weights = torch.load(root / "models/model.pt", weights_only=True)["state_dict"]
    return summary, history, weights


def assert_same_outputs(a: Path, b: Path) -> None:
    summary_a, history_a, weights_a = deterministic_outputs(a)
    summary_b, history_b, weights_b = deterministic_outputs(b)
    assert summary_a == summary_b
    pd.testing.assert_frame_equal(history_a, history_b, check_exact=True)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


TRAIN_OVERRIDE = {
    "augment": {"policy": "trivialaugment"},  # random ops: RNG state must be restored too
    "train": {"epochs": 4, "patience": 4, "batch_size": 16, "scheduler": "plateau"},
    "model": {"dropout": 0.2},
}


def medpipe_train(root: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [f"{BIN}/medpipe", "train"], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_in_process(root: Path) -> None:
    """`medpipe train` in this process, on `root`'s params.yaml and folders."""
    from stages.lib.params import load_params

    p = load_params(root / "params.yaml")
    outputs = train.TrainOutputs(
        root / "models/model.pt", root / "metrics/train.json", root / "plots/train",
        root / "models/last.pt", root / "dvclive",
    )  # fmt: skip
    train.run(p.model, p.train, p.augment, root / "data/processed", outputs)


def fixture_project(root: Path) -> Path:
    write_processed(root, ["a", "b"])
    write_params(root / "params.yaml", TRAIN_OVERRIDE)
    return root


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run on the two-class fixture."""
    root = fixture_project(tmp_path_factory.mktemp("reference"))
    train_in_process(root)
    return root


def test_two_runs_give_identical_metrics_and_weights(reference_run, tmp_path):
    train_in_process(fixture_project(tmp_path))
    assert_same_outputs(reference_run, tmp_path)


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)
def test_killed_run_resumes_to_the_same_result(reference_run, tmp_path, subprocess_env, sig):
    fixture_project(tmp_path)
    last = tmp_path / "models/last.pt"
    proc = subprocess.Popen(
        [f"{BIN}/medpipe", "train"], cwd=tmp_path, env=subprocess_env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)  # right after the first epoch's checkpoint appeared
    proc.wait(timeout=60)
    state = torch.load(last, weights_only=True)
    assert not state["finished"] and 1 <= state["epoch"] < 4, "killed too late to test resume"
    assert not (tmp_path / "models/model.pt").exists()
    if sig == signal.SIGTERM:  # handled: temporary outputs are removed on the way out
        assert proc.returncode == 128 + signal.SIGTERM
        assert [p.name for p in (tmp_path / "plots").iterdir()] == []
    again = medpipe_train(tmp_path, subprocess_env)
    assert f"resuming from models/last.pt after epoch {state['epoch']}" in again.stdout
    assert_same_outputs(reference_run, tmp_path)
    assert torch.load(last, weights_only=True)["finished"]


def test_stale_resume_checkpoint_is_ignored_and_removed(tmp_path):
    path = tmp_path / "last.pt"
    runtime.save_resume(path, {"fingerprint": "old", "finished": False, "epoch": 1})
    assert runtime.load_resume(path, "old") is not None
    assert runtime.load_resume(path, "new") is None and not path.exists()
    runtime.save_resume(path, {"fingerprint": "same", "finished": True})
    assert runtime.load_resume(path, "same") is None  # a finished run trains afresh


def test_fingerprint_tracks_params_data_and_code(tmp_path):
    data, code = tmp_path / "train.csv", tmp_path / "train.py"
    data.write_text("a")
    code.write_text("x = 1")
    base = runtime.fingerprint({"lr": 0.1}, [data], [code])
    assert base == runtime.fingerprint({"lr": 0.1}, [data], [code])
    assert base != runtime.fingerprint({"lr": 0.2}, [data], [code])
    data.write_text("b")
    assert base != runtime.fingerprint({"lr": 0.1}, [data], [code])


@pytest.mark.slow
def test_compile_trains_and_keeps_plain_weight_names():
    meta = model_meta(["a", "b"])
    params = plain(epochs=1, batch_size=16, warmup_epochs=0, compile=True)
    torch.manual_seed(0)
    model = build_model(ModelParams(pretrained=False, name="resnet10t"), 2, 1)
    state, history = training.fit(
        model, separable_data(48), separable_data(24, 16, 1), meta, recipe(params)
    )
    assert set(state) == set(
        build_model(ModelParams(pretrained=False, name="resnet10t"), 2, 1).state_dict()
    )
    assert np.isfinite(history[0]["train_loss"])


def test_pretrained_run_normalises_with_the_weights_statistics(in_tmp):
    processed = write_processed(in_tmp, ["a", "b"])
    torch.manual_seed(1)
    torch.save(
        build_model(ModelParams(pretrained=False, name="resnet10t"), 1000, 3).state_dict(), "w.pth"
    )
    model_params = ModelParams(name="resnet10t", pretrained=True, weights="w.pth")
    params = plain(epochs=1, batch_size=16, warmup_epochs=0)
    train.run(model_params, params, NO_AUG, processed_dir=processed)
    meta = load_checkpoint(in_tmp / "models/model.pt").meta
    # ImageNet mean/std averaged over RGB for gray input, not the dataset's 0.3/0.3
    assert meta.mean == [0.449] and meta.std == [0.226]
    assert meta.weights_source == "w.pth"


def test_loader_workers_do_not_change_the_trained_weights():
    """Augmentation has its own generator: prefetching workers draw nothing from it."""
    meta = model_meta(["a", "b"])
    aug = AugmentParams(rotation=10, crop_scale=0.8, brightness=0.2, contrast=0.2)
    weights = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = build_model(ModelParams(pretrained=False, name="resnet10t"), 2, 1)
        params = plain(epochs=1, batch_size=8, warmup_epochs=0, num_workers=workers)
        training.fit(
            model, separable_data(64), separable_data(16, seed=1), meta, recipe(params, aug)
        )
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_train_json_records_the_hardware_and_deterministic_switch(tmp_path, monkeypatch):
    """A reviewer sees which machine produced a run (results move across CPUs)."""
    processed = write_processed(tmp_path, ["a", "b"])
    metrics_file = tmp_path / "metrics/train.json"
    params = plain(epochs=1, batch_size=16, warmup_epochs=0, deterministic=True)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on: seen.append(on))
    seen: list[bool] = []
    out = {k: tmp_path / k for k in ("model.pt", "plots", "last.pt", "dvclive")}
    train.run(
        ModelParams(pretrained=False, name="resnet10t"), params, NO_AUG, processed,
        train.TrainOutputs(
            out["model.pt"], metrics_file, out["plots"], out["last.pt"], out["dvclive"]
        ),
    )  # fmt: skip
    assert seen == [True]
    hardware = json.loads(metrics_file.read_text())["hardware"]  # headline: diffs show it
    assert hardware["torch"] == torch.__version__ and hardware["threads"] >= 1
    assert hardware["cpu"] and hardware["cpu_capability"]
