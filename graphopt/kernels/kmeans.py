"""1-D weighted k-means (Lloyd) over sorted values, for weight sharing (Han et al. 2016, Deep Compression).

In one dimension, with the values and the centroids both sorted, each cluster is a contiguous run
of values between the midpoints of neighbouring centroids, so assigning is one sweep (no n x k
distance table) and a centroid's update is the weighted mean of its run. Centroids stay sorted
through every iteration: a cluster's new mean lies inside its own run. An empty cluster keeps its
centroid (it may catch values again as its neighbours move).

`init_centroids` gives the three initialisations Deep Compression compares: 'linear' (evenly
spaced between min and max, which the paper finds best because it keeps the rare large weights
represented), 'density' (quantiles: evenly spaced on the CDF) and 'random' (a seeded sample).
"""
from __future__ import annotations

import numba
import numpy as np

INITS = ("linear", "density", "random")


@numba.njit(cache=True, nogil=True)
def _assign(x: np.ndarray, c: np.ndarray, labels: np.ndarray) -> bool:
    """Label each sorted value with its nearest sorted centroid; whether any label changed."""
    k = c.shape[0]
    j = 0
    changed = False
    for i in range(x.shape[0]):
        # Move to the next centroid while it is strictly nearer (ties stay with the lower one).
        while j + 1 < k and x[i] - c[j] > c[j + 1] - x[i]:
            j += 1
        if labels[i] != j:
            labels[i] = j
            changed = True
    return changed


@numba.njit(cache=True, nogil=True)
def _update(x: np.ndarray, w: np.ndarray, labels: np.ndarray, c: np.ndarray) -> None:
    k = c.shape[0]
    sums = np.zeros(k)
    mass = np.zeros(k)
    for i in range(x.shape[0]):
        sums[labels[i]] += w[i] * x[i]
        mass[labels[i]] += w[i]
    for j in range(k):
        if mass[j] > 0:
            c[j] = sums[j] / mass[j]


@numba.njit(cache=True, nogil=True)
def _lloyd(x: np.ndarray, w: np.ndarray, c: np.ndarray, max_iter: int) -> tuple[np.ndarray, int]:
    labels = np.full(x.shape[0], -1, np.int64)
    iterations = 0
    while iterations < max_iter:
        if not _assign(x, c, labels) and iterations > 0:
            break
        _update(x, w, labels, c)
        iterations += 1
    # Stopped by max_iter, the last update may have moved a centroid past a value: each value
    # ends labelled with its nearest centroid either way.
    _assign(x, c, labels)
    return labels, iterations


def init_centroids(values: np.ndarray, k: int, init: str, seed: int = 0) -> np.ndarray:
    """`k` sorted starting centroids for `values` by 'linear', 'density' or 'random'."""
    values = np.asarray(values, np.float64).ravel()
    if init == "linear":
        return np.linspace(values.min(), values.max(), k)
    if init == "density":
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    if init == "random":
        distinct = np.unique(values)
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(distinct, k, replace=distinct.size < k))
    raise ValueError(f"init={init!r} must be one of {', '.join(INITS)}")


def kmeans_1d(values: np.ndarray, k: int, weights: np.ndarray | None = None, init: str = "linear",
              seed: int = 0, max_iter: int = 300, start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster `values` (any shape) into `k` centroids minimising sum(weights * (value - centroid)^2)
    by Lloyd iterations, from `init`'s centroids or from `start` (k sorted centroids). Returns
    (centroids [k] float64 sorted, labels int64 in `values`' shape), each value labelled with its
    nearest centroid. Lloyd never raises the objective, so the result is no worse than `start`."""
    flat = np.asarray(values, np.float64).ravel()
    if flat.size == 0:
        raise ValueError("kmeans_1d: no values to cluster")
    w = np.ones_like(flat) if weights is None else np.asarray(weights, np.float64).ravel()
    if w.shape != flat.shape or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("kmeans_1d: weights must be finite, non-negative and one per value")
    order = np.argsort(flat, kind="stable")
    centroids = (init_centroids(flat, k, init, seed) if start is None else np.sort(start)).astype(np.float64)
    if centroids.shape != (k,):
        raise ValueError(f"kmeans_1d: start has {centroids.size} centroids, not {k}")
    labels_sorted, _ = _lloyd(flat[order], w[order], centroids, max_iter)
    labels = np.empty_like(labels_sorted)
    labels[order] = labels_sorted
    return centroids, labels.reshape(np.shape(values))
