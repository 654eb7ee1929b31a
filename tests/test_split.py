import json

import numpy as np
import pandas as pd
import pytest

from stages import split
from stages.lib import splitting
from stages.lib.params import SplitParams


def make_manifest(n_patients=60, per_patient=2, labels=("a", "a", "a", "b", "c")) -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        for s in range(per_patient):
            rows.append((f"img{p}_{s}.png", labels[p % len(labels)], f"p{p}", ""))
    return pd.DataFrame(rows, columns=["image", "label", "patient_id", "source_split"])


def test_patient_split_has_no_overlap_and_keeps_every_class():
    manifest = make_manifest()
    column = splitting.split_by_patient(manifest, 0.2, 0.2, seed=0)
    per_patient = manifest.assign(split=column).groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()
    for s in ("train", "val", "test"):
        assert set(manifest[column == s]["label"]) == {"a", "b", "c"}
    assert abs((column == "test").mean() - 0.2) < 0.07


def test_split_is_seeded():
    manifest = make_manifest()
    a = splitting.split_by_patient(manifest, 0.2, 0.2, seed=0)
    assert a.equals(splitting.split_by_patient(manifest, 0.2, 0.2, seed=0))
    assert not a.equals(splitting.split_by_patient(manifest, 0.2, 0.2, seed=1))


@pytest.mark.parametrize(
    ("how", "ratio", "cap", "expected"),
    [
        ("majority", 1.0, None, {"a": 24, "b": 24, "c": 24}),
        ("ratio", 2.0, None, {"a": 48, "b": 24, "c": 24}),
        ("none", 1.0, 30, {"a": 30, "b": 24, "c": 24}),
        ("none", 1.0, None, {"a": 72, "b": 24, "c": 24}),
    ],
)
def test_undersample(how, ratio, cap, expected):
    frame = make_manifest()
    out = splitting.undersample(frame, how, ratio, cap, seed=0)
    assert out["label"].value_counts().to_dict() == expected
    assert out.index.is_monotonic_increasing


def test_official_strategy_keeps_source_and_carves_val_by_patient():
    manifest = make_manifest()
    manifest["source_split"] = ["test" if i % 5 == 0 else "train" for i in range(len(manifest))]
    column = splitting.assign_splits(manifest, SplitParams(strategy="official", val=0.2))
    assert (column[manifest["source_split"] == "test"] == "test").all()
    assert set(column[manifest["source_split"] == "train"]) == {"train", "val"}


def test_official_strategy_without_source_split_is_an_error():
    with pytest.raises(ValueError, match="source_split"):
        splitting.assign_splits(make_manifest(), SplitParams(strategy="official"))


def write_raw(raw_dir, manifest, thumbs=None, classes=("a", "b", "c"), task="multiclass"):
    raw_dir.mkdir(parents=True)
    manifest.to_csv(raw_dir / "manifest.csv", index=False)
    card = {"classes": list(classes), "task": task}
    (raw_dir / "dataset.json").write_text(json.dumps(card))
    if thumbs is None:  # distinct random pictures: no duplicates
        thumbs = np.random.default_rng(0).integers(0, 256, (len(manifest), 16, 16), np.uint8)
    np.save(raw_dir / "thumbnails.npy", thumbs)


def test_run_writes_splits_and_audit(tmp_path):
    write_raw(tmp_path / "raw", make_manifest())
    line = split.run(
        SplitParams(undersample="majority"),
        tmp_path / "raw",
        tmp_path / "split",
        tmp_path / "split.json",
    )
    audit = json.loads((tmp_path / "split.json").read_text())
    assert audit["patient_overlap"] == 0
    assert audit["train"]["class_counts"]["a"] == audit["train"]["class_counts"]["b"]
    assert audit["train"]["class_counts_before"]["a"] > audit["train"]["class_counts"]["a"]
    assert audit["test"]["class_counts"] == audit["test"]["class_counts_before"]
    assert "patient overlap 0" in line
    assert len(pd.read_csv(tmp_path / "split" / "train.csv")) == audit["train"]["n_images"]


