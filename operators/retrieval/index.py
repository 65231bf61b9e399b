"""Candidate retrieval: exact and IVF (faiss) item indexes, MinHash co-occurrence, exact re-rank."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import faiss
import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from operators.exceptions import RetrievalError, UnknownItemError

#: Codes the IVF index stores per vector. "flat": the float32 vector itself (4·D bytes, exact
#: scan distances); "sq8": 8-bit scalar quantisation (D bytes, faster scan, approximate distances).
#: Either way the shortlist is re-ranked against the exact float32 vectors.
Codec = Literal["flat", "sq8"]

# float32 relative rounding; bounds the error of the ‖x‖² − 2x·q shortcut used by the exact scan.
_EPS32 = float(np.finfo(np.float32).eps)
# Queries × rows of one distance block in the exact scan: caps its scratch memory at 64 MiB.
_BLOCK_ELEMS = 1 << 24


class ItemIndex(ABC):
    """Item id → float32 vector, searchable by L2. Distances are squared L2, exact, float64.

    Results of ``search`` are always re-ranked by the exact distance to the current vectors, ties
    broken by item id, so equal inputs give equal outputs whatever the insertion history.
    """

    dim: int

    @abstractmethod
    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Insert new items or replace the vectors of known ones; ``vectors`` is (len(ids), D)."""

    @abstractmethod
    def remove(self, ids: Iterable[str]) -> int:
        """Forget these items (unknown ids are ignored); returns how many were removed."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: ids (Q, k') object array of str, distances (Q, k') float64.

        k' = min(k, len(self)); rows are sorted by (distance, id).
        """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, item_id: object) -> bool: ...

    @abstractmethod
    def vector(self, item_id: str) -> np.ndarray:
        """The current vector (D,) of an item; raises ``UnknownItemError``."""

    @abstractmethod
    def rerank(self, query: np.ndarray, ids: Iterable[str], k: int) -> tuple[list[str], np.ndarray]:
        """Exact top-k of the given ids (unknown ones skipped) for one query (D,)."""


