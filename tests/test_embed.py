"""embed's 2-D maps: PCA/t-SNE always, UMAP when the optional extra is installed."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from stages import embed
from stages.embed import embed_features, stratified_subsample
from stages.lib.params import EmbedParams
from tests.conftest import tiny_processed


def clusters(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], n // 3)
    return rng.normal(0, 1, (n, 16)) + labels[:, None] * 6.0, labels


def test_stratified_subsample_keeps_every_class():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    rows = stratified_subsample(labels, 20, seed=0)
    assert len(rows) <= 21 and set(labels[rows]) == {0, 1, 2}


@pytest.mark.parametrize("method", ["pca"])  # t-SNE runs in tests/test_cli.py
def test_builtin_methods_give_two_columns(method):
    features, _ = clusters()
    coords = embed_features(features, EmbedParams(method=method, perplexity=5.0))
    assert coords.shape == (60, 2) and np.isfinite(coords).all()


def test_umap_separates_clusters():
    pytest.importorskip("umap", reason="optional extra [umap] not installed")
    features, labels = clusters()
    coords = embed_features(features, EmbedParams(method="umap", n_neighbors=10))
    assert coords.shape == (60, 2)
    centres = np.stack([coords[labels == k].mean(0) for k in range(3)])
    spread = max(coords[labels == k].std(0).max() for k in range(3))
    assert (
        min(np.linalg.norm(centres[i] - centres[j]) for i, j in ((0, 1), (0, 2), (1, 2))) > spread
    )


def test_umap_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap now raises ImportError
    with pytest.raises(RuntimeError, match=r"medpipe\[umap\]"):
        embed_features(clusters()[0], EmbedParams(method="umap"))


def test_run_multilabel_writes_joined_labels_and_a_finite_silhouette(tmp_path):
    classes = ["a", "b", "c"]
    processed, checkpoint = tiny_processed(tmp_path, "multilabel", classes)
    metrics_file, embedding_file = tmp_path / "embed.json", tmp_path / "embedding.csv"
    params = EmbedParams(method="pca", max_points=12)  # subsample 24 rows by rarest label
    embed.run(params, processed, checkpoint, metrics_file, embedding_file)
    result = json.loads(metrics_file.read_text())
    table = pd.read_csv(embedding_file, keep_default_na=False)
    assert len(table) == result["n_points"] and 10 <= len(table) < 24
    truth = pd.read_csv(processed / "test.csv", keep_default_na=False).set_index("image")
    assert (table["label"] == truth.loc[table["image"], "label"].to_numpy()).all()
    assert {"a|b", "a|b|c", ""} <= set(table["label"])  # `|`-joined sets, empty kept
    assert all(set(filter(None, p.split("|"))) <= set(classes) for p in table["predicted"])
    assert (table["correct"] == (table["label"] == table["predicted"])).all()
    assert np.isfinite(result["silhouette"]) and -1 <= result["silhouette"] <= 1
