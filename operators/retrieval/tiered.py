"""The tiered item index: exact scans of the vector store while small, an IVF overlay above."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from operators.retrieval.exceptions import RetrievalError
from operators.retrieval.ivf import Codec, IVFOverlay, auto_nlist
from operators.retrieval.store import BLOCK_ELEMS, VectorStore


class TieredIndex:
    """Item id → float32 vector, searchable by L2: exact below ``exact_below`` items, an IVF
    index (re-ranked exactly) above it. Distances are squared L2.

    The exact float32 vectors always live in one contiguous store (for re-ranking and the exact
    tier); above the threshold a faiss IVF overlay, kept in sync on every upsert, proposes
    ``rerank_factor · k`` candidates per query, which are re-ranked by exact distance.
    The overlay is rebuilt (k-means retrained, ``nlist`` re-sized) when the catalogue has grown
    or shrunk by ``rebuild_growth`` since the last build, or when moved vectors have unbalanced
    its lists by ``max_imbalance_growth``; dropped again below ``exact_below // 2`` (hysteresis,
    so a catalogue hovering at the threshold does not rebuild over and over).

    >>> rng = np.random.default_rng(0)
    >>> ix = TieredIndex(dim=8, exact_below=1500)
    >>> x = rng.standard_normal((2000, 8))
    >>> ix.upsert([f"i{n}" for n in range(2000)], x)
    >>> ix.approximate
    True
    >>> ids, d = ix.search(x[7:8], k=1)
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
        n_attrs: int = 0,
        block_elems: int = BLOCK_ELEMS,
    ) -> None:
        """``block_elems``: most floats of one batched distance block (queries × items or
        queries × candidates × dim); a larger batch is computed a block of queries at a
        time, so no call allocates batch × all-items."""
        # IVF-Flat scan distances are exact up to float32 rounding, so 2·k is margin enough;
        # 8-bit codes misorder near neighbours more and need a longer shortlist.
        if rerank_factor is None:
            rerank_factor = 2 if codec == "flat" else 4
        if rerank_factor < 1 or rebuild_growth <= 1.0 or nprobe < 1:
            raise RetrievalError("need rerank_factor >= 1, rebuild_growth > 1, nprobe >= 1")
        self.dim = dim
        self.exact_below = exact_below
        self.nprobe = nprobe
        self.nlist = nlist
        self.codec: Codec = codec
        self.rerank_factor = rerank_factor
        self.rebuild_growth = rebuild_growth
        self.max_imbalance_growth = max_imbalance_growth
        self.seed = seed
        self.block_elems = max(1, block_elems)
        self.builds = 0  # how many times the IVF overlay was (re)built; for metrics and tests
        self._store = VectorStore(dim, n_attrs=n_attrs)
        self._ivf: IVFOverlay | None = None

    def __len__(self) -> int:
        return len(self._store.rows)

    @property
    def approximate(self) -> bool:
        """True while searches go through the IVF overlay."""
        return self._ivf is not None

    def upsert(
        self, ids: Sequence[str], vectors: np.ndarray, attrs: np.ndarray | None = None
    ) -> None:
        """Insert new items or replace the vectors of known ones; ``vectors`` is (len(ids), D),
        ``attrs`` (len(ids), n_attrs) their attributes (see ``attributes``)."""
        rows, v = self._store.upsert(ids, vectors, attrs)
        if self._ivf is not None:
            self._ivf.upsert(rows, v)
        self._maintain()

    def remove(self, ids: Iterable[str]) -> int:
        """Forget these items (unknown ids are ignored); returns how many were removed."""
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
        self._ivf = IVFOverlay(self._store, nlist, min(self.nprobe, nlist), self.codec, self.seed)
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

    def _queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        if k <= 0:
            raise RetrievalError(f"k must be positive, got {k}")
        return self._store.check(queries)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: ids (Q, k') object array of str, float64 distances (Q, k'),
        k' = min(k, len(self)); rows sorted by (distance, id).

        Re-ranked by the exact distance to the current vectors, ties broken by item id, so equal
        inputs give equal outputs whatever the insertion history.
        """
        q = self._queries(queries, k)
        if self._ivf is None:
            return self._store.scan(q, k)
        kk = min(k, len(self))
        labels = self._ivf.propose(q, kk * self.rerank_factor, self.nprobe)  # (Q, r·k)
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

    def search_exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k whatever the tier: the reference for measuring recall on live data."""
        return self._store.scan(self._queries(queries, k), k)

    def _blocks(self, nq: int, width: int) -> Iterator[slice]:
        """Slices of a batch of ``nq`` queries, each needing at most ``block_elems`` floats
        of ``width`` per query (at least one query per block)."""
        step = max(1, self.block_elems // max(1, width))
        for start in range(0, nq, step):
            yield slice(start, min(nq, start + step))

    def ranks(
        self, queries: np.ndarray, true_ids: Sequence[str], true_vectors: np.ndarray
    ) -> np.ndarray:
        """Per query, 1 + the number of other items strictly closer than its true vector.

        The live evaluation's exact rank (ties favour the true item, as in the offline
        evaluation): a scan of every vector, each true item's own row replaced by the vector
        the caller knows to be current, a block of queries at a time.
        (B, D), B ids, (B, D) → (B,) int64.
        """
        store = self._store
        q = store.check(queries)
        t = store.check(true_vectors, q.shape[0])
        diff = t - q
        true = np.einsum("ij,ij->i", diff, diff)  # (B,)
        out = np.empty(q.shape[0], dtype=np.int64)
        for block in self._blocks(q.shape[0], store.high):
            dist = store.sqdist(q[block])  # (b, H), b·H ≤ block_elems
            for b, item_id in enumerate(true_ids[block]):
                own = store.rows.get(item_id)
                if own is not None:
                    dist[b, own] = np.inf
            out[block] = 1 + np.count_nonzero(dist < true[block, None], axis=1)
        return out

    def attributes(self) -> np.ndarray:
        """(rows, n_attrs) float64: each row's attributes, aligned with ``recommend``'s
        ``prior`` (holes hold zeros; they are never returned)."""
        return self._store.attrs[: self._store.high]

    def top(self, column: int, k: int) -> list[str]:
        """Ids of the k items with the highest attribute ``column`` (ties: lower row)."""
        return [i for i, _v in self.top_by(self._store.attrs[: self._store.high, column], k)]

    def top_by(self, values: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k items with the highest of ``values`` (rows,), aligned with ``attributes()``,
        with their values (ties: lower row; holes never)."""
        store = self._store
        high = store.high
        if high == 0 or k <= 0:
            return []
        values = np.where(np.isfinite(store.sqnorm[:high]), values[:high], -np.inf)
        m = min(k, high)
        part = np.argpartition(-values, m - 1)[:m] if m < high else np.arange(high)
        order = part[np.lexsort((part, -values[part]))]
        return [
            (str(store.row_ids[r]), float(values[r]))
            for r in order.tolist()
            if np.isfinite(values[r])
        ]

    def attributes_of(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), n_attrs) float64: these indexed items' attributes (copies)."""
        return self._store.attrs[[self._store.rows[i] for i in ids]]

    def get(self, item_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The item's indexed vector (D,) and attributes (n_attrs,), copies; None if unknown."""
        row = self._store.rows.get(item_id)
        if row is None:
            return None
        return self._store.data[row].copy(), self._store.attrs[row].copy()

    def recommend(
        self,
        queries: np.ndarray,
        k: int,
        extra: Sequence[Sequence[str]],
        *,
        scale: float = 1.0,
        prior: np.ndarray | None = None,
        bonus: Sequence[Mapping[str, float]] | None = None,
        fresh: Sequence[tuple[str, np.ndarray] | None] | None = None,
    ) -> list[tuple[list[str], np.ndarray]]:
        """Per query, the k best of (its shortlist ∪ ``extra[b]``) by the key
        ``scale · ‖x − q‖² − prior − bonus`` (lowest first; plain distance by default): the
        serving path, batched. Returns each query's ids and keys.

        ``prior``: (rows,) or (B, rows) per-row terms aligned with ``attributes()``; ``bonus``:
        per query, item → an extra term (e.g. for the user's own items; pass them in ``extra``
        too). Exact tier: all distances in one BLAS product (float32 ‖x‖² − 2x·q + ‖q‖², which
        can swap near-ties within ~1e-5 of each other); the 2k best keys and the extras
        compete, which is the exact top k of the key over every item. IVF tier: the overlay's
        ``rerank_factor · k`` proposals, the 2k best rows by ``prior`` (a (rows,) prior only)
        and the extras, by direct float32 distance. Queries go a block at a time
        (``block_elems``), so no batch × all-items scratch is allocated at once. ``fresh``: per
        query, an (item, vector) whose distance is taken from that vector instead of the
        index's (a state newer than the one indexed; the item must be indexed and in
        ``extra``).
        """
        q = self._queries(queries, k)
        nq = q.shape[0]
        if len(self) == 0:
            return [([], np.empty(0)) for _ in range(nq)]
        if self._ivf is None:
            width = self._store.high
        else:
            longest = max((len(e) for e in extra), default=0)
            width = (min(k, len(self)) * self.rerank_factor + longest) * self.dim
        out: list[tuple[list[str], np.ndarray]] = []
        for block in self._blocks(nq, width):
            out += self._recommend(
                q[block],
                k,
                extra[block],
                scale,
                prior if prior is None or prior.ndim == 1 else prior[block],
                None if bonus is None else bonus[block],
                None if fresh is None else fresh[block],
            )
        return out

    def _recommend(
        self,
        q: np.ndarray,
        k: int,
        extra: Sequence[Sequence[str]],
        scale: float,
        prior: np.ndarray | None,
        bonus: Sequence[Mapping[str, float]] | None,
        fresh: Sequence[tuple[str, np.ndarray] | None] | None = None,
    ) -> list[tuple[list[str], np.ndarray]]:
        store, n = self._store, len(self)
        nq = q.shape[0]
        high = store.high
        rows_of = store.rows
        extra_rows = [
            np.fromiter((rows_of[i] for i in extra[b] if i in rows_of), dtype=np.int64)
            for b in range(nq)
        ]
        full: np.ndarray | None = None
        keyed = scale != 1.0 or prior is not None
        if self._ivf is None:
            # The shortlist and the extras are read off the same matrix, no vector is gathered.
            full = store.sqdist(q)  # (B, H)
            shortkey = full
            if keyed:
                shortkey = scale * full.astype(np.float64)
                if prior is not None:
                    shortkey -= np.broadcast_to(prior, shortkey.shape)
                shortkey[~np.isfinite(full)] = np.inf
            m = min(2 * k, high)
            short = (
                np.argpartition(shortkey, m - 1, axis=1)[:, :m]
                if m < high
                else np.tile(np.arange(high), (nq, 1))
            )
        else:
            short = self._ivf.propose(q, min(k, n) * self.rerank_factor, self.nprobe)
            if prior is not None and prior.ndim == 1 and high:
                m = min(2 * k, high)
                top = np.argpartition(-prior, m - 1)[:m] if m < high else np.arange(high)
                short = np.concatenate([short, np.tile(top, (nq, 1))], axis=1)
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
        for b, override in enumerate(fresh or ()):
            row = None if override is None else rows_of.get(override[0])
            if override is not None and row is not None:
                diff = np.asarray(override[1], dtype=np.float32) - q[b]
                dist[b, rows[b] == row] = float(np.dot(diff, diff))
        key: np.ndarray = dist
        if keyed or bonus is not None:
            finite = np.isfinite(dist)
            key = scale * dist
            if prior is not None:
                p = prior[safe] if prior.ndim == 1 else np.take_along_axis(prior, safe, axis=1)
                key -= p
            if bonus is not None:
                # A bonus names a few items (the user's history): find their rows, not every
                # candidate's id.
                for b in range(nq):
                    for item, value in bonus[b].items():
                        row = rows_of.get(item)
                        if row is not None:
                            key[b, rows[b] == row] -= value
            key[~finite] = np.inf
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(key, order, axis=1)
        picked = np.take_along_axis(rows, order, axis=1)
        row_ids = store.row_ids
        out = []
        for b in range(nq):
            finite = np.isfinite(top[b])
            out.append(([str(row_ids[r]) for r in picked[b][finite].tolist()], top[b][finite]))
        return out

    def memory_bytes(self) -> int:
        """Approximate resident size: the vector store plus the IVF codes, ids and centroids."""
        st = self._store
        total = st.data.nbytes + st.sqnorm.nbytes + 100 * len(st.rows)  # ~100 B/id in dict+list
        if self._ivf is not None:
            ix = self._ivf.index
            # code + int64 id per vector, ~32 B per hash-table entry, the centroids
            total += ix.ntotal * (ix.code_size + 8 + 32) + ix.nlist * self.dim * 4
        return int(total)
