"""The keyed overlay: faiss fast-scan IVF-PQ lists over the store's rows, with the ranker's
item-only term folded in as one more coordinate, so it proposes candidates by the full key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

import faiss
import numpy as np
from faiss.contrib.ivf_tools import search_preassigned

from operators.retrieval.ivf import single_thread, single_thread_if_small
from operators.retrieval.store import VectorStore

#: The item-only term of a ranking key: attributes (m, A) of m rows → (m,) float64 values
#: (e.g. the history scorer's popularity terms at the batch's time).
Prior = Callable[[np.ndarray], np.ndarray]
#: Item-only terms that differ by query (a ranker's terms at each query's own time):
#: attributes (m, A) of m rows and a slice of the queries → (queries, m) float64 values.
QueryPriors = Callable[[np.ndarray, slice], np.ndarray]


@runtime_checkable
class BoundedPriors(Protocol):
    """``QueryPriors`` that also bound their terms, so that the exact tier can key most items
    of a large catalogue by a bound instead of computing every (query, item) term."""

    def __call__(self, attrs: np.ndarray, queries: slice) -> np.ndarray: ...

    def upper(self, attrs: np.ndarray, queries: slice) -> np.ndarray:
        """(m,): for each row of ``attrs`` (m, A), a value no query of ``queries`` gives
        its term above."""
        ...

    def at(self, attrs: np.ndarray, queries: slice | np.ndarray) -> np.ndarray:
        """(q, w): each query's terms of its own rows ``attrs`` (q, w, A), at its own time
        (``queries``: a slice or the indices of the batch's queries)."""
        ...


# A faiss label is (generation << 32) | row: rows stay below 2³², generations wrap below 2³¹.
_ROW_BITS = 32
_ROW_MASK = (1 << _ROW_BITS) - 1
_GEN_MASK = (1 << 31) - 1
# Rows added per call while (re)building: bounds the float32 scratch at ~32 MiB.
_CHUNK = 65536


@dataclass(frozen=True)
class Key:
    """A ranking key ``scale · ‖x − q‖² − prior(attrs of x)`` (lowest first) as the overlay
    folds it: the scale and the item-only term, without the per-query bonus."""

    scale: float = 1.0
    prior: Prior | None = None

    def folds_like(self, other: Key) -> bool:
        """Whether vectors folded under ``other`` still propose for this key (the prior may
        be a newer function of the same form: a later batch's time)."""
        return self.scale == other.scale and (self.prior is None) == (other.prior is None)


class KeyedOverlay:
    """Fast-scan IVF-PQ codes of ``[x, √(C − z)]``, z = prior/scale, in lists by (prior band,
    cell), probed in the order of a bound on the key: the overlay proposes rows by the key.

    Squared L2 from ``[q, 0]`` to a folded vector is ``‖x − q‖² + C − z = key/scale + C``: the
    nearest folded vectors are the best keys, so the ranker's popularity terms steer the
    candidates instead of being added after a distance-only shortlist. Probing lists by the
    centroid distance alone fails there (the query sits off the data, at 0 on the folded
    axis; measured at 100k items of ``benchmarks/retrieval.py``'s data, 5% of the items
    scanned: recall 0.59): lists are split by band of z (quantiles at build time) and probed
    in the order of ``‖q − centroid‖² + C − (largest z in the list)``, the key of the list's
    most popular item if it sat on the centroid (the same 5%: recall 0.996). The codes (4-bit
    fast-scan PQ of x's PCA and the folded axis, rotated together at random) are coarse; the
    caller re-ranks the proposals exactly.

    Updates cost one encoding and one cell assignment: a moved or re-counted item is added
    under a new label (generation, row) and its old entry becomes stale; stale entries are
    purged in one pass once they reach a quarter of the index. Until then a stale entry can
    only propose its row, which the exact re-rank scores at its current vector, so staleness
    never changes a score. The fold uses the prior known when a row was encoded; one that has
    drifted since (the decayed counts of items untouched for long) moves candidates, not
    scores, and a rebuild refolds every row. An item whose z exceeds the ceiling ``C`` fixed
    at build time is proposed for every query (``over``) until the next rebuild.
    """

    def __init__(
        self,
        store: VectorStore,
        key: Key,
        nlist: int,
        nprobe: int,
        seed: int,
        bands: int = 8,
    ) -> None:
        self.store = store
        self.key = key
        self.nlist = nlist
        self.nprobe = nprobe
        n = len(store.rows)
        live = np.fromiter(store.rows.values(), dtype=np.int64, count=n)
        live.sort()
        z = self._terms(store.attrs[live])
        top = float(z.max()) if n else 0.0
        span = top - float(z.min()) if n else 0.0
        # Headroom, so that an item's prior can grow a little before it passes the ceiling
        # (small: the fold's quantisation error grows with √(C − z)).
        self.ceiling = top + span / 16.0
        self.over: set[int] = set()
        rng = np.random.default_rng(seed)
        # 64 points per cell trains k-means well enough and bounds build time at large n.
        pick = rng.choice(n, min(n, 64 * nlist), replace=False)
        pick.sort()
        sample, z_sample = store.data[live[pick]], z[pick]
        # Codes: a PCA of x to d - 1 dimensions (even d, at most 128) and the folded axis,
        # rotated at random: the PQ then codes every axis with the same error, where the
        # folded axis alone in a sub-quantiser would carry most of the distance's error (the
        # query sits at 0 on it, far from every item). One (D, d) product does it all:
        # code input = x·W + bias + e·w_fold.
        d = min(128, store.dim + 1)
        d -= d % 2
        mean = sample.mean(axis=0, dtype=np.float64)
        centred = sample - mean
        _, vecs = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        pca = vecs[:, ::-1][:, : d - 1]  # (D, d - 1)
        rotation = np.linalg.qr(rng.standard_normal((d, d)))[0]  # (d, d) orthogonal
        self.w = (pca @ rotation[:-1]).astype(np.float32)  # (D, d)
        self.bias = (-mean @ pca @ rotation[:-1]).astype(np.float32)  # (d,)
        self.w_fold = rotation[-1].astype(np.float32)  # (d,), orthogonal to every x·W + bias
        coded = self._fold(sample, z_sample)
        # Cells by x alone: k-means on the codes' input at 0 on the folded axis.
        kmeans = faiss.Kmeans(d, nlist, niter=10, seed=seed)
        kmeans.train(coded - np.outer(self._height(z_sample), self.w_fold))
        self.centroids = np.asarray(kmeans.centroids, dtype=np.float32)  # (nlist, d)
        self.centroid_sqnorm = np.einsum("ij,ij->i", self.centroids, self.centroids)
        # Each band's IVF assigns a vector to the nearest of the same cells: its folded part
        # is orthogonal to them, the same e² added to every distance.
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(self.centroids)
        template = faiss.IndexIVFPQFastScan(quantizer, d, nlist, d // 2, 4)
        # One look-up table per query instead of one per probed list: a single query probes
        # hundreds of lists, and the exact re-rank makes up for the coarser codes.
        template.by_residual = False
        # The cells are set: this trains the PQ only, 64 tiny k-means whose OpenMP teams cost
        # more than their work on a busy host (measured: 37 s on two threads, 2 s on one).
        with single_thread():
            template.train(coded)
        n_bands = bands if span > 0 else 1
        self.bands: list[faiss.IndexIVFPQFastScan] = [
            cast(faiss.IndexIVFPQFastScan, faiss.clone_index(template)) for _ in range(n_bands)
        ]
        self.edges = np.quantile(z_sample, np.arange(1, n_bands) / n_bands) if n else np.empty(0)
        # One read-only IVF over every band's lists, band after band (list b·nlist + j is
        # band b's list j): a query probes lists of all bands in one faiss call, where a call
        # per band cost it a look-up table and a Python round trip per band (1M items: 1.56
        # ms of CPU per query against 0.62). The bands stay the indexes written to: each
        # assigns among nlist cells, where one index of nlist · bands lists would search all
        # of them per added vector (measured: build 3x slower). The view reads their lists
        # in place, so it sees every add and removal as it happens.
        stack = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]
        for index in self.bands:
            stack.push_back(index.invlists)
        self._stack = stack  # the view holds raw pointers: keep everything it reads alive
        self._lists = faiss.VStackInvertedLists(stack.size(), stack.data())  # type: ignore[attr-defined]
        self._unused = faiss.IndexFlatL2(d)  # a search with given lists never asks it
        view = faiss.IndexIVFPQFastScan(self._unused, d, n_bands * nlist, d // 2, 4)
        view.by_residual = False
        view.pq = template.pq
        view.is_trained = True
        view.replace_invlists(self._lists, False)
        self.view = view
        self.zmax = np.full((n_bands, nlist), -np.inf)  # largest z each list has held
        self.gen = 0
        self.live = np.full(store.data.shape[0], -1, dtype=np.int64)  # row → its live label
        self.stale: list[np.ndarray] = []
        self.n_stale = 0
        for s in range(0, n, _CHUNK):
            rows = live[s : s + _CHUNK]
            self._add(rows, store.data[rows], z[s : s + _CHUNK], bounds=False)
        # Each list's bound read off its labels: cheaper than assigning every vector twice.
        z_of = np.zeros(self.live.shape[0])
        z_of[live] = z
        for b, index in enumerate(self.bands):
            invlists = index.invlists
            assert invlists is not None  # a built IVF always has its lists
            for j in range(nlist):
                size = invlists.list_size(j)
                if size:
                    labels = faiss.rev_swig_ptr(invlists.get_ids(j), size)
                    self.zmax[b, j] = z_of[labels & _ROW_MASK].max()
        # C − (largest z) of each list: what the list's best item adds to its cell's distance.
        self.lift = (self.ceiling - self.zmax).astype(np.float32)
        self.built_at = n
        self.imbalance_at_build = self.imbalance()
        self.changes = 0

    def _terms(self, attrs: np.ndarray) -> np.ndarray:
        """prior/scale of rows with these attributes, (m,) float64 (zeros without a prior)."""
        if self.key.prior is None:
            return np.zeros(attrs.shape[0])
        return np.asarray(self.key.prior(attrs), dtype=np.float64) / self.key.scale

    def _height(self, z: np.ndarray) -> np.ndarray:
        """(m,) z → (m,) float32 e = √(C − z), 0 above the ceiling."""
        return np.sqrt(np.maximum(self.ceiling - z, 0.0)).astype(np.float32)

    def _fold(self, vectors: np.ndarray, z: np.ndarray | None) -> np.ndarray:
        """(m, D) vectors and (m,) z → (m, d) codes' input; z None: queries, 0 on the fold."""
        out = np.asarray(vectors, dtype=np.float32) @ self.w + self.bias
        if z is not None:
            out += np.outer(self._height(z), self.w_fold)
        return out

    def _add(
        self, rows: np.ndarray, vectors: np.ndarray, z: np.ndarray, bounds: bool = True
    ) -> None:
        over = z > self.ceiling
        if over.any() or self.over:
            self.over.difference_update(rows.tolist())
            self.over.update(rows[over].tolist())
        if self.live.shape[0] < self.store.data.shape[0]:
            grown = np.full(self.store.data.shape[0], -1, dtype=np.int64)
            grown[: self.live.shape[0]] = self.live
            self.live = grown
        self._retire(rows)
        labels = (self.gen << _ROW_BITS) | rows
        coded = self._fold(vectors, z)
        band = np.searchsorted(self.edges, z)
        with single_thread_if_small(rows.size):
            present = sorted(set(band.tolist()))  # one band for the streaming single upsert
            for b in present:
                sel = slice(None) if len(present) == 1 else band == b
                index, zb = self.bands[b], z[sel]
                index.add_with_ids(coded[sel], labels[sel])
                if bounds:  # the faiss add assigned the cells too, but does not tell which
                    _, cells = index.quantizer.search(coded[sel], 1)
                    cells = cells[:, 0]
                    np.maximum.at(self.zmax[b], cells, zb)
                    self.lift[b, cells] = self.ceiling - self.zmax[b, cells]
        self.live[rows] = labels
        self.gen = (self.gen + 1) & _GEN_MASK
        self.view.ntotal = sum(index.ntotal for index in self.bands)

    def _retire(self, rows: np.ndarray) -> None:
        old = self.live[rows]
        old = old[old >= 0]
        if old.size:
            self.stale.append(old)
            self.n_stale += old.size
        self.live[rows] = -1

    def upsert(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Fold the rows' new vectors with their current attributes (already in the store)."""
        self._add(rows, vectors, self._terms(self.store.attrs[rows]))
        self.changes += rows.size
        self._purge_if_due()

    def remove(self, rows: np.ndarray) -> None:
        if rows.size:
            self._retire(rows)
            self.over.difference_update(rows.tolist())
            self.changes += rows.size
            self._purge_if_due()

    def _purge_if_due(self) -> None:
        if self.n_stale < max(4096, self.built_at // 4):
            return
        stale = np.concatenate(self.stale)
        # One pass over the lists; faiss keeps only a pointer, ``stale`` outlives the calls.
        selector = faiss.IDSelectorBatch(stale.size, faiss.swig_ptr(stale))
        for index in self.bands:
            index.remove_ids(selector)
        self.view.ntotal = sum(index.ntotal for index in self.bands)
        self.stale, self.n_stale = [], 0

    def propose(self, queries: np.ndarray, n: int) -> np.ndarray:
        """Store rows of up to n candidates per query by the folded key, then every row over
        the ceiling: (Q, D) → (Q, n'), −1 past the last found (rows may repeat)."""
        nq = queries.shape[0]
        q = self._fold(queries, None)  # (Q, d)
        dist = (
            np.einsum("ij,ij->i", q, q)[:, None]
            - 2.0 * (q @ self.centroids.T)
            + self.centroid_sqnorm[None, :]
        )  # (Q, nlist)
        bound = dist[:, None, :] + self.lift[None]  # (Q, bands, nlist)
        flat = bound.reshape(nq, -1)
        m = min(self.nprobe, flat.shape[1])
        # Band-major, as the view numbers the lists.
        probe = np.argpartition(flat, m - 1, axis=1)[:, :m]  # every list when m is all
        # A list that never held an entry has an infinite bound: −1, which faiss skips.
        lists = np.where(np.isfinite(np.take_along_axis(flat, probe, axis=1)), probe, -1)
        view = self.view
        if view.nprobe != m:
            view.nprobe = m
        with single_thread_if_small(nq):
            _dist, labels = search_preassigned(view, q, n, lists)
        rows = np.where(labels >= 0, labels & _ROW_MASK, -1)
        if self.over:
            extra = np.fromiter(self.over, dtype=np.int64, count=len(self.over))
            rows = np.concatenate([rows, np.tile(extra, (nq, 1))], axis=1)
        return rows

    def imbalance(self) -> float:
        """Σ size² · lists / n² over every (band, list), stale entries included: 1 when equal."""
        sizes = np.zeros(len(self.bands) * self.nlist)
        for b, index in enumerate(self.bands):
            invlists = index.invlists
            assert invlists is not None  # a built IVF always has its lists
            for j in range(self.nlist):
                sizes[b * self.nlist + j] = invlists.list_size(j)
        total = sizes.sum()
        return float((sizes**2).sum() * sizes.size / total**2) if total else 1.0

    def memory_bytes(self) -> int:
        """Codes and labels of every entry (stale ones included), the cells, the PCA matrix,
        the bounds and the row → label map."""
        total = self.live.nbytes + self.zmax.nbytes + self.w.nbytes
        for index in self.bands:
            total += index.ntotal * (index.code_size + 8) + 2 * self.nlist * index.d * 4
        return int(total)