def test_image_strategy_reports_leakage(tmp_path):
    write_raw(tmp_path / "raw", make_manifest(per_patient=3))
    line = split.run(
        SplitParams(strategy="image"), tmp_path / "raw", tmp_path / "split", tmp_path / "split.json"
    )
    audit = json.loads((tmp_path / "split.json").read_text())
    assert audit["patient_overlap"] > 0
    assert "WARNING" in line


def test_auto_strategy_uses_official_splits_only_when_all_rows_have_one():
    manifest = make_manifest()
    assert splitting.resolve_strategy(manifest, "auto") == "patient"
    manifest["source_split"] = "train"
    assert splitting.resolve_strategy(manifest, "auto") == "official"
    assert splitting.resolve_strategy(manifest, "image") == "image"


def picture_thumbs(n, seed=0):
    """Distinct smooth 16x16 pictures (like real thumbnails), contrast-stretched."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 4, 4)).repeat(4, axis=1).repeat(4, axis=2)
    base += rng.normal(scale=0.3, size=(n, 16, 16))
    lo, hi = base.min(axis=(1, 2), keepdims=True), base.max(axis=(1, 2), keepdims=True)
    return np.round((base - lo) / (hi - lo) * 255).astype(np.uint8)


def test_cluster_duplicates_finds_copies_and_near_copies_only():
    thumbs = picture_thumbs(300)
    noisy = np.clip(
        thumbs[10].astype(int) + np.random.default_rng(1).integers(-3, 4, (16, 16)), 0, 255
    )
    thumbs = np.concatenate([thumbs, thumbs[[5]], noisy[None].astype(np.uint8)])
    cluster = splitting.cluster_duplicates(thumbs)
    assert cluster[300] == cluster[5] and cluster[301] == cluster[10]
    assert len(set(cluster)) == 300  # no other image joined anything


def test_official_split_with_duplicates_fails_unless_allowed(tmp_path):
    manifest = make_manifest(n_patients=30, per_patient=1)
    manifest["source_split"] = ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    thumbs = picture_thumbs(len(manifest))
    thumbs[27] = thumbs[3]  # a training image again in test
    write_raw(tmp_path / "raw", manifest, thumbs)
    paths = (tmp_path / "raw", tmp_path / "split", tmp_path / "split.json")
    with pytest.raises(ValueError, match=r"2 image\(s\) have a near-duplicate in another split"):
        split.run(SplitParams(), *paths)
    assert not (tmp_path / "split.json").exists()
    line = split.run(SplitParams(allow_duplicates=True), *paths)
    audit = json.loads((tmp_path / "split.json").read_text())
    assert audit["duplicate_overlap"] == 2 and "duplicate overlap 2" in line and "WARNING" in line
    dups = pd.read_csv(tmp_path / "split" / "duplicates.csv")
    assert set(dups["image"]) == {"img3_0.png", "img27_0.png"}


def test_patient_split_keeps_duplicates_together(tmp_path):
    manifest = make_manifest(n_patients=60, per_patient=1)
    thumbs = picture_thumbs(len(manifest))
    for a, b in [(0, 30), (1, 31), (2, 32), (7, 50)]:  # same picture, different "patients"
        thumbs[b] = thumbs[a]
    write_raw(tmp_path / "raw", manifest, thumbs)
    split.run(SplitParams(), tmp_path / "raw", tmp_path / "split", tmp_path / "split.json")
    audit = json.loads((tmp_path / "split.json").read_text())
    assert audit["duplicate_overlap"] == 0 and audit["patient_overlap"] == 0
    where = {}
    for s in ("train", "val", "test"):
        for image in pd.read_csv(tmp_path / "split" / f"{s}.csv")["image"]:
            where[image] = s
    for a, b in [(0, 30), (1, 31), (2, 32), (7, 50)]:
        assert where[f"img{a}_0.png"] == where[f"img{b}_0.png"]


def test_multilabel_strata_use_the_rarest_label():
    labels = pd.Series(["common|rare", "common", "", "common|mid", "mid"])
    strata = splitting.rarest_label(labels, ["common", "mid", "rare"])
    assert strata.tolist() == ["rare", "common", "", "mid", "mid"]


def test_multilabel_undersampling_cuts_only_images_without_a_finding(tmp_path):
    manifest = make_manifest(n_patients=100, labels=("", "", "", "", "", "a", "a|b", "c"))
    write_raw(tmp_path / "raw", manifest, classes=("a", "b", "c"), task="multilabel")
    split.run(
        SplitParams(undersample="ratio", ratio=1.5),
        tmp_path / "raw",
        tmp_path / "split",
        tmp_path / "split.json",
    )
    train = pd.read_csv(tmp_path / "split/train.csv", keep_default_na=False)
    audit = json.loads((tmp_path / "split.json").read_text())
    empty = (train["label"] == "").sum()
    found = len(train) - empty
    assert empty == int(1.5 * found)  # 5 of 8 before: cut to 1.5 x the images with findings
    # every image with a finding is kept: no finding loses positives
    assert audit["train"]["class_counts"] == audit["train"]["class_counts_before"]
    assert audit["train"]["n_images"] < audit["train"]["n_images_before"]


def test_duplicate_check_is_fast_on_many_images():
    import time

    thumbs = picture_thumbs(20_000, seed=3)
    start = time.perf_counter()
    cluster = splitting.cluster_duplicates(thumbs)
    assert time.perf_counter() - start < 5
    assert len(set(cluster)) == 20_000


def test_copies_of_earlier_keep_the_first_split_copy():
    #            0        1       2       3       4      5       6
    column = pd.Series(["train", "val", "test", "test", "val", "test", "train"])
    cluster = np.array([0, 0, 0, 3, 4, 4, 6])  # 0-1-2 one picture; 4-5 another; 3, 6 alone
    copies = splitting.copies_of_earlier(cluster, column)
    assert copies.to_dict() == {1: 0, 2: 0, 5: 4}  # val keeps its copy against test


def test_official_split_drops_eval_copies_and_keeps_the_rest(tmp_path):
    manifest = make_manifest(n_patients=30, per_patient=1)
    manifest["source_split"] = ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    thumbs = picture_thumbs(len(manifest))
    thumbs[27] = thumbs[3]  # a training image again in test
    thumbs[28] = np.clip(thumbs[22].astype(int) + 2, 0, 255)  # a val image re-windowed in test
    thumbs[29] = thumbs[29]  # an image only test has: kept
    write_raw(tmp_path / "raw", manifest, thumbs)
    line = split.run(
        SplitParams(drop_duplicates=True),
        tmp_path / "raw",
        tmp_path / "split",
        tmp_path / "split.json",
    )
    audit = json.loads((tmp_path / "split.json").read_text())
    assert audit["duplicate_overlap"] == 0 and audit["test"]["n_images"] == 3
    dropped = audit["dropped_duplicates"]
    assert dropped["n_images"] == 2 and dropped["val"]["n_images"] == 0
    labels = manifest["label"]
    expected = {c: int((labels[[27, 28]] == c).sum()) for c in ("a", "b", "c")}
    assert dropped["test"]["class_counts"] == expected
    assert "dropped 0 val and 2 test image(s)" in line and "duplicates.csv" in line
    listed = pd.read_csv(tmp_path / "split" / "duplicates.csv")
    assert listed[["image", "split", "same_as", "action"]].values.tolist() == [
        ["img27_0.png", "test", "img3_0.png", "dropped"],
        ["img28_0.png", "test", "img22_0.png", "dropped"],
    ]
    test = pd.read_csv(tmp_path / "split" / "test.csv")
    assert test["image"].tolist() == ["img25_0.png", "img26_0.png", "img29_0.png"]
    train = pd.read_csv(tmp_path / "split" / "train.csv")
    assert "img3_0.png" in set(train["image"])  # train keeps its copy


def test_multilabel_audit_counts_images_without_a_finding(tmp_path):
    manifest = make_manifest(n_patients=100, labels=("", "", "", "", "a", "a|b", "c"))
    write_raw(tmp_path / "raw", manifest, classes=("a", "b", "c"), task="multilabel")
    params = SplitParams(undersample="majority")
    split.run(params, tmp_path / "raw", tmp_path / "s", tmp_path / "j")
    audit = json.loads((tmp_path / "j").read_text())
    train = audit["train"]
    found = train["n_images_before"] - train["n_no_finding_before"]
    assert train["n_no_finding"] == found < train["n_no_finding_before"]
    assert audit["test"]["n_no_finding"] == audit["test"]["n_no_finding_before"] > 0