class _VectorStore:
    """Contiguous growing float32 matrix with an id ↔ row map; rows stay put until compaction.

    Rows are stable so the IVF overlay can use them as its faiss ids; removed rows become holes
    (‖x‖² = +inf, so a scan never returns them) that new items reuse.
    """

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        if dim <= 0:
            raise RetrievalError(f"dimension must be positive, got {dim}")
        self.dim = dim
        self.data = np.zeros((capacity, dim), dtype=np.float32)  # (cap, D)
        self.sqnorm = np.full(capacity, np.inf, dtype=np.float32)  # (cap,), inf on holes
        self.row_ids: list[str | None] = []  # row → id, None on holes; len == high-water mark
        self.rows: dict[str, int] = {}
        self.free: list[int] = []

    @property
    def high(self) -> int:
        """Rows in use or holes: the scan covers ``data[:high]``."""
        return len(self.row_ids)

    def check(self, vectors: np.ndarray, n: int | None = None) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim or (n is not None and v.shape[0] != n):
            want = f"({n if n is not None else 'Q'}, {self.dim})"
            raise RetrievalError(f"expected vectors of shape {want}, got {np.shape(vectors)}")
        if not np.isfinite(v).all():
            raise RetrievalError("vectors contain NaN or inf")
        return v

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write the vectors; returns (rows (M,), vectors (M, D)) after de-duplicating ids."""
        v = self.check(vectors, len(ids))
        last = {item_id: i for i, item_id in enumerate(ids)}  # a repeated id: its last vector wins
        if len(last) != len(ids):
            ids = list(last)
            v = v[list(last.values())]
        rows = np.empty(len(ids), dtype=np.int64)
        for i, item_id in enumerate(ids):
            row = self.rows.get(item_id)
            if row is None:
                row = self.free.pop() if self.free else self._append()
                self.rows[item_id] = row
                self.row_ids[row] = item_id
            rows[i] = row
        self.data[rows] = v
        self.sqnorm[rows] = np.einsum("ij,ij->i", v, v)
        return rows, v

    def _append(self) -> int:
        row = len(self.row_ids)
        if row == self.data.shape[0]:  # double: amortised O(1) copies per insert
            cap = 2 * row
            data = np.zeros((cap, self.dim), dtype=np.float32)
            data[:row] = self.data
            sqnorm = np.full(cap, np.inf, dtype=np.float32)
            sqnorm[:row] = self.sqnorm
            self.data, self.sqnorm = data, sqnorm
        self.row_ids.append(None)
        return row

    def remove(self, ids: Iterable[str]) -> np.ndarray:
        rows = [r for r in (self.rows.pop(i, None) for i in ids) if r is not None]
        for r in rows:
            self.row_ids[r] = None
        arr = np.asarray(rows, dtype=np.int64)
        self.data[arr] = 0.0
        self.sqnorm[arr] = np.inf
        self.free.extend(rows)
        return arr

    def compact(self) -> bool:
        """Close the holes when they are over half the rows, so scans stay proportional to len."""
        if len(self.free) <= max(1024, self.high // 2):
            return False
        live = np.fromiter(self.rows.values(), dtype=np.int64, count=len(self.rows))
        live.sort()
        n = live.size
        self.data[:n] = self.data[live]
        self.sqnorm[:n] = self.sqnorm[live]
        self.data[n:] = 0.0
        self.sqnorm[n:] = np.inf
        self.row_ids = [self.row_ids[r] for r in live.tolist()]
        self.rows = {item_id: r for r, item_id in enumerate(self.row_ids) if item_id is not None}
        self.free = []
        return True

    def exact_topk(self, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
        """Re-rank ``rows`` for one query by float64 ‖x − q‖², ties by id."""
        if rows.size == 0 or k <= 0:
            return [], np.empty(0, dtype=np.float64)
        diff = self.data[rows].astype(np.float64) - q.astype(np.float64)  # (M, D)
        dist = np.einsum("ij,ij->i", diff, diff)  # (M,)
        order = np.argsort(dist, kind="stable")
        ids = [self.row_ids[r] for r in rows.tolist()]
        sd = dist[order]
        if sd.size > 1 and bool(np.any(sd[1:] == sd[:-1])):  # rare: exact ties, order them by id
            order = np.array(sorted(range(dist.size), key=lambda i: (dist[i], ids[i])))
        order = order[:k]
        return [str(ids[i]) for i in order.tolist()], dist[order]

    def scan(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of all rows: BLAS shortlist with a rounding margin, then float64 re-rank."""
        nq, n = queries.shape[0], len(self.rows)
        kk = min(k, n)
        out_ids = np.empty((nq, kk), dtype=object)
        out_d = np.empty((nq, kk), dtype=np.float64)
        if kk == 0:
            return out_ids, out_d
        high = self.high
        data, sqnorm = self.data[:high], self.sqnorm[:high]  # (H, D), (H,)
        max_norm = float(np.max(sqnorm, where=np.isfinite(sqnorm), initial=0.0))
        block = max(1, _BLOCK_ELEMS // max(high, 1))
        for s in range(0, nq, block):
            qb = queries[s : s + block]  # (B, D)
            # ‖x‖² − 2x·q ranks rows like ‖x − q‖² (‖q‖² is constant per query) at BLAS speed.
            if qb.shape[0] == 1:  # the streaming case: a mat-vec reads the rows once, in order
                part = (sqnorm - 2.0 * (data @ qb[0]))[None, :]  # (1, H)
            else:
                part = sqnorm[None, :] - 2.0 * (qb @ data.T)  # (B, H)
            qn = np.einsum("ij,ij->i", qb, qb)
            for j in range(qb.shape[0]):
                d = part[j]
                cand = np.argpartition(d, kk - 1)[:kk] if kk < high else np.arange(high)
                # Rounding of the shortcut is below ~D·eps·(‖x‖² + ‖q‖²); take every row within
                # that margin of the k-th so the float64 re-rank sees all true top-k rows.
                tol = 4.0 * self.dim * _EPS32 * (max_norm + float(qn[j]))
                bound = float(np.max(d[cand])) + tol
                cand = np.flatnonzero(d <= bound)
                ids, dist = self.exact_topk(qb[j], cand, kk)
                out_ids[s + j] = ids
                out_d[s + j] = dist
        return out_ids, out_d


class _StoreBacked(ItemIndex):
    """Shared id/vector bookkeeping of the indexes below."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._store = _VectorStore(dim)

    def __len__(self) -> int:
        return len(self._store.rows)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._store.rows

    def vector(self, item_id: str) -> np.ndarray:
        row = self._store.rows.get(item_id)
        if row is None:
            raise UnknownItemError(item_id)
        return self._store.data[row].copy()

    def ids(self) -> list[str]:
        """All item ids, in no particular order."""
        return list(self._store.rows)

    def rerank(self, query: np.ndarray, ids: Iterable[str], k: int) -> tuple[list[str], np.ndarray]:
        q = self._store.check(query, 1)[0]
        rows = self._store.rows
        found = {rows[i] for i in ids if i in rows}  # a set: merged candidate lists repeat ids
        return self._store.exact_topk(q, np.fromiter(found, dtype=np.int64, count=len(found)), k)

    def ranks(
        self, queries: np.ndarray, true_ids: Sequence[str], true_vectors: np.ndarray
    ) -> np.ndarray:
        """Per query, 1 + the number of other items strictly closer than its true vector.

        The live evaluation's exact rank (ties favour the true item, as in the offline
        evaluation): one scan of every vector, each true item's own row replaced by the vector
        the caller knows to be current. (B, D), B ids, (B, D) → (B,) int64.
        """
        store = self._store
        q = store.check(queries)
        t = store.check(true_vectors, q.shape[0])
        high = store.high
        data, sqnorm = store.data[:high], store.sqnorm[:high]  # holes have +inf norms
        qn = np.einsum("ij,ij->i", q, q)[:, None]  # (B, 1)
        dist = sqnorm[None, :] - 2.0 * (q @ data.T) + qn  # (B, H) ‖x − q‖², BLAS form
        diff = t - q
        true = np.einsum("ij,ij->i", diff, diff)  # (B,)
        for b, item_id in enumerate(true_ids):
            own = store.rows.get(item_id)
            if own is not None:
                dist[b, own] = np.inf
        return 1 + np.count_nonzero(dist < true[:, None], axis=1)

    def _queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        if k <= 0:
            raise RetrievalError(f"k must be positive, got {k}")
        return self._store.check(queries)


class ExactIndex(_StoreBacked):
    """Brute-force exact L2 over all items; the right choice below some tens of thousands.

    >>> ix = ExactIndex(dim=2)
    >>> ix.upsert(["a", "b", "c"], np.array([[0, 0], [1, 0], [5, 5]], dtype=np.float32))
    >>> ix.upsert(["c"], np.array([[0.5, 0]], dtype=np.float32))  # c moves
    >>> ids, d = ix.search(np.array([[0.6, 0]], dtype=np.float32), k=2)
    >>> ids.tolist(), d.round(2).tolist()
    ([['c', 'b']], [[0.01, 0.16]])
    """

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        self._store.upsert(ids, vectors)

    def remove(self, ids: Iterable[str]) -> int:
        n = int(self._store.remove(ids).size)
        self._store.compact()
        return n

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._store.scan(self._queries(queries, k), k)


def auto_nlist(n: int) -> int:
    """IVF cell count for n items: the power of two nearest 2·√n, within [16, 65536].

    Cells ∝ √n keep both the centroid scan and the scanned lists ∝ √n at fixed nprobe.

    >>> auto_nlist(1_000_000)
    2048
    """
    return int(min(65536, max(16, 2 ** round(math.log2(2.0 * math.sqrt(max(n, 1)))))))


@contextmanager
def _single_thread_if_small(n: int) -> Iterator[None]:
    """Run faiss on one thread for a handful of vectors or queries.

    Waking an OpenMP team costs milliseconds on a busy host (measured: one upsert 27 µs on one
    thread, 1.8–7 ms on two), far more than the work; large batches keep all threads.
    """
    if n >= 16:
        yield
        return
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _ids_selector(rows: np.ndarray) -> faiss.IDSelectorArray:
    """An id list selector: the one kind an IVF's hash-table direct map removes in O(1) per id.

    faiss keeps only a pointer, so the caller must keep ``rows`` alive while it is used.
    """
    return faiss.IDSelectorArray(rows.size, faiss.swig_ptr(rows))


class _IVFOverlay:
    """A faiss IVF index over store rows (faiss id = row) that proposes candidates.

    IVF, not HNSW: an HNSW graph cannot delete or move a vector, and JODIE moves an item's vector
    on every interaction. IVF with a hash-table direct map moves one in O(1) list edits plus one
    centroid assignment (``remove_ids`` + ``add_with_ids``), so the index is never stale.
    """

    def __init__(
        self, store: _VectorStore, nlist: int, nprobe: int, codec: Codec, seed: int
    ) -> None:
        n = len(store.rows)
        live = np.fromiter(store.rows.values(), dtype=np.int64, count=n)
        rng = np.random.default_rng(seed)
        # 64 points per cell trains k-means well enough and bounds build time at large n.
        sample = store.data[np.sort(rng.choice(live, min(n, 64 * nlist), replace=False))]
        self.quantizer = faiss.IndexFlatL2(store.dim)  # held here: the IVF does not own it
        if codec == "flat":
            index: faiss.IndexIVF = faiss.IndexIVFFlat(self.quantizer, store.dim, nlist)
        else:
            index = faiss.IndexIVFScalarQuantizer(
                self.quantizer, store.dim, nlist, faiss.ScalarQuantizer.QT_8bit
            )
        index.cp.seed = seed
        index.train(sample)
        # O(1) remove by id; the type stubs of faiss 1.15 lack DirectMap.
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        index.nprobe = nprobe
        index.add_with_ids(store.data[live], live)
        self.index = index
        self.built_at = n
        self.imbalance_at_build = self.imbalance()
        self.changes = 0

    def upsert(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        with _single_thread_if_small(rows.size):
            self.index.remove_ids(_ids_selector(rows))  # rows not present (new ones) are skipped
            self.index.add_with_ids(vectors, rows)
        self.changes += rows.size

    def remove(self, rows: np.ndarray) -> None:
        if rows.size:
            self.index.remove_ids(_ids_selector(rows))
            self.changes += rows.size

    def imbalance(self) -> float:
        """Σ size² · nlist / n²: 1 for equal lists; grows as moved vectors pile into few cells."""
        invlists = self.index.invlists
        assert invlists is not None  # a built IVF always has its lists
        return float(invlists.imbalance_factor())


class TieredIndex(_StoreBacked):
    """Exact search below ``exact_below`` items, an IVF index (re-ranked exactly) above it.

    The exact float32 vectors always live in one contiguous store (for ``vector``, re-ranking
    and the exact tier); above the threshold a faiss IVF overlay, kept in sync on every upsert,
    proposes ``rerank_factor · k`` candidates per query, which are re-ranked by exact distance.
    The overlay is rebuilt (k-means retrained, ``nlist`` re-sized) when the catalogue has grown
    or shrunk by ``rebuild_growth`` since the last build, or when moved vectors have unbalanced
    its lists by ``max_imbalance_growth``; dropped again below ``exact_below // 2`` (hysteresis,
    so a catalogue hovering at the threshold does not rebuild over and over).

    >>> rng = np.random.default_rng(0)
    >>> ix = TieredIndex(dim=8, exact_below=1500)
    >>> ix.upsert([f"i{n}" for n in range(2000)], rng.standard_normal((2000, 8)))
    >>> ix.approximate
    True
    >>> ids, d = ix.search(ix.vector("i7")[None, :], k=1)
    >>> ids.tolist(), d.tolist()
    ([['i7']], [[0.0]])
    """

    def __init__(
        self,
        dim: int,
        exact_below: int = 20_000,
        *,
        nprobe: int = 48,
        nlist: int | None = None,
        codec: Codec = "flat",
        rerank_factor: int | None = None,
        rebuild_growth: float = 2.0,
        max_imbalance_growth: float = 1.5,
        seed: int = 0,
    ) -> None:
        super().__init__(dim)
        # IVF-Flat scan distances are exact up to float32 rounding, so 2·k is margin enough;
        # 8-bit codes misorder near neighbours more and need a longer shortlist.
        if rerank_factor is None:
            rerank_factor = 2 if codec == "flat" else 4
        if rerank_factor < 1 or rebuild_growth <= 1.0 or nprobe < 1:
            raise RetrievalError("need rerank_factor >= 1, rebuild_growth > 1, nprobe >= 1")
        self.exact_below = exact_below
        self.nprobe = nprobe
        self.nlist = nlist
        self.codec: Codec = codec
        self.rerank_factor = rerank_factor
        self.rebuild_growth = rebuild_growth
        self.max_imbalance_growth = max_imbalance_growth
        self.seed = seed
        self.builds = 0  # how many times the IVF overlay was (re)built; for metrics and tests
        self._ivf: _IVFOverlay | None = None

    @property
    def approximate(self) -> bool:
        """True while searches go through the IVF overlay."""
        return self._ivf is not None

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        rows, v = self._store.upsert(ids, vectors)
        if self._ivf is not None:
            self._ivf.upsert(rows, v)
        self._maintain()

    def remove(self, ids: Iterable[str]) -> int:
        rows = self._store.remove(ids)
        if self._ivf is not None:
            self._ivf.remove(rows)
        if self._store.compact():  # rows renumbered: the overlay's ids are void
            self._ivf = None
        self._maintain()
        return int(rows.size)

    def rebuild(self) -> None:
        """Retrain and refill the IVF overlay now (e.g. from a background schedule)."""
        n = len(self)
        nlist = self.nlist or auto_nlist(n)
        nlist = max(1, min(nlist, n // 39))  # faiss k-means wants >= 39 points per centroid
        self._ivf = _IVFOverlay(self._store, nlist, min(self.nprobe, nlist), self.codec, self.seed)
        self.builds += 1

    def _maintain(self) -> None:
        n = len(self)
        ivf = self._ivf
        if ivf is None:
            if n >= max(self.exact_below, 1024):  # under ~1k items k-means has nothing to learn
                self.rebuild()
            return
        if n < self.exact_below // 2 or n < 512:
            self._ivf = None
            return
        grown = n >= ivf.built_at * self.rebuild_growth or n * self.rebuild_growth <= ivf.built_at
        # Checking the balance costs O(nlist); do it once per ~n/8 changes.
        drifted = False
        if ivf.changes >= max(1024, ivf.built_at // 8):
            ivf.changes = 0
            drifted = ivf.imbalance() > ivf.imbalance_at_build * self.max_imbalance_growth
        if grown or drifted:
            self.rebuild()

    def search_exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k whatever the tier: the reference for measuring recall on live data."""
        return self._store.scan(self._queries(queries, k), k)

    def memory_bytes(self) -> int:
        """Approximate resident size: the vector store plus the IVF codes, ids and centroids."""
        st = self._store
        total = st.data.nbytes + st.sqnorm.nbytes + 100 * len(st.rows)  # ~100 B/id in dict+list
        if self._ivf is not None:
            ix = self._ivf.index
            # code + int64 id per vector, ~32 B per hash-table entry, the centroids
            total += ix.ntotal * (ix.code_size + 8 + 32) + ix.nlist * self.dim * 4
        return int(total)

    def recommend(
        self, queries: np.ndarray, k: int, extra: Sequence[Sequence[str]]
    ) -> list[tuple[list[str], np.ndarray]]:
        """Per query, the k nearest of (its nearest-neighbour shortlist ∪ ``extra[b]``):
        the serving path, batched.

        Exact tier: all distances in one BLAS product (float32 ‖x‖² − 2x·q + ‖q‖², which can
        swap near-ties within ~1e-5 of each other); the 2k best and the extras compete.
        IVF tier: the overlay's ``rerank_factor · k`` proposals and the extras, by direct
        float32 distance. Every query's union is ranked at once.
        """
        q = self._queries(queries, k)
        store, n = self._store, len(self)
        nq = q.shape[0]
        if n == 0:
            return [([], np.empty(0)) for _ in range(nq)]
        high = store.high
        rows_of = store.rows
        extra_rows = [
            np.fromiter((rows_of[i] for i in extra[b] if i in rows_of), dtype=np.int64)
            for b in range(nq)
        ]
        full: np.ndarray | None = None
        if self._ivf is None:
            # Every distance at BLAS speed (‖x‖² − 2x·q + ‖q‖², holes +inf): the shortlist and
            # the extras are read off the same matrix, no vector is gathered.
            full = store.sqnorm[:high][None, :] - 2.0 * (q @ store.data[:high].T)  # (B, H)
            full += np.einsum("ij,ij->i", q, q)[:, None]
            m = min(2 * k, high)
            short = (
                np.argpartition(full, m - 1, axis=1)[:, :m]
                if m < high
                else np.tile(np.arange(high), (nq, 1))
            )
        else:
            self._ivf.index.nprobe = min(self.nprobe, self._ivf.index.nlist)
            with _single_thread_if_small(nq):
                _, short = self._ivf.index.search(q, min(k, n) * self.rerank_factor)
        lists = [
            np.unique(np.concatenate([short[b][short[b] >= 0], extra_rows[b]])) for b in range(nq)
        ]
        width = max(len(r) for r in lists)
        rows = np.full((nq, width), -1, dtype=np.int64)
        for b, r in enumerate(lists):
            rows[b, : len(r)] = r
        safe = np.maximum(rows, 0)
        if full is not None:
            dist = np.take_along_axis(full, safe, axis=1).astype(np.float64)
        else:
            diff = store.data[safe] - q[:, None, :]  # (B, W, D)
            dist = np.einsum("bwd,bwd->bw", diff, diff).astype(np.float64)
        dist[(rows < 0) | ~np.isfinite(store.sqnorm[safe])] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(dist, order, axis=1)
        picked = np.take_along_axis(rows, order, axis=1)
        row_ids = store.row_ids
        out = []
        for b in range(nq):
            finite = np.isfinite(top[b])
            out.append(([str(row_ids[r]) for r in picked[b][finite].tolist()], top[b][finite]))
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self._queries(queries, k)
        if self._ivf is None:
            return self._store.scan(q, k)
        kk = min(k, len(self))
        self._ivf.index.nprobe = min(self.nprobe, self._ivf.index.nlist)  # tunable live
        with _single_thread_if_small(q.shape[0]):
            _, labels = self._ivf.index.search(q, kk * self.rerank_factor)  # (Q, r·k), −1: none
        out_ids = np.empty((q.shape[0], kk), dtype=object)
        out_d = np.empty((q.shape[0], kk), dtype=np.float64)
        for j in range(q.shape[0]):
            rows = labels[j][labels[j] >= 0]
            ids, dist = self._store.exact_topk(q[j], rows, kk)
            if len(ids) < kk:  # the probed cells held fewer than k items: answer exactly
                sid, sd = self._store.scan(q[j : j + 1], kk)
                ids, dist = list(sid[0]), sd[0]
            out_ids[j] = ids
            out_d[j] = dist
        return out_ids, out_d


