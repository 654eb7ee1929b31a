import numpy as np
import torch

from stages import train
from stages.models import build_model
from stages.optim import class_weights
from stages.params import AugmentParams, ModelParams, TrainParams


def test_class_weights_are_inverse_frequency():
    weights = class_weights(np.array([0, 0, 0, 1]), 2)
    assert torch.allclose(weights, torch.tensor([4 / 6, 2.0]))


def test_transform_keeps_shape_and_dtype():
    transform = train.build_transform(AugmentParams(policy="trivialaugment", hflip=0.5), 32)
    img = torch.randint(0, 255, (1, 32, 32), dtype=torch.uint8)
    out = transform(img)
    assert out.shape == (1, 32, 32) and out.dtype == torch.uint8


def test_freeze_leaves_only_the_head_trainable():
    model = build_model(ModelParams(name="resnet10t"), 3, 1)
    train.set_trainable(model, head_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    train.set_trainable(model, head_only=False)
    assert all(p.requires_grad for p in model.parameters())


def separable_data(n=96, size=16, seed=0):
    """Class 1 has a bright square: a model must learn it within a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 80, (n, size, size, 1)).astype(np.uint8)
    x[y == 1, 4:12, 4:12] = 220
    return x, y


def test_fit_learns_a_separable_task_and_is_deterministic():
    meta = {"classes": ["a", "b"], "mean": [0.3], "std": [0.3]}
    params = TrainParams(epochs=4, batch_size=16, lr=0.01, patience=4, warmup_epochs=0)
    aug = AugmentParams(rotation=0, crop_scale=1.0, brightness=0, contrast=0)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(ModelParams(name="resnet10t"), 2, 1)
        state, history = train.fit(
            model, separable_data(), separable_data(seed=1), meta, params, aug, freeze_epochs=0
        )
        results.append(history)
    assert results[0][-1]["val_accuracy"] > 0.9
    assert [r["val_loss"] for r in results[0]] == [r["val_loss"] for r in results[1]]
    assert set(state) == set(model.state_dict())
