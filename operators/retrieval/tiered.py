"""The tiered item index: exact scans of the vector store while small, an approximate overlay
(a keyed fast-scan IVF-PQ by default, or the plain IVF) above."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal, cast

import numpy as np

from operators.retrieval.exceptions import RetrievalError
from operators.retrieval.ivf import Codec, IVFOverlay, auto_nlist
from operators.retrieval.keyed import BoundedPriors, Key, KeyedOverlay, Prior, QueryPriors
from operators.retrieval.store import BLOCK_ELEMS, VectorStore

#: The exact tier keys per-query item terms (``BoundedPriors``) by their bound from this many
#: rows on, and exactly only for each query's ``PRUNED_WIDTH`` lowest bounds.
PRUNE_FROM = 256
PRUNED_WIDTH = 48
#: Most (queries × items) floats of one block of the exact tier's ranking. Its keys pass over
#: such arrays about ten times (distances, bounds, partition), so a block that stays in the
#: processor's cache costs less than one batch-wide: 0.81–0.87 of the CPU per query on 20,000
#: Wikipedia events, 1,000 per call over 844–892 items, with the same lists
#: (``benchmarks/ranking_blocks.py``).
CACHE_BLOCK_ELEMS = 1 << 18
#: The approximate tier. "keyed": fast-scan IVF-PQ codes of the vectors with the ranker's item
#: term folded in (``KeyedOverlay``), a long shortlist re-ranked exactly; "ivf": the plain IVF
#: overlay of the distance alone (``IVFOverlay``), the 2k best items by prior added.
Kind = Literal["keyed", "ivf"]
#: Lists probed per query when not given. keyed: recall@10 of the served key ≥ 0.98 at 100k
#: and 1M items on ``benchmarks/retrieval.py``'s data; ivf: what workers probed before keyed.
DEFAULT_NPROBE: dict[str, int] = {"keyed": 128, "ivf": 48}


def _distinct(rows: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a short int array (``np.unique`` costs more at this size)."""
    rows = np.sort(rows)
    return rows[np.concatenate(([True], rows[1:] != rows[:-1]))] if rows.size else rows


