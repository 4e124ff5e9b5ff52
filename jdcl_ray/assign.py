"""How an image gets its cluster (``eval.assign``): the clustering head's argmax, or the nearest
of k-means centres fitted on the training features. One rule, shared by evaluation and predict,
whose parameters (the centres) travel in the checkpoint.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def fit_centers(features: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """k-means centres of L2-normalised training features, (K, D) float32."""
    kmeans = KMeans(num_clusters, n_init=3, random_state=seed).fit(features)
    return kmeans.cluster_centers_.astype(np.float32)


def assign(
    features: np.ndarray,
    head_probabilities: np.ndarray,
    centers: np.ndarray | None,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, probabilities) of each image: the head's when ``centers`` is None, else the
    nearest centre's, with a softmax over cosine similarity to the centres at the contrastive
    temperature, so that a k-means confidence reads like the head's."""
    if centers is None:
        return head_probabilities.argmax(1), head_probabilities
    # ‖f − c‖² without the N × K × D broadcast: |c|² − 2 f·c (|f|² is the same for every c).
    distances = (centers.astype(np.float64) ** 2).sum(1)[None] - 2.0 * features @ centers.T
    clusters = distances.argmin(1)
    unit = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    logits = features @ unit.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return clusters, weights / weights.sum(axis=1, keepdims=True)
