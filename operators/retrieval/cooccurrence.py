"""Co-occurrence candidates: items whose recent audiences resemble, by datasketch MinHash LSH."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from datasketch import LeanMinHash, MinHash, MinHashLSH


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
