import numpy as np
import pandas as pd
import pytest

from stages import preprocess
from stages.lib import images, io
from stages.lib.params import PreprocessParams


def framed_image() -> np.ndarray:
    img = np.zeros((120, 100), np.uint8)
    rng = np.random.default_rng(0)
    img[20:100, 10:90] = rng.integers(60, 200, (80, 80))
    return img


def test_content_box_finds_the_non_black_region():
    assert images.content_box(framed_image(), 12) == (20, 100, 10, 90)


def test_content_box_keeps_whole_image_when_nothing_to_crop():
    assert images.content_box(np.zeros((50, 40), np.uint8), 12) == (0, 50, 0, 40)


@pytest.mark.parametrize("how", ["none", "global", "clahe"])
def test_equalize_keeps_shape_and_type(how):
    img = framed_image()
    out = images.equalize(img, how, 2.0, 8)
    assert out.shape == img.shape and out.dtype == np.uint8
    if how == "global":
        assert out.max() == 255  # stretched to the full range


def test_clahe_on_tiny_images_uses_larger_tiles():
    small = np.random.default_rng(0).integers(0, 255, (28, 28)).astype(np.uint8)
    assert images.equalize(small, "clahe", 2.0, 8).shape == (28, 28)


@pytest.mark.parametrize("channels", [1, 3])
def test_prepare_image_shape_and_mask(channels):
    params = PreprocessParams(size=32, channels=channels)
    mask = np.zeros((120, 100), np.uint8)
    mask[50:60, 40:50] = 1
    img, out_mask = images.prepare_image(framed_image(), params, mask)
    assert img.shape == (32, 32, channels) and img.dtype == np.uint8
    assert out_mask.shape == (32, 32) and out_mask.any()


def test_to_uint8_scales_16_bit_and_converts_rgb():
    wide = np.linspace(0, 4000, 100 * 80).reshape(100, 80).astype(np.uint16)
    out = images.to_uint8(wide, 1)
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0
    rgb = np.zeros((10, 10, 3), np.uint8)
    assert images.to_uint8(rgb, 1).shape == (10, 10)
    assert images.to_uint8(rgb[:, :, 0], 3).shape == (10, 10, 3)


def test_parallel_preprocessing_matches_serial(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {f"i{k}": rng.integers(0, 255, (70 + k % 9, 60), dtype=np.uint8) for k in range(300)}
    masks = {
        f"i{k}": (rng.random((70 + k % 9, 60)) > 0.9).astype(np.uint8) for k in range(0, 300, 3)
    }
    io.save_npz(tmp_path / "img.npz", arrays)
    io.save_npz(tmp_path / "mask.npz", masks)
    frame = pd.DataFrame(
        {
            "image": [f"img.npz#i{k}" for k in range(300)],
            "mask": [f"mask.npz#i{k}" if k % 3 == 0 else "" for k in range(300)],
        }
    )
    params = PreprocessParams(size=24)
    monkeypatch.setattr(preprocess, "CHUNK", 40)
    outputs = {}
    for name, threshold in (("serial", 10**9), ("parallel", 1)):
        monkeypatch.setattr(preprocess, "PARALLEL_MIN_IMAGES", threshold)
        (tmp_path / name).mkdir()
        preprocess.process_split(frame, tmp_path, tmp_path / name, "train", params)
        outputs[name] = [np.load(tmp_path / name / f"train_{k}.npy") for k in ("images", "masks")]
    for serial, parallel in zip(outputs["serial"], outputs["parallel"], strict=True):
        assert np.array_equal(serial, parallel)
    assert outputs["parallel"][1][0].any() and not outputs["parallel"][1][1].any()