class TieredIndex:
    """Item id → float32 vector, searchable by L2 or by a ranking key: exact below
    ``exact_below`` items, an approximate overlay (re-ranked exactly) above it. Distances are
    squared L2.

    The exact float32 vectors always live in one contiguous store (for re-ranking and the exact
    tier); above the threshold a faiss overlay, kept in sync on every upsert, proposes
    candidates per query (``shortlist`` of them for the keyed overlay, ``rerank_factor · k``
    for the plain IVF), which are re-ranked exactly. The keyed overlay folds the ranking key's
    item term in (see ``recommend``), so its candidates are the best by the key, not by the
    distance alone. The overlay is rebuilt (k-means retrained, ``nlist`` re-sized) when the
    catalogue has grown or shrunk by ``rebuild_growth`` since the last build, or when moved
    vectors have unbalanced its lists by ``max_imbalance_growth``; dropped again below
    ``exact_below // 2`` (hysteresis, so a catalogue hovering at the threshold does not rebuild
    over and over).

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
        kind: Kind = "keyed",
        nprobe: int | None = None,
        nlist: int | None = None,
        codec: Codec = "flat",
        rerank_factor: int | None = None,
        shortlist: int = 256,
        bands: int = 8,
        rebuild_growth: float = 2.0,
        max_imbalance_growth: float = 1.5,
        seed: int = 0,
        n_attrs: int = 0,
        block_elems: int = BLOCK_ELEMS,
    ) -> None:
        """``block_elems``: most floats of one batched distance block (queries × items or
        queries × candidates × dim); a larger batch is computed a block of queries at a
        time, so no call allocates batch × all-items. ``codec`` and ``rerank_factor`` are the
        plain IVF's; ``shortlist`` (candidates re-ranked per query) and ``bands`` (of the prior,
        each cell's list split by them) the keyed overlay's."""
        # IVF-Flat scan distances are exact up to float32 rounding, so 2·k is margin enough;
        # 8-bit codes misorder near neighbours more and need a longer shortlist.
        if rerank_factor is None:
            rerank_factor = 2 if codec == "flat" else 4
        if nprobe is None:
            nprobe = DEFAULT_NPROBE[kind]
        if rerank_factor < 1 or rebuild_growth <= 1.0 or nprobe < 1 or shortlist < 1:
            raise RetrievalError(
                "need rerank_factor >= 1, rebuild_growth > 1, nprobe >= 1, shortlist >= 1"
            )
        self.dim = dim
        self.exact_below = exact_below
        self.kind: Kind = kind
        self.nprobe = nprobe
        self.shortlist = shortlist
        self.bands = bands
        self.nlist = nlist
        self.codec: Codec = codec
        self.rerank_factor = rerank_factor
        self.rebuild_growth = rebuild_growth
        self.max_imbalance_growth = max_imbalance_growth
        self.seed = seed
        self.block_elems = max(1, block_elems)
        self.builds = 0  # how many times the IVF overlay was (re)built; for metrics and tests
        self._store = VectorStore(dim, n_attrs=n_attrs)
        self._ivf: IVFOverlay | KeyedOverlay | None = None
        # The ranking key the keyed overlay folds: the latest one ``recommend`` was given.
        self._key = Key()

    def __len__(self) -> int:
        return len(self._store.rows)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._store.rows

    @property
    def approximate(self) -> bool:
        """True while searches go through the approximate overlay."""
        return self._ivf is not None

    def set_key(self, scale: float = 1.0, prior: Prior | None = None) -> None:
        """The ranking key ``recommend`` will be asked for (see there), known before the
        items are: the keyed overlay is then built folded for it, not rebuilt on first use."""
        self._fold(Key(scale, prior))

    def _fold(self, key: Key) -> None:
        self._key = key
        ivf = self._ivf
        if isinstance(ivf, KeyedOverlay):
            if key.folds_like(ivf.key):
                ivf.key = key  # rows upserted from now on fold the newest prior
            else:
                self.rebuild()

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
        """Retrain and refill the overlay now (e.g. from a background schedule); the keyed
        one refolds every row with the current key."""
        n = len(self)
        nlist = self.nlist or auto_nlist(n)
        nlist = max(1, min(nlist, n // 39))  # faiss k-means wants >= 39 points per centroid
        self._ivf = None  # the old overlay's memory is free while the new one trains
        if self.kind == "keyed":
            self._ivf = KeyedOverlay(
                self._store, self._key, nlist, self.nprobe, self.seed, self.bands
            )
        else:
            self._ivf = IVFOverlay(
                self._store, nlist, min(self.nprobe, nlist), self.codec, self.seed
            )
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
        inputs give equal outputs whatever the insertion history. The keyed overlay proposes by
        the key it folds (see ``recommend``): with a prior folded, plain distance is not what
        it serves, and ``search_exact`` is the reference.
        """
        q = self._queries(queries, k)
        if self._ivf is None:
            return self._store.scan(q, k)
        kk = min(k, len(self))
        labels = self._propose(q, kk)  # (Q, R)
        out_ids = np.empty((q.shape[0], kk), dtype=object)
        out_d = np.empty((q.shape[0], kk), dtype=np.float64)
        for j in range(q.shape[0]):
            rows = np.unique(labels[j][labels[j] >= 0])
            ids, dist = self._store.exact_topk(q[j], rows, kk)
            if len(ids) < kk:  # the probed cells held fewer than k items: answer exactly
                sid, sd = self._store.scan(q[j : j + 1], kk)
                ids, dist = list(sid[0]), sd[0]
            out_ids[j] = ids
            out_d[j] = dist
        return out_ids, out_d

    def _propose(self, q: np.ndarray, k: int) -> np.ndarray:
        """(Q, D) → (Q, R) candidate rows from the overlay, −1 padded (rows may repeat)."""
        ivf = self._ivf
        assert ivf is not None
        if isinstance(ivf, KeyedOverlay):
            ivf.nprobe = self.nprobe
            return ivf.propose(q, max(self.shortlist, 2 * k))
        return ivf.propose(q, k * self.rerank_factor, self.nprobe)

    def _shortlist_width(self, k: int) -> int:
        """Most rows ``_propose`` returns per query for this k."""
        ivf = self._ivf
        if isinstance(ivf, KeyedOverlay):
            return max(self.shortlist, 2 * k) + len(ivf.over)
        return k * self.rerank_factor

    def search_exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k whatever the tier: the reference for measuring recall on live data."""
        return self._store.scan(self._queries(queries, k), k)

    def _blocks(self, nq: int, width: int, most: int | None = None) -> Iterator[slice]:
        """Slices of a batch of ``nq`` queries, each needing at most ``block_elems`` floats
        (and ``most``) of ``width`` per query, at least one query per block. Blocks are of
        even sizes, and of two queries at least where two fit (a block may then hold one
        more than fits): a lone query would take the distances' mat-vec path, whose rounding
        differs from the batched product's (``VectorStore.sqdist``)."""
        most = self.block_elems if most is None else min(self.block_elems, most)
        step = max(1, most // max(1, width))
        blocks = -(-nq // step)
        if step > 1:
            blocks = min(blocks, max(1, nq // 2))
        for n in range(blocks):
            yield slice(n * nq // blocks, (n + 1) * nq // blocks)

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

    def lookup(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """These items' indexed vectors (n, D) and attributes (n, n_attrs), gathered at once
        (copies), with which of them the index holds (n,) bool (zeros where it does not)."""
        held, safe = self._held_rows(ids)
        vectors = self._store.data[safe]
        attrs = self._store.attrs[safe]
        vectors[~held] = 0.0
        attrs[~held] = 0.0
        return held, vectors, attrs

    def held_attributes(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Which of these items the index holds (n,) bool, and their attributes (n, n_attrs)
        (copies; zeros where it does not): ``lookup`` without the vectors."""
        held, safe = self._held_rows(ids)
        attrs = self._store.attrs[safe]
        attrs[~held] = 0.0
        return held, attrs

    def _held_rows(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Which of these items the index holds (n,) bool, and their rows (row 0 where it
        does not, to gather from and then clear)."""
        rows_of = self._store.rows
        rows = np.fromiter((rows_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        held = rows >= 0
        return held, np.where(held, rows, 0)

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
        prior: Prior | None = None,
        bonus: Sequence[Mapping[str, float]] | None = None,
        fresh: Sequence[tuple[str, np.ndarray] | None] | None = None,
        priors: QueryPriors | None = None,
    ) -> list[tuple[list[str], np.ndarray]]:
        """Per query, the k best of (its shortlist ∪ ``extra[b]``) by the key
        ``scale · ‖x − q‖² − prior − bonus`` (lowest first; plain distance by default): the
        serving path, batched. Returns each query's ids and keys.

        ``prior``: the item-only term, a function of the rows' ``attributes()`` (called on
        candidates only in the approximate tier); ``bonus``: per query, item → an extra term
        (e.g. for the user's own items; pass them in ``extra`` too). Exact tier: all distances
        in one BLAS product (float32 ‖x‖² − 2x·q + ‖q‖², which can swap near-ties within ~1e-5
        of each other), every item's key from them, and its k best (``extra`` adds nothing
        there: every item competes). Keyed tier: the overlay folds ``scale`` and ``prior`` into its
        vectors (a key of another form than the last refolds it: a rebuild), proposes its
        ``shortlist`` best by that key, and those with the extras are scored exactly. Plain IVF
        tier: the overlay's ``rerank_factor · k`` proposals by distance, the 2k best rows by
        ``prior`` and the extras, by direct float32 distance. Queries go a block at a time
        (``block_elems``), so no batch × all-items scratch is allocated at once. ``fresh``: per
        query, an (item, vector) whose distance is taken from that vector instead of the
        index's (a state newer than the one indexed; the item must be indexed and in
        ``extra``). ``priors``: each query's own item-only term, of the same form as
        ``prior`` (which must be given too: the shortlists are drawn by it), for the keys
        themselves — a ranker whose item terms depend on each query's time; called with rows'
        attributes and a slice of the queries, it gives their terms (queries, rows). Exact
        tier: over every item, a block of queries at a time; approximate tiers: over each
        query's candidates.
        """
        if priors is not None and prior is None:
            raise ValueError("priors needs a prior to draw the shortlists by")
        q = self._queries(queries, k)
        nq = q.shape[0]
        if len(self) == 0:
            return [([], np.empty(0)) for _ in range(nq)]
        self._fold(Key(scale, prior))
        # Every row's prior, where the shortlist needs it: the exact tier ranks every item by
        # the key and the plain IVF adds the 2k best by prior; the keyed tier scores candidates.
        everyone: np.ndarray | None = None
        if prior is not None and not isinstance(self._ivf, KeyedOverlay):
            everyone = np.asarray(prior(self.attributes()), dtype=np.float64)
        if self._ivf is None:
            width = self._store.high
        else:
            longest = max((len(e) for e in extra), default=0)
            width = (self._shortlist_width(min(k, len(self))) + longest) * self.dim
        out: list[tuple[list[str], np.ndarray]] = []
        # The exact tier's blocks fit the cache, two queries at least (see ``_blocks``).
        most = max(CACHE_BLOCK_ELEMS, 2 * width) if self._ivf is None else None
        for block in self._blocks(nq, width, most):
            if self._ivf is None:
                if (
                    isinstance(priors, BoundedPriors)
                    and self._store.high >= PRUNE_FROM
                    and 2 * k <= PRUNED_WIDTH
                ):
                    out += self._recommend_exact_pruned(
                        q[block],
                        k,
                        scale,
                        priors,
                        block,
                        None if bonus is None else bonus[block],
                        None if fresh is None else fresh[block],
                    )
                    continue
                if priors is not None:  # (B, H): each query's item terms over every row
                    everyone = np.asarray(priors(self.attributes(), block), dtype=np.float64)
                out += self._recommend_exact(
                    q[block],
                    k,
                    scale,
                    prior is not None,
                    everyone,
                    None if bonus is None else bonus[block],
                    None if fresh is None else fresh[block],
                )
                continue
            out += self._recommend(
                q[block],
                k,
                extra[block],
                scale,
                prior,
                everyone,
                None if bonus is None else bonus[block],
                None if fresh is None else fresh[block],
                priors,
                block.start,
            )
        return out

    def _recommend_exact(
        self,
        q: np.ndarray,
        k: int,
        scale: float,
        has_prior: bool,
        everyone: np.ndarray | None,
        bonus: Sequence[Mapping[str, float]] | None,
        fresh: Sequence[tuple[str, np.ndarray] | None] | None,
    ) -> list[tuple[list[str], np.ndarray]]:
        """The exact tier: every row's key (``scale`` · distance − prior − bonus, the same
        terms the approximate tiers form over their candidates) from one distance matrix,
        and the k best per query, equal keys by row. Over a small catalogue the whole key
        costs less than gathering each query's candidates in Python."""
        dist = self._exact_distances(q, fresh)
        key = dist
        if scale != 1.0 or has_prior or bonus is not None:
            finite = np.isfinite(dist)
            key = scale * dist
            if everyone is not None:
                key -= everyone if everyone.ndim == 2 else everyone[None, :]
            at_b, at_row, values = self._bonus_entries(bonus)
            if values.size:
                key[at_b, at_row] -= values
            key[~finite] = np.inf
        return self._k_best(key, k)

    def _k_best(
        self, key: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> list[tuple[list[str], np.ndarray]]:
        """Per query, the k lowest of ``key`` (B, W) over its ``rows`` (B, W), each query's
        in ascending order (None: every row, column j is row j), ranked as ``_ranked`` does:
        equal keys keep the lower row first."""
        nq, width = key.shape
        if k < width:
            pick = np.argpartition(key, k - 1, axis=1)[:, :k]
            pick.sort(axis=1)  # row order, so that equal keys keep the lower row first
        else:
            pick = np.tile(np.arange(width), (nq, 1))
        picked = pick if rows is None else np.take_along_axis(rows, pick, axis=1)
        return self._ranked(np.take_along_axis(key, pick, axis=1), picked, k)

    def _exact_distances(
        self, q: np.ndarray, fresh: Sequence[tuple[str, np.ndarray] | None] | None
    ) -> np.ndarray:
        """(B, H) float64 distances from each query to every row, holes +inf, ``fresh``'s
        item at its given vector."""
        store = self._store
        dist = store.sqdist(q).astype(np.float64)
        dist[:, ~np.isfinite(store.sqnorm[: store.high])] = np.inf
        at, rows, fresh_dist = self._fresh_distances(q, fresh)
        dist[at, rows] = fresh_dist
        return dist

    def _fresh_distances(
        self, q: np.ndarray, fresh: Sequence[tuple[str, np.ndarray] | None] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``fresh``'s squared distances, for the queries whose item the index holds: those
        queries, their item's rows, the distances (float32). Each is the dot product of the
        difference with itself as ``np.dot`` takes it: numpy's stacked matmul of (1, D) by
        (D, 1) runs the same dot per pair, bit for bit (``tests/operators/retrieval``), and
        costs one call for the batch instead of two per query."""
        rows_of = self._store.rows
        held = [
            (b, row, override[1])
            for b, override in enumerate(fresh or ())
            if override is not None and (row := rows_of.get(override[0])) is not None
        ]
        if not held:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        at = np.fromiter((b for b, _row, _v in held), dtype=np.int64, count=len(held))
        rows = np.fromiter((row for _b, row, _v in held), dtype=np.int64, count=len(held))
        diff = np.stack([np.asarray(v, dtype=np.float32) for _b, _row, v in held])
        diff -= q[at]
        return at, rows, np.matmul(diff[:, None, :], diff[:, :, None])[:, 0, 0]

    def _bonus_entries(
        self, bonus: Sequence[Mapping[str, float]] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``bonus`` as (query, row, value) entries, for one subtraction per entry; items the
        index does not hold are left out. Queries and rows as int arrays: numpy indexes by
        them directly, where lists would be converted again at each use (13x slower to index
        a (1,000, 900) array by 16,000 entries)."""
        if not bonus:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
        get = self._store.rows.get
        sizes = [len(terms) for terms in bonus]
        rows = np.fromiter(
            (get(item, -1) for terms in bonus for item in terms), dtype=np.int64, count=sum(sizes)
        )
        values = np.fromiter(
            (v for terms in bonus for v in terms.values()), dtype=np.float64, count=rows.size
        )
        held = rows >= 0
        at_b = np.repeat(np.arange(len(bonus)), sizes)[held]
        return at_b, rows[held], values[held]

    def _recommend_exact_pruned(
        self,
        q: np.ndarray,
        k: int,
        scale: float,
        priors: BoundedPriors,
        block: slice,
        bonus: Sequence[Mapping[str, float]] | None,
        fresh: Sequence[tuple[str, np.ndarray] | None] | None,
    ) -> list[tuple[list[str], np.ndarray]]:
        """``_recommend_exact`` with per-query item terms, without computing them for every
        (query, item): each item's key is first bounded from below with the bound of its
        term over the block's queries (``priors.upper``), the ``PRUNED_WIDTH`` lowest bounds
        of each query are keyed exactly (``priors.at``, the same arithmetic as the full
        terms), and a query whose k-th exact key is below every bound left out has its k
        best among them. The few others are keyed over every item. Every query's terms are
        taken at its own time."""
        high = self._store.high
        nq = q.shape[0]
        dist = self._exact_distances(q, fresh)
        attrs = self.attributes()
        at_b, at_row, values = self._bonus_entries(bonus)
        # A lower bound of every key: an item's term is at most its bound, and the bonus
        # (the user's own items) is subtracted as the key subtracts it. A hole's distance is
        # +inf, and so is its bound.
        lower = scale * dist
        lower -= priors.upper(attrs, block)[None, :]
        if values.size:
            lower[at_b, at_row] -= values
        width = min(PRUNED_WIDTH, high - 1)
        cand, floor = _lowest(lower, width)
        at = np.arange(nq)[:, None]
        near = dist[at, cand]
        key = scale * near - priors.at(attrs[cand], block)
        if values.size:
            # Each bonus entry's place among its query's candidates, if it is one of them
            # (the candidates of query b, offset by b · H, are one sorted array).
            flat = (cand + at * high).ravel()
            wanted = at_b * high + at_row
            where = np.minimum(np.searchsorted(flat, wanted), flat.size - 1)
            hit = flat[where] == wanted
            key.ravel()[where[hit]] -= values[hit]
        key[~np.isfinite(near)] = np.inf
        kth = np.partition(key, k - 1, axis=1)[:, k - 1]
        decided = kth < floor
        out: list[tuple[list[str], np.ndarray]] = [([], np.empty(0))] * nq
        mine = np.flatnonzero(decided)
        if mine.size:
            for b, r in zip(mine.tolist(), self._k_best(key[mine], k, cand[mine]), strict=True):
                out[b] = r
        rest = np.flatnonzero(~decided)
        if rest.size:
            # Keyed over every item, as ``_recommend_exact`` keys them.
            every = np.broadcast_to(attrs, (rest.size, *attrs.shape))
            full = scale * dist[rest] - priors.at(every, (block.start or 0) + rest)
            if values.size:
                bonus_of = np.zeros((nq, high))
                bonus_of[at_b, at_row] = values
                full -= bonus_of[rest]  # x − 0 is x: the other entries keep their key
            full[~np.isfinite(dist[rest])] = np.inf
            for b, r in zip(rest.tolist(), self._k_best(full, k), strict=True):
                out[b] = r
        return out

    def _recommend(
        self,
        q: np.ndarray,
        k: int,
        extra: Sequence[Sequence[str]],
        scale: float,
        prior: Prior | None,
        everyone: np.ndarray | None,
        bonus: Sequence[Mapping[str, float]] | None,
        fresh: Sequence[tuple[str, np.ndarray] | None] | None = None,
        priors: QueryPriors | None = None,
        first: int = 0,
    ) -> list[tuple[list[str], np.ndarray]]:
        """The approximate tiers' ``recommend`` of queries ``first`` on (see there)."""
        store, n = self._store, len(self)
        nq = q.shape[0]
        high = store.high
        rows_of = store.rows
        extra_rows = [
            np.fromiter((rows_of[i] for i in extra[b] if i in rows_of), dtype=np.int64)
            for b in range(nq)
        ]
        keyed = scale != 1.0 or prior is not None
        short = self._propose(q, min(k, n))
        if everyone is not None and high:
            m = min(2 * k, high)
            top = np.argpartition(-everyone, m - 1)[:m] if m < high else np.arange(high)
            short = np.concatenate([short, np.tile(top, (nq, 1))], axis=1)
        lists = [
            _distinct(np.concatenate([short[b][short[b] >= 0], extra_rows[b]])) for b in range(nq)
        ]
        width = max(len(r) for r in lists)
        rows = np.full((nq, width), -1, dtype=np.int64)
        for b, r in enumerate(lists):
            rows[b, : len(r)] = r
        safe = np.maximum(rows, 0)
        # A query at a time: its candidates' vectors stay in cache (a batch's (B, W, D)
        # gather is tens of MiB and cost 5x more per query, measured at B = 200).
        dist = np.empty(rows.shape)
        for b in range(nq):
            diff = store.data[safe[b]] - q[b]  # (W, D)
            dist[b] = np.einsum("wd,wd->w", diff, diff)
        dist[(rows < 0) | ~np.isfinite(store.sqnorm[safe])] = np.inf
        fresh_at, fresh_rows, fresh_dist = self._fresh_distances(q, fresh)
        for b, row, value in zip(fresh_at.tolist(), fresh_rows.tolist(), fresh_dist, strict=True):
            dist[b, rows[b] == row] = value
        key: np.ndarray = dist
        if keyed or bonus is not None:
            finite = np.isfinite(dist)
            key = scale * dist
            if priors is not None:
                for b in range(nq):
                    at = slice(first + b, first + b + 1)
                    key[b] -= np.asarray(priors(store.attrs[safe[b]], at), np.float64)[0]
            elif everyone is not None:
                key -= everyone[safe]
            elif prior is not None:
                key -= np.asarray(prior(store.attrs[safe.ravel()]), np.float64).reshape(safe.shape)
            for b, terms in enumerate(bonus or ()):
                # A few bonus items against hundreds of candidates: match rows, not ids.
                known = [(rows_of[i], v) for i, v in terms.items() if i in rows_of]
                if known:
                    brows, bvals = np.array(known).T  # (2, m)
                    key[b] -= (rows[b][:, None] == brows[None, :].astype(np.int64)) @ bvals
            key[~finite] = np.inf
        return self._ranked(key, rows, k)

    def _ranked(
        self, key: np.ndarray, rows: np.ndarray, k: int
    ) -> list[tuple[list[str], np.ndarray]]:
        """Per query, its candidates ``rows`` (B, W) with the k lowest finite ``key`` (B, W),
        lowest first (equal keys in the candidates' order), as ids and keys."""
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(key, order, axis=1)
        picked = np.take_along_axis(rows, order, axis=1)
        # A finite key is a held row's: its id is a str, not a hole's None.
        row_ids = cast(list[str], self._store.row_ids)
        finite = np.isfinite(top)
        if finite.all():  # the usual case: every query has k items
            return [
                ([row_ids[r] for r in rows], keys)
                for rows, keys in zip(picked.tolist(), top, strict=True)
            ]
        out = []
        for b in range(key.shape[0]):
            ok = finite[b]
            out.append(([row_ids[r] for r in picked[b][ok].tolist()], top[b][ok]))
        return out

    def memory_bytes(self) -> int:
        """Approximate resident size: the vector store plus the overlay (codes, ids, centroids)."""
        st = self._store
        total = st.data.nbytes + st.sqnorm.nbytes + st.attrs.nbytes
        total += 100 * len(st.rows)  # ~100 B/id in dict+list
        if isinstance(self._ivf, KeyedOverlay):
            total += self._ivf.memory_bytes()
        elif self._ivf is not None:
            ix = self._ivf.index
            # code + int64 id per vector, ~32 B per hash-table entry, the centroids
            total += ix.ntotal * (ix.code_size + 8 + 32) + ix.nlist * self.dim * 4
        return int(total)


def _lowest(lower: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``lower`` (B, H) float64, ``width`` columns of its lowest values in column
    order (B, width), and a floor (B,) no column left out is below.

    Rounding to float32 keeps order (a ≤ b gives f32(a) ≤ f32(b)), and a float32 partition
    costs less than a float64 argpartition of the same rows: t, the
    (width + 1)-th lowest float32 value, leaves exactly ``width`` values strictly below it
    unless values tie at t; every value left out rounds to t or above, so is at least the
    float32 just below t — the floor, one float32 step under the exact one at most. Rows with
    ties take the float64 argpartition, whose floor is exact.
    """
    low32 = lower.astype(np.float32)
    t = np.partition(low32, width, axis=1)[:, width]
    below = low32 < t[:, None]
    plain = np.count_nonzero(below, axis=1) == width
    cand = np.empty((lower.shape[0], width), dtype=np.int64)
    floor = np.empty(lower.shape[0])
    if plain.any():
        cand[plain] = np.nonzero(below[plain])[1].reshape(-1, width)
        floor[plain] = np.nextafter(t[plain], np.float32(-np.inf))
    tied = np.flatnonzero(~plain)
    if tied.size:
        part = np.argpartition(lower[tied], width, axis=1)
        floor[tied] = np.take_along_axis(lower[tied], part[:, width : width + 1], axis=1)[:, 0]
        cand[tied] = np.sort(part[:, :width], axis=1)
    return cand, floor