IndexKind = Literal["tiered", "exact", "ivf"]


def make_index(
    dim: int, kind: IndexKind = "tiered", exact_below: int = 20_000, **ivf_options: object
) -> ItemIndex:
    """Build an index: "exact" always scans, "ivf" goes approximate as soon as it can (≥ 1024
    items), "tiered" switches at ``exact_below``; ``ivf_options`` go to ``TieredIndex``.

    >>> len(make_index(4, "exact"))
    0
    """
    if kind == "exact":
        return ExactIndex(dim)
    threshold = 0 if kind == "ivf" else exact_below
    return TieredIndex(dim, threshold, **ivf_options)  # type: ignore[arg-type]


def merge_and_rerank(
    query: np.ndarray, candidate_lists: Iterable[Iterable[str]], index: ItemIndex, k: int
) -> tuple[list[str], np.ndarray]:
    """Union several candidate lists (NN, co-occurrence, …) and keep the exact top-k to the query.

    Ids missing from the index (removed items, items not yet embedded) are dropped.

    >>> ix = ExactIndex(dim=1)
    >>> ix.upsert(["a", "b", "c"], np.array([[0.0], [2.0], [3.0]], dtype=np.float32))
    >>> merge_and_rerank(np.array([2.9]), [["a", "b"], ["c", "zzz", "a"]], ix, k=2)[0]
    ['c', 'b']
    """
    merged: dict[str, None] = {}
    for cands in candidate_lists:
        merged.update(dict.fromkeys(cands))
    return index.rerank(query, merged, k)


