"""The IVF overlay: a faiss inverted-file index over the store's rows that proposes candidates."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import faiss
import numpy as np

from operators.retrieval.store import VectorStore

#: Codes the IVF index stores per vector. "flat": the float32 vector itself (4·D bytes, exact
#: scan distances); "sq8": 8-bit scalar quantisation (D bytes, faster scan, approximate distances).
#: Either way the shortlist is re-ranked against the exact float32 vectors.
Codec = Literal["flat", "sq8"]


def auto_nlist(n: int) -> int:
    """IVF cell count for n items: the power of two nearest 2·√n, within [16, 65536].

    Cells ∝ √n keep both the centroid scan and the scanned lists ∝ √n at fixed nprobe.

    >>> auto_nlist(1_000_000)
    2048
    """
    return int(min(65536, max(16, 2 ** round(math.log2(2.0 * math.sqrt(max(n, 1)))))))


@contextmanager
def single_thread_if_small(n: int) -> Iterator[None]:
    """Run faiss on one thread for a handful of vectors or queries.

    Waking an OpenMP team costs milliseconds on a busy host (measured: one upsert 27 µs on one
    thread, 1.8–7 ms on two), far more than the work; large batches keep all threads.
    """
    if n >= 16:
        yield
        return
    with single_thread():
        yield


@contextmanager
def single_thread() -> Iterator[None]:
    """Run faiss on one thread within the block (see ``single_thread_if_small``)."""
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


class IVFOverlay:
    """A faiss IVF index over store rows (faiss id = row) that proposes candidates.

    IVF, not HNSW: an HNSW graph cannot delete or move a vector, and JODIE moves an item's vector
    on every interaction. IVF with a hash-table direct map moves one in O(1) list edits plus one
    centroid assignment (``remove_ids`` + ``add_with_ids``), so the index is never stale.
    """

    def __init__(
        self, store: VectorStore, nlist: int, nprobe: int, codec: Codec, seed: int
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
        with single_thread_if_small(rows.size):
            self.index.remove_ids(_ids_selector(rows))  # rows not present (new ones) are skipped
            self.index.add_with_ids(vectors, rows)
        self.changes += rows.size

    def remove(self, rows: np.ndarray) -> None:
        if rows.size:
            self.index.remove_ids(_ids_selector(rows))
            self.changes += rows.size

    def propose(self, queries: np.ndarray, n: int, nprobe: int) -> np.ndarray:
        """Store rows of up to n candidates per query: (Q, D) → (Q, n), −1 past the last found."""
        self.index.nprobe = min(nprobe, self.index.nlist)  # tunable live
        with single_thread_if_small(queries.shape[0]):
            _, rows = self.index.search(queries, n)
        return rows

    def imbalance(self) -> float:
        """Σ size² · nlist / n²: 1 for equal lists; grows as moved vectors pile into few cells."""
        invlists = self.index.invlists
        assert invlists is not None  # a built IVF always has its lists
        return float(invlists.imbalance_factor())
