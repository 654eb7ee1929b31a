import math

import pytest
import torch

from stages.lib.augment import BatchAugment
from stages.lib.params import AugmentParams

NONE = dict(rotation=0, crop_scale=1, hflip=0, brightness=0, contrast=0, gamma=0, noise=0, blur=0)


def augment(seed=0, **kw):
    module = BatchAugment(AugmentParams(**{**NONE, **kw}), torch.Generator().manual_seed(seed))
    return module.train()


def batch(n=8, c=1, size=16, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_no_augmentation_is_the_identity_and_eval_mode_too():
    x = batch()
    assert torch.equal(augment()(x), x)
    assert torch.equal(augment(rotation=30, brightness=0.5).eval()(x), x)


def test_flip_always_mirrors_every_image():
    x = batch()
    assert torch.allclose(augment(hflip=1.0)(x), x.flip(-1), atol=1e-5)


def test_each_image_gets_its_own_parameters():
    x = batch(1).expand(16, -1, -1, -1).contiguous()  # one image, sixteen times
    out = augment(rotation=20, crop_scale=0.6, brightness=0.3, contrast=0.3)(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    distinct = {tuple(o.flatten()[:20].tolist()) for o in out}
    assert len(distinct) == 16


def test_crop_zooms_in_within_the_requested_area():
    thetas = augment(crop_scale=0.5).thetas(2000)
    area = thetas[:, 0, 0] * thetas[:, 1, 1]  # sx * sy with no rotation
    assert area.min() >= 0.5 - 1e-6 and area.max() <= 1 + 1e-6
    reach = thetas[:, :, 2].abs() + thetas[:, [0, 1], [0, 1]].abs()
    assert reach.max() <= 1 + 1e-6  # the crop stays inside the image


def test_rotation_angles_stay_within_the_limit():
    thetas = augment(rotation=10).thetas(2000)
    angle = torch.rad2deg(torch.atan2(thetas[:, 1, 0], thetas[:, 1, 1]))
    assert angle.abs().max() <= 10 + 1e-4 and angle.abs().max() > 9
    assert math.isclose(float(angle.mean()), 0, abs_tol=0.5)


def test_brightness_and_contrast_factors_follow_the_params():
    x = torch.full((500, 1, 4, 4), 0.5)
    out = augment(brightness=0.2)(x)
    factor = out.mean(dim=(1, 2, 3)) / 0.5
    assert 0.8 - 1e-5 <= factor.min() < 0.85 and 1.15 < factor.max() <= 1.2 + 1e-5
    flat = augment(contrast=0.9)(x)  # a flat image has no contrast to change
    assert torch.allclose(flat, x)


def test_same_generator_seed_same_batch():
    x = batch()
    kw = dict(rotation=10, crop_scale=0.8, brightness=0.2, contrast=0.2, autocontrast=0.5)
    assert torch.equal(augment(3, **kw)(x), augment(3, **kw)(x))
    assert not torch.equal(augment(3, **kw)(x), augment(4, **kw)(x))


@pytest.mark.parametrize("channels", [1, 3])
def test_autocontrast_and_sharpness_keep_shape(channels):
    x = batch(c=channels) * 0.5
    out = augment(autocontrast=1.0)(x)
    assert out.shape == x.shape
    assert torch.allclose(out.amax(dim=(2, 3)), torch.ones(8, channels))
    assert augment(sharpness=1.0, contrast=0.2)(x).shape == x.shape