class CooccurrenceCandidates:
    """Items whose recent audiences (sets of user ids) resemble those of a user's recent items.

    Each item keeps its last ``audience_size`` distinct users; its MinHash (Jaccard on that set)
    sits in a datasketch ``MinHashLSH``. Re-hashing costs O(audience_size · num_perm), so an
    item is re-hashed only after ``rehash_every`` audience changes (a new item is hashed at once):
    the update cost per event is bounded and amortised, at the price of signatures at most
    ``rehash_every − 1`` users stale. An item's neighbour list is likewise re-queried only every
    ``requery_every`` observed events.

    >>> cc = CooccurrenceCandidates(threshold=0.5, rehash_every=1)
    >>> for u in range(20):
    ...     cc.observe(f"u{u}", "matrix")
    ...     cc.observe(f"u{u}", "inception")
    >>> cc.observe("z", "cooking-show")
    >>> cc.candidates(["matrix"])
    ['inception', 'matrix']
    """

    def __init__(
        self,
        audience_size: int = 64,
        num_perm: int = 64,
        threshold: float = 0.2,
        rehash_every: int = 8,
        seed: int = 1,
        requery_every: int = 256,
    ) -> None:
        self.audience_size = audience_size
        # An item's LSH neighbours are re-queried after this many observed events (a datasketch
        # query is ~100 µs of Python; the neighbourhood drifts slowly).
        self.requery_every = max(1, requery_every)
        self._observed = 0
        self._neighbours: dict[str, tuple[int, list[str]]] = {}
        self.rehash_every = max(1, rehash_every)
        self.num_perm = num_perm
        self.seed = seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        # One permutation set for all sketches: generating it per MinHash would dominate the cost.
        self._perms = MinHash(num_perm=num_perm, seed=seed).permutations
        self._audience: dict[str, OrderedDict[str, None]] = {}
        self._pending: dict[str, int] = {}  # item → audience changes since its last hash
        self._sketch: dict[str, LeanMinHash] = {}

    def __len__(self) -> int:
        return len(self._audience)

    def observe(self, user_id: str, item_id: str) -> None:
        """Record that ``user_id`` interacted with ``item_id`` (O(1), re-hash amortised)."""
        self._observed += 1
        aud = self._audience.setdefault(item_id, OrderedDict())
        if user_id in aud:
            aud.move_to_end(user_id)  # recency only; the set is unchanged, nothing to re-hash
            return
        aud[user_id] = None
        if len(aud) > self.audience_size:
            aud.popitem(last=False)
        pending = self._pending.get(item_id, self.rehash_every - 1) + 1
        if pending >= self.rehash_every:
            self._rehash(item_id)
            pending = 0
        self._pending[item_id] = pending

    def _minhash(self, members: Iterable[str]) -> MinHash:
        m = MinHash(
            num_perm=self.num_perm, seed=self.seed, permutations=self._perms, scheme="affine32"
        )
        m.update_batch([u.encode("utf-8") for u in members])
        return m

    def _rehash(self, item_id: str) -> None:
        sketch = LeanMinHash(self._minhash(self._audience[item_id]))
        if item_id in self._sketch:
            self._lsh.remove(item_id)
        self._lsh.insert(item_id, sketch, check_duplication=False)
        self._sketch[item_id] = sketch

    def flush(self) -> None:
        """Re-hash every item with pending audience changes (e.g. before a snapshot); the
        next queries see the result."""
        self._neighbours.clear()
        for item_id, pending in self._pending.items():
            if pending:
                self._rehash(item_id)
                self._pending[item_id] = 0

    def _similar(self, item_id: str) -> list[str]:
        cached = self._neighbours.get(item_id)
        if cached is not None and self._observed - cached[0] < self.requery_every:
            return cached[1]
        sketch = self._sketch.get(item_id)
        found = [] if sketch is None else list(self._lsh.query(sketch))
        self._neighbours[item_id] = (self._observed, found)
        return found

    def remove_item(self, item_id: str) -> None:
        """Forget an item and its audience."""
        self._neighbours.clear()  # the item may be anyone's neighbour
        self._audience.pop(item_id, None)
        self._pending.pop(item_id, None)
        if self._sketch.pop(item_id, None) is not None:
            self._lsh.remove(item_id)

    def candidates(self, recent_items: Sequence[str], limit: int | None = None) -> list[str]:
        """Items similar (LSH Jaccard ≥ ~threshold) to any of ``recent_items``, most hits first.

        The recent items themselves are included when known (repeat consumption is common in
        JODIE's data sets); ties in hit count are broken by id, so the output is deterministic.
        """
        hits: dict[str, int] = {}
        for item_id in dict.fromkeys(recent_items):
            for other in self._similar(item_id):
                hits[other] = hits.get(other, 0) + 1
        ranked = sorted(hits, key=lambda i: (-hits[i], i))
        return ranked if limit is None else ranked[:limit]
