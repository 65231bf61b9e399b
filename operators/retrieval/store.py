"""The item vector store: a growing float32 matrix, its id ↔ row map and the one exact L2 scan."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from operators.retrieval.exceptions import RetrievalError

# float32 relative rounding; bounds the error of the ‖x‖² − 2x·q + ‖q‖² expansion in ``sqdist``.
_EPS32 = float(np.finfo(np.float32).eps)
# Queries × rows of one distance block (``scan``, ``TieredIndex.ranks`` and ``recommend``):
# caps their scratch memory at 64 MiB of float32 whatever the batch and the catalogue.
BLOCK_ELEMS = 1 << 24
# Up to this many queries, ``row_dots`` multiplies the rows by the queries rather than the
# queries by the rows (see there).
FEW_QUERIES = 64


def row_dots(queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``queries @ rows.T`` (B, D) × (H, D) → (B, H) float32, C-contiguous, the same bits.

    OpenBLAS's single-threaded sgemm takes 2–3x longer for a few queries by many rows
    (B ≥ 2, say 4 × 1,000 at D = 256: 156 µs) than for the same product asked the other way
    round, ``rows @ queries.T`` (66 µs), transposed back; from about a hundred queries the
    two cost the same and the copy back no longer pays. Both ways sum each dot product in
    the same order: the results are equal bit for bit (``tests/operators/retrieval``), so a
    row's distances do not depend on the size of the batch it came in, which the stream's
    equality with the offline replay needs.
    """
    if 2 <= queries.shape[0] <= FEW_QUERIES:
        return np.ascontiguousarray((rows @ queries.T).T)
    return queries @ rows.T


