"""The report's Parameters section shows the params in effect: of the data keys, only those the
run's data source reads (`DataParams.in_effect`)."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import download, report
from stages.lib.params import SOURCE_KEYS, DataParams, parse_params
from tests.conftest import TINY, merge
from tests.datasets import medmnist_arrays, write_npz
from tests.test_report import write_inputs


def params_section(root: Path, data: dict) -> dict:
    """The YAML of the Parameters section of a report built with `data` as the data keys."""
    write_inputs(root, ["normal", "bacterial", "viral"])
    values = merge(TINY, {"data": data})
    (root / "params.yaml").write_text(yaml.safe_dump(values))
    report.run(parse_params(values), root / "params.yaml", root / "report.html")
    page = (root / "report.html").read_text()
    section = page.split('id="params"', 1)[1]
    shown = section.split("<pre>", 1)[1].split("</pre>", 1)[0]
    return yaml.safe_load(shown.replace("&#x27;", "'").replace("&quot;", '"'))


def test_npz_run_shows_no_synthetic_keys(in_tmp):
    shown = params_section(in_tmp, {"source": "npz", "path": "breastmnist_64.npz"})
    assert shown["data"] == {"source": "npz", "path": "breastmnist_64.npz", "positive_class": None}
    assert shown["split"]["seed"] == 0 and shown["model"]["name"] == "resnet10t"  # the rest


def test_folder_run_shows_its_keys_only(in_tmp):
    shown = params_section(in_tmp, {"source": "folder", "path": "images", "patient_regex": "p"})
    assert list(shown["data"]) == [
        "source", "path", "follow_links", "patient_regex", "positive_class",
    ]  # fmt: skip


def test_synthetic_run_shows_the_sites_and_no_file_keys(in_tmp):
    shown = params_section(in_tmp, {})
    assert list(shown["data"]) == ["source", "positive_class", "synthetic"]
    assert shown["data"]["synthetic"]["n_patients"] == TINY["data"]["synthetic"]["n_patients"]


def test_every_source_says_its_keys():
    sources = typing.get_args(DataParams.model_fields["source"].annotation)
    assert set(SOURCE_KEYS) == set(sources)
    fields = set(DataParams.model_fields)
    assert all(set(keys) <= fields for keys in SOURCE_KEYS.values())


class Recorder:
    """DataParams that notes which keys are read."""

    def __init__(self, params: DataParams) -> None:
        self.params, self.read = params, set()

    def __getattr__(self, name: str):
        self.read.add(name)
        return getattr(self.params, name)


def write_folder(root: Path) -> None:
    for k, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.full((24, 24), 60 * k + 10 * i, np.uint8)
            Image.fromarray(pixels).save(root / name / f"p{i}_{k}.png")


@pytest.mark.parametrize("source", ["synthetic", "npz", "folder"])
def test_download_reads_only_the_keys_in_effect(tmp_path, source):
    values = {
        "synthetic": {"synthetic": {"n_patients": 12, "image_size": [64, 80]}},
        "npz": {"source": "npz", "path": str(tmp_path / "pneumoniamnist.npz")},
        "folder": {"source": "folder", "path": str(tmp_path / "folder")},
    }[source]
    write_npz(tmp_path / "pneumoniamnist.npz", medmnist_arrays())
    write_folder(tmp_path / "folder")
    params = DataParams.model_validate(values)
    recorder = Recorder(params)
    download.run(recorder, tmp_path / "raw")  # type: ignore[arg-type]
    read = recorder.read & set(DataParams.model_fields)
    assert "source" in read and read <= set(params.in_effect()), read - set(params.in_effect())
