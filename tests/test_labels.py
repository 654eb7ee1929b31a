"""The positive class of binary tasks: recognised from the class names or required."""

from __future__ import annotations

import pytest

from stages.lib.checkpoint import ModelMeta
from stages.lib.labels import is_negative_name, positive_class
from tests.conftest import model_meta


@pytest.mark.parametrize(
    "name",
    ["normal", "NORMAL", "Normal_CXR", "No Finding", "no_tumor", "healthy", "benign", "negative"],
)
def test_names_that_say_nothing_was_found(name):
    assert is_negative_name(name)


@pytest.mark.parametrize("name", ["abnormal", "pneumonia", "not normal", "malignant", "positive"])
def test_names_of_findings(name):
    assert not is_negative_name(name)


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        (["abnormal", "normal"], "abnormal"),  # MURA: the finding sorts first
        (["NORMAL", "PNEUMONIA"], "PNEUMONIA"),
        (["benign", "malignant"], "malignant"),
        (["negative", "positive"], "positive"),
        (["No Finding", "effusion"], "effusion"),
    ],
)
def test_default_is_the_class_that_is_not_normal(classes, expected):
    assert positive_class(classes, "binary", None) == expected


def test_binary_without_a_normal_class_must_name_one():
    with pytest.raises(ValueError, match=r"data\.positive_class.*neither.*one of \['cat', 'dog'\]"):
        positive_class(["cat", "dog"], "binary", None)
    with pytest.raises(ValueError, match="both look like"):
        positive_class(["healthy", "normal"], "binary", None)
    assert positive_class(["cat", "dog"], "binary", "cat") == "cat"


def test_chosen_class_is_matched_case_insensitively_and_checked():
    assert positive_class(["NORMAL", "PNEUMONIA"], "binary", "pneumonia") == "PNEUMONIA"
    assert positive_class(["abnormal", "normal"], "binary", "normal") == "normal"  # overrides
    with pytest.raises(ValueError, match=r"'fracture' is not a class.*\['abnormal', 'normal'\]"):
        positive_class(["abnormal", "normal"], "binary", "fracture")


def test_only_binary_tasks_have_one():
    assert positive_class(["normal", "bacterial", "viral"], "multiclass", None) is None
    with pytest.raises(ValueError, match="only binary tasks"):
        positive_class(["normal", "bacterial", "viral"], "multiclass", "viral")


def test_checkpoint_meta_records_the_positive_index():
    meta = model_meta(["abnormal", "normal"], positive_class="abnormal")
    assert meta.positive_index == 0
    assert ModelMeta.from_dict(meta.to_dict()).positive_class == "abnormal"
    assert model_meta(["normal", "pneumonia"]).positive_index == 1  # older checkpoints
    assert model_meta(["a", "b", "c"]).positive_index is None
    with pytest.raises(ValueError, match="positive_class 'x' is not one of"):
        model_meta(["a", "b"], positive_class="x")