class VectorStore:
    """Contiguous growing float32 matrix with an id ↔ row map; rows stay put until compaction.

    Rows are stable so the IVF overlay can use them as its faiss ids; removed rows become holes
    (‖x‖² = +inf, so a scan never returns them) that new items reuse. Distances are squared L2.

    >>> st = VectorStore(dim=2)
    >>> _ = st.upsert(["a", "b", "c"], np.array([[0, 0], [1, 0], [5, 5]]))
    >>> _ = st.upsert(["c"], np.array([[0.5, 0]]))  # c moves
    >>> ids, d = st.scan(st.check(np.array([0.6, 0])), k=2)
    >>> ids.tolist(), d.round(2).tolist()
    ([['c', 'b']], [[0.01, 0.16]])
    """

    def __init__(self, dim: int, capacity: int = 1024, n_attrs: int = 0) -> None:
        if dim <= 0:
            raise RetrievalError(f"dimension must be positive, got {dim}")
        self.dim = dim
        self.data = np.zeros((capacity, dim), dtype=np.float32)  # (cap, D)
        # (cap, A) float64 attributes of each row's item (e.g. a ranker's popularity inputs),
        # kept with the row through moves and compaction.
        self.attrs = np.zeros((capacity, n_attrs), dtype=np.float64)
        self.sqnorm = np.full(capacity, np.inf, dtype=np.float32)  # (cap,), inf on holes
        self.row_ids: list[str | None] = []  # row → id, None on holes; len == high-water mark
        self.rows: dict[str, int] = {}
        self.free: list[int] = []

    @property
    def high(self) -> int:
        """Rows in use or holes: the scan covers ``data[:high]``."""
        return len(self.row_ids)

    def check(self, vectors: np.ndarray, n: int | None = None) -> np.ndarray:
        """``vectors`` as finite float32 (n, D) (a single (D,) vector becomes (1, D))."""
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim or (n is not None and v.shape[0] != n):
            want = f"({n if n is not None else 'Q'}, {self.dim})"
            raise RetrievalError(f"expected vectors of shape {want}, got {np.shape(vectors)}")
        if not np.isfinite(v).all():
            raise RetrievalError("vectors contain NaN or inf")
        return v

    def upsert(
        self, ids: Sequence[str], vectors: np.ndarray, attrs: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Write the vectors (and the rows' attributes, (M, A)); returns (rows (M,), vectors
        (M, D)) after de-duplicating ids."""
        v = self.check(vectors, len(ids))
        last = {item_id: i for i, item_id in enumerate(ids)}  # a repeated id: its last vector wins
        if attrs is not None:
            attrs = np.asarray(attrs, dtype=np.float64).reshape(len(ids), self.attrs.shape[1])
        if len(last) != len(ids):
            ids = list(last)
            v = v[list(last.values())]
            if attrs is not None:
                attrs = attrs[list(last.values())]
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
        if attrs is not None:
            self.attrs[rows] = attrs
        return rows, v

    def _append(self) -> int:
        row = len(self.row_ids)
        if row == self.data.shape[0]:  # double: amortised O(1) copies per insert
            cap = 2 * row
            data = np.zeros((cap, self.dim), dtype=np.float32)
            data[:row] = self.data
            sqnorm = np.full(cap, np.inf, dtype=np.float32)
            sqnorm[:row] = self.sqnorm
            attrs = np.zeros((cap, self.attrs.shape[1]), dtype=np.float64)
            attrs[:row] = self.attrs
            self.data, self.sqnorm, self.attrs = data, sqnorm, attrs
        self.row_ids.append(None)
        return row

    def remove(self, ids: Iterable[str]) -> np.ndarray:
        """Turn these items' rows into holes (unknown ids are ignored); returns the rows."""
        rows = [r for r in (self.rows.pop(i, None) for i in ids) if r is not None]
        for r in rows:
            self.row_ids[r] = None
        arr = np.asarray(rows, dtype=np.int64)
        self.data[arr] = 0.0
        self.sqnorm[arr] = np.inf
        self.attrs[arr] = 0.0
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
        self.attrs[:n] = self.attrs[live]
        self.data[n:] = 0.0
        self.sqnorm[n:] = np.inf
        self.attrs[n:] = 0.0
        self.row_ids = [self.row_ids[r] for r in live.tolist()]
        self.rows = {item_id: r for r, item_id in enumerate(self.row_ids) if item_id is not None}
        self.free = []
        return True

    def sqdist(self, queries: np.ndarray) -> np.ndarray:
        """‖x − q‖² from each query to every row, holes +inf: (B, D) → (B, high) float32.

        The expansion ‖x‖² − 2x·q + ‖q‖² runs at BLAS speed but rounds to within about
        D·eps·(‖x‖² + ‖q‖²), which can swap near-ties; ``scan`` re-ranks to get the exact order.
        """
        high = self.high
        data, sqnorm = self.data[:high], self.sqnorm[:high]  # (H, D), (H,)
        # One query is the streaming case: a mat-vec reads the rows once, in order.
        dist = (data @ queries[0])[None, :] if queries.shape[0] == 1 else row_dots(queries, data)
        # In place, saving two (B, H) temporaries; scaling by −2 is exact and + commutes, so the
        # result is bit for bit ‖x‖² − 2x·q + ‖q‖².
        dist *= -2.0
        dist += sqnorm[None, :]
        dist += np.einsum("ij,ij->i", queries, queries)[:, None]
        return dist

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
        """Exact top-k of all rows for checked (Q, D) queries: ids (Q, k') object array of str,
        float64 distances (Q, k'), k' = min(k, len), rows sorted by (distance, id).

        A BLAS shortlist with a rounding margin, then the float64 re-rank of ``exact_topk``.
        """
        nq, n = queries.shape[0], len(self.rows)
        kk = min(k, n)
        out_ids = np.empty((nq, kk), dtype=object)
        out_d = np.empty((nq, kk), dtype=np.float64)
        if kk == 0:
            return out_ids, out_d
        high = self.high
        sqnorm = self.sqnorm[:high]
        max_norm = float(np.max(sqnorm, where=np.isfinite(sqnorm), initial=0.0))
        block = max(1, BLOCK_ELEMS // max(high, 1))
        for s in range(0, nq, block):
            qb = queries[s : s + block]  # (B, D)
            part = self.sqdist(qb)  # (B, H)
            qn = np.einsum("ij,ij->i", qb, qb)
            for j in range(qb.shape[0]):
                d = part[j]
                cand = np.argpartition(d, kk - 1)[:kk] if kk < high else np.arange(high)
                # Take every row within the rounding margin of the k-th so the float64 re-rank
                # sees all true top-k rows.
                tol = 4.0 * self.dim * _EPS32 * (max_norm + float(qn[j]))
                bound = float(np.max(d[cand])) + tol
                cand = np.flatnonzero(d <= bound)
                ids, dist = self.exact_topk(qb[j], cand, kk)
                out_ids[s + j] = ids
                out_d[s + j] = dist
        return out_ids, out_d
