"""A fixed 2-D projection of embeddings (PCA), so trajectories stay comparable over time."""

from __future__ import annotations

import numpy as np


class Plane:
    """The first two principal axes of the first ``fit_on`` vectors it is given, then fixed.

    Until ``fit_on`` vectors have arrived the axes are refitted on those there are at each
    ``project`` (``fixed`` False); from then on they never move, so a user's point drawn
    now and the same point drawn an hour later coincide. Each axis is signed so that its
    largest loading is positive (SVD signs are arbitrary).

    >>> plane = Plane(fit_on=4)
    >>> for v in ([-2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, -1.0]):
    ...     plane.offer(np.array(v))
    >>> plane.fixed, plane.explained, plane.project(np.array([[2.0, 1.0]])).tolist()
    (True, (0.8, 0.2), [[2.0, 1.0]])
    """

    def __init__(self, fit_on: int = 512) -> None:
        self.fit_on = fit_on
        self._pool: list[np.ndarray] = []
        self._mean: np.ndarray | None = None
        self._basis: np.ndarray | None = None  # (d, 2)
        self.explained = (0.0, 0.0)  # share of the pool's variance along each axis
        self.fixed = False

    @property
    def fitted_on(self) -> int:
        return len(self._pool)

    def offer(self, vector: np.ndarray) -> None:
        """A vector for the fit, taken while the plane is not fixed yet."""
        if self.fixed or (self._pool and vector.shape != self._pool[0].shape):
            return
        self._pool.append(np.asarray(vector, dtype=np.float64))
        if len(self._pool) >= self.fit_on:
            self._fit()
            self.fixed = True

    def _fit(self) -> None:
        pool = np.stack(self._pool)  # (n, d)
        self._mean = pool.mean(axis=0)
        centred = pool - self._mean
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        basis = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 2 - vt.shape[0])))
        signs = np.sign(basis[np.abs(basis).argmax(axis=0), [0, 1]])
        self._basis = basis * np.where(signs == 0, 1.0, signs)
        var = s**2
        total = float(var.sum())
        first, second = [*(float(v / total) if total > 0 else 0.0 for v in var[:2]), 0.0, 0.0][:2]
        self.explained = (first, second)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """(n, d) → (n, 2); zeros before any vector was offered."""
        vectors = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
        if not self.fixed and self._pool:
            self._fit()
        if self._basis is None or self._mean is None or vectors.shape[1] != self._mean.shape[0]:
            return np.zeros((len(vectors), 2))
        projected: np.ndarray = (vectors - self._mean) @ self._basis
        return projected
