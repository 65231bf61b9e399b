"""Co-occurrence candidates: items whose recent audiences resemble, by datasketch MinHash LSH."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from datasketch import LeanMinHash, MinHash, MinHashLSH

from operators.retrieval.exceptions import RetrievalError


class CooccurrenceCandidates:
    """Items whose recent audiences (sets of user ids) resemble those of a user's recent items.

    Each item keeps its last ``audience_size`` distinct users; its MinHash (Jaccard on that set)
    sits in a datasketch ``MinHashLSH``. Re-hashing costs O(audience_size · num_perm), so an
    item is re-hashed only after ``rehash_every`` audience changes (a new item is hashed at once):
    the update cost per event is bounded and amortised, at the price of signatures at most
    ``rehash_every − 1`` users stale. An item's neighbour list is likewise re-queried only every
    ``requery_every`` observed events.

    Memory is bounded whatever the number of items and users: at most ``max_items`` items
    keep an audience (the most recently touched; the least recent one is forgotten, audience,
    sketch and all, when a new one comes), and at most ``neighbour_cache`` neighbour lists are
    cached (least recently used dropped, queried again when next needed).

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
        max_items: int = 10_000,
        neighbour_cache: int = 10_000,
    ) -> None:
        if max_items < 1 or neighbour_cache < 1:
            raise RetrievalError("max_items and neighbour_cache must be positive")
        self.audience_size = audience_size
        self.max_items = max_items
        self.neighbour_cache = neighbour_cache
        # An item's LSH neighbours are re-queried after this many observed events (a datasketch
        # query is ~100 µs of Python; the neighbourhood drifts slowly).
        self.requery_every = max(1, requery_every)
        self._observed = 0
        self._neighbours: OrderedDict[str, tuple[int, list[str]]] = OrderedDict()
        self.rehash_every = max(1, rehash_every)
        self.num_perm = num_perm
        self.seed = seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        # One permutation set for all sketches: generating it per MinHash would dominate the cost.
        self._perms = MinHash(num_perm=num_perm, seed=seed).permutations
        # item → its last distinct users, items in order of their last observation
        self._audience: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self._pending: dict[str, int] = {}  # item → audience changes since its last hash
        self._sketch: dict[str, LeanMinHash] = {}

    def observe(self, user_id: str, item_id: str) -> None:
        """Record that ``user_id`` interacted with ``item_id`` (O(1), re-hash amortised)."""
        self._observed += 1
        aud = self._audience.get(item_id)
        if aud is None:
            if len(self._audience) >= self.max_items:
                self.remove_item(next(iter(self._audience)))
            aud = self._audience[item_id] = OrderedDict()
        else:
            self._audience.move_to_end(item_id)
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

    def _similar(self, item_id: str) -> list[str]:
        cached = self._neighbours.get(item_id)
        if cached is not None and self._observed - cached[0] < self.requery_every:
            self._neighbours.move_to_end(item_id)
            return cached[1]
        sketch = self._sketch.get(item_id)
        found = [] if sketch is None else list(self._lsh.query(sketch))
        self._neighbours[item_id] = (self._observed, found)
        self._neighbours.move_to_end(item_id)
        if len(self._neighbours) > self.neighbour_cache:
            self._neighbours.popitem(last=False)
        return found

    def remove_item(self, item_id: str) -> None:
        """Forget an item and its audience."""
        # It may be in others' cached lists too: ``candidates`` skips items it no longer
        # knows, so those lists stay (clearing them all at every eviction would void the cache).
        self._neighbours.pop(item_id, None)
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
                if other in self._sketch:  # not forgotten since the list was cached
                    hits[other] = hits.get(other, 0) + 1
        ranked = sorted(hits, key=lambda i: (-hits[i], i))
        return ranked if limit is None else ranked[:limit]
