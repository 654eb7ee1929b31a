"""The study recipes on real third-party images, as a researcher lays them out: recipe 002 on
the Kaggle brain-tumour MRI folders and recipe 004 on NIH ChestX-ray14 with NIH's own label
file (../shared/data; skipped with the reason when absent). Real `dvc repro` in a fresh git
+ DVC project, shrunk to 32 px and 2 epochs: these check conventions and plumbing on real
data; the accuracy figures come from benchmarks/realdata.py."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from stages.lib.io import read_result
from tests.conftest import ROOT
from tests.test_pipeline import sh
from tests.test_recipes import SHRINK, project  # noqa: F401 (the fixture)

SHARED = ROOT.parent / "shared" / "data"
BRAIN = SHARED / "brain-tumor-mri-96"
NIH = SHARED / "nih-cxr14-1000"
FINDINGS = 14  # NIH's findings; "No Finding" is none of them


def needs(folder):
    return pytest.mark.skipif(
        not folder.is_dir(), reason=f"real development data {folder} is absent (see shared/)"
    )


def apply(folder, env, name: str, *sets: str) -> None:
    args = [a for s in (*SHRINK, *sets) for a in ("--set", s)]  # ours after SHRINK: they win
    sh(folder, env, "medpipe", "recipe", "apply", name, *args)
    sh(folder, env, "git", "add", "-A")
    sh(folder, env, "git", "commit", "-qm", f"recipe {name}")


@pytest.mark.slow
@needs(BRAIN)
def test_002_brain_mri_keeps_the_official_test_set_minus_its_copies(project, subprocess_env):  # noqa: F811
    # training on 800 of the 4,860 training images: the split is what this test is about
    sets = ("train.batch_size=64", "split.undersample=ratio", "split.max_per_class=200")
    apply(project, subprocess_env, "002-brain-mri", f"data.path={BRAIN}", *sets)
    out = sh(project, subprocess_env, "dvc", "repro")
    testing = sum(1 for _ in (BRAIN / "Testing").rglob("*.jpg"))
    found = re.search(r"dropped 0 val and (\d+) test image\(s\)", out)
    assert found, out
    dropped = int(found.group(1))
    assert 440 <= dropped <= 500  # 470 copies measured (benchmarks/duplicates.py)
    split = json.loads((project / "metrics/split.json").read_text())
    assert split["strategy"] == "official" and split["duplicate_overlap"] == 0
    counts = split["dropped_duplicates"]["test"]["class_counts"]
    assert sum(counts.values()) == dropped and set(counts) == {
        "glioma",
        "meningioma",
        "notumor",
        "pituitary",
    }
    assert split["test"]["n_images"] == testing - dropped  # the rest of Testing is kept
    listed = pd.read_csv(project / "data/split/duplicates.csv")
    assert len(listed) == dropped and set(listed["action"]) == {"dropped"}
    assert listed["image"].str.startswith("images.zip#Testing/").all()
    assert listed["same_as"].str.startswith("images.zip#Training/").all()
    result = read_result(project / "metrics/evaluate.json")
    assert result["n_test"] == testing - dropped and len(result["per_class"]) == 4
    page = (project / "reports/report.html").read_text()
    assert f"{dropped:,} images copied an image of an earlier split" in page


@pytest.mark.slow
@needs(NIH)
def test_004_nih_no_finding_is_no_class_and_undersampling_cuts_it(project, subprocess_env):  # noqa: F811
    labels = NIH / "Data_Entry.csv"
    truth = pd.read_csv(labels)["Finding Labels"]
    empty = int((truth == "No Finding").sum())
    # the public subset is half "No Finding" already; a cap shows the cut on real labels
    apply(
        project,
        subprocess_env,
        "004-lung-disease",
        f"data.path={labels}",
        f"data.root={NIH / 'images'}",
        "split.max_per_class=100",
    )
    out = sh(project, subprocess_env, "dvc", "repro")
    assert f"{empty} image(s) with no finding (No Finding)" in out
    card = json.loads((project / "data/raw/dataset.json").read_text())
    assert len(card["classes"]) == FINDINGS and "No Finding" not in card["classes"]
    assert card["n_no_finding"] == empty and card["no_finding"] == ["No Finding"]
    train = json.loads((project / "metrics/split.json").read_text())["train"]
    assert train["n_no_finding"] == 100 < train["n_no_finding_before"]
    assert train["class_counts"] == train["class_counts_before"]  # no finding loses positives
    result = read_result(project / "metrics/evaluate.json")
    assert len(result["per_class"]) == FINDINGS and "No Finding" not in result["per_class"]
    cams = {p.stem for p in (project / "plots/explain").glob("*.png")}
    assert cams and "No Finding" not in cams and cams <= set(card["classes"])
    page = (project / "reports/report.html").read_text()
    assert f"{empty:,} images (50%) have no finding" in page and "(no finding)" in page
