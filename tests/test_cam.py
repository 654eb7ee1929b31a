"""Grad-CAM plumbing (stages.cam) and the pointing game on toys whose CAM is known."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from stages.lib import cam
from tests.conftest import model_meta

META = model_meta(["a", "b"], "binary", [0.0], [1.0], input_size=32)


class SpotNet(nn.Module):
    """Activation = the image itself; class 1 = mean brightness, class 0 = its negative.

    Grad-CAM of class 1 on `features` is then the image (peak on the brightest spot) and
    Grad-CAM of class 0 is empty (all weights negative, clipped by the ReLU).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


def spots(n: int, inside: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dark images with one bright 3x3 spot; a 6x6 lesion mask around it (or far from it)."""
    images = np.full((n, 32, 32, 1), 20, np.uint8)
    masks = np.zeros((n, 32, 32), np.uint8)
    for i in range(n):
        r, c = rng.integers(4, 12, 2)
        images[i, r : r + 3, c : c + 3] = 250
        mr, mc = (r - 1, c - 1) if inside else (r + 14, c + 14)
        masks[i, mr : mr + 6, mc : mc + 6] = 1
    return images, masks


def test_pointing_game_scores_a_known_cam():
    rng = np.random.default_rng(0)
    hit_x, hit_m = spots(6, True, rng)
    miss_x, miss_m = spots(6, False, rng)
    images, masks = np.concatenate([hit_x, miss_x]), np.concatenate([hit_m, miss_m])
    model = SpotNet()
    name, layer = cam.find_target_layer(model, "auto")
    assert name == "features"  # no feature_info: the last block with a convolution
    cams = cam.compute_cams(
        model, images, META, np.ones(12, int), "gradcam", layer, 5, torch.device("cpu")
    )
    assert cams.shape == (12, 32, 32) and cams.max() == pytest.approx(1.0)
    summary, table = cam.pointing_game(cams, masks)
    assert summary["pointing_game"] == 0.5
    assert list(table["hit"]) == [True] * 6 + [False] * 6
    assert summary["pointing_chance"] == pytest.approx(36 / 1024, abs=1e-4)
    assert summary["cam_energy_in_mask"] > 36 / 1024  # the spot's energy lands in the lesion
    empty = cam.compute_cams(
        model, hit_x, META, np.zeros(6, int), "gradcam", layer, 5, torch.device("cpu")
    )
    summary, _ = cam.pointing_game(empty, hit_m)
    assert summary["pointing_game"] == 0.0 and summary["n_empty_cam"] == 6


def test_cam_peak_takes_the_middle_of_a_plateau():
    heat = np.zeros((8, 8), np.float32)
    heat[4:8, 4:8] = 1.0  # a coarse 2x2 map upsampled: one quadrant is flat at the maximum
    assert cam.cam_peak(heat) in {(5, 5), (5, 6), (6, 5), (6, 6)}
    heat[1, 2] = 2.0
    assert cam.cam_peak(heat) == (1, 2)


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("resnet18", 224, "layer4"),
        ("resnet18", 128, "layer3"),  # layer4 would be 4 x 4
        ("resnet18", 64, "layer2"),  # layer4 would be 2 x 2, layer3 4 x 4
        ("resnet18", None, "layer4"),
        ("efficientnet_lite0", 224, "blocks.6"),
        ("mobilenetv3_large_100", 64, "blocks.2"),
        ("resnet10t", 8, "act1"),  # nothing reaches 7 x 7: the finest stage
    ],
)
def test_auto_target_layer_is_deepest_stage_with_a_usable_map(name, size, expected):
    model = timm.create_model(name, num_classes=2, in_chans=1)
    assert cam.find_target_layer(model, "auto", size)[0] == expected
    assert cam.find_target_layer(model, expected)[1] is model.get_submodule(expected)


def test_unknown_target_layer_lists_the_stages():
    model = timm.create_model("resnet10t", num_classes=2, in_chans=1)
    with pytest.raises(ValueError, match="layer3"):
        cam.find_target_layer(model, "layer9")


def test_overlay_draws_heat_and_lesion_outline():
    image = np.full((32, 32, 1), 100, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 1
    tile = cam.overlay(image, np.random.default_rng(0).random((32, 32)).astype(np.float32), mask)
    assert tile.shape == (cam.TILE, cam.TILE, 3) and tile.dtype == np.uint8
    green = (tile[..., 1] == 255) & (tile[..., 0] == 0) & (tile[..., 2] == 0)
    assert green.sum() > 50  # the lesion outline is drawn
