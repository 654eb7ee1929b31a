"""embed stage: 2-D map (t-SNE, UMAP or PCA) of the model's penultimate features on the test set."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from stages.lib import paths
from stages.lib.checkpoint import ModelMeta
from stages.lib.errors import ToolFailed
from stages.lib.inference import ScoredSplit, load_model, read_split
from stages.lib.io import (
    write_csv,
    write_json,
)
from stages.lib.labels import LABEL_SEPARATOR
from stages.lib.params import EmbedParams
from stages.lib.splitting import rarest_label


def stratified_subsample(labels: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Sorted row indices: at most `max_points`, each class kept in proportion (at least one)."""
    if len(labels) <= max_points:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        n = max(1, round(len(rows) * max_points / len(labels)))
        keep.append(rng.choice(rows, min(n, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def umap_embedding(features: np.ndarray, params: EmbedParams) -> np.ndarray:
    """UMAP from the optional `umap-learn` package (extra `[umap]`)."""
    try:
        import umap
    except ImportError:
        raise ToolFailed(
            "embed.method umap needs the umap-learn package: pip install 'medpipe[umap]' "
            "(or pip install umap-learn), or set embed.method to tsne or pca"
        ) from None
    neighbors = min(params.n_neighbors, len(features) - 1)
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbors, random_state=params.seed)
    return reducer.fit_transform(features)


def embed_features(features: np.ndarray, params: EmbedParams) -> np.ndarray:
    """(N, D) features -> (N, 2) coordinates."""
    if params.method == "pca" or len(features) < 5:
        return PCA(n_components=2, random_state=params.seed).fit_transform(features)
    if params.method == "umap":
        return umap_embedding(features, params)
    reduced = features
    if features.shape[1] > 50:  # the usual PCA-50 first: faster and less noisy t-SNE
        reduced = PCA(n_components=min(50, len(features)), random_state=params.seed).fit_transform(
            features
        )
    perplexity = min(params.perplexity, (len(features) - 1) / 3)
    return TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=params.seed, max_iter=1000
    ).fit_transform(reduced)


def build_strata(split: ScoredSplit, meta: ModelMeta) -> np.ndarray:
    """A single-label stratum per row, for the subsample and the silhouette score: the class
    itself, or for multi-label data the rarest positive label (as the split stage stratifies;
    "" for none)."""
    if not meta.multilabel:
        return split.y
    return rarest_label(split.frame["label"], meta.classes).to_numpy()


def label_columns(
    y: np.ndarray, probs: np.ndarray, classes: list[str], multilabel: bool
) -> dict[str, np.ndarray]:
    """The table's label, predicted and correct columns (multi-label: `|`-joined names at
    probability >= 0.5, correct when the predicted set equals the true set)."""
    names = np.array(classes)
    if not multilabel:
        pred = probs.argmax(axis=1)
        return {"label": names[y], "predicted": names[pred], "correct": pred == y}
    pred = probs >= 0.5
    truth = y == 1

    def join(hot: np.ndarray) -> np.ndarray:
        return np.array([LABEL_SEPARATOR.join(names[row]) for row in hot], dtype=object)

    return {"label": join(truth), "predicted": join(pred), "correct": (pred == truth).all(axis=1)}


def run(
    params: EmbedParams,
    processed_dir: Path = paths.PROCESSED,
    model_file: Path = paths.MODEL,
    metrics_file: Path = paths.EMBED_METRICS,
    embedding_file: Path = paths.EMBEDDING,
) -> str:
    start = time.perf_counter()
    model = load_model(model_file)
    test = read_split(model, processed_dir)
    strata = build_strata(test, model.meta)
    rows = stratified_subsample(strata, params.max_points, params.seed)
    subset = np.asarray(test.images[rows])
    features = model.predict(subset, features=True)
    probs = model.predict(subset)
    coords = embed_features(features, params)
    stratum = strata[rows]
    silhouette = (
        float(silhouette_score(coords, stratum))
        if 1 < len(np.unique(stratum)) < len(stratum)
        else float("nan")
    )
    table = pd.DataFrame(
        {
            "x": coords[:, 0].round(4),
            "y": coords[:, 1].round(4),
            **label_columns(test.y[rows], probs, model.meta.classes, model.meta.multilabel),
            "image": test.frame["image"].to_numpy()[rows],
        }
    )
    write_csv(embedding_file, table)
    write_json(
        metrics_file,
        {"silhouette": round(silhouette, 4), "n_points": len(rows), "method": params.method},
    )
    return (
        f"embed: {params.method} of {len(rows):,} test images "
        f"({features.shape[1]}-d features), silhouette {silhouette:.3f} "
        f"in {time.perf_counter() - start:.1f} s"
    )
