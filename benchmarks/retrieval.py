"""Retrieval benchmark: recall@10 of the IVF tier vs exact search, query/update cost, build, memory.

For each catalogue size (default 1k, 100k, 1M items of dimension 256) it prints:
  recall@10 of ``TieredIndex`` (IVF tier forced on) against exact search, per nprobe;
  µs per query, one query per call (the streaming case) and in batches, IVF and exact;
  build time (filling the store, training + filling the IVF), µs per upsert of a moved item
  (one per call and in batches of 1,000), and the index's memory.
Sizes below the IVF minimum (1,024 items) stay exact, so their recall is 1 by construction.

Run: python benchmarks/retrieval.py [--sizes 1000 100000 1000000] [--nprobe 32 48 64]
A short run: python benchmarks/retrieval.py --sizes 1000 100000 --queries 100
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import faiss
import numpy as np

from operators.retrieval.tiered import TieredIndex


def clustered(n: int, dim: int, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian mixture with overlapping clusters and a decaying within-cluster spectrum.

    Why this shape: isotropic Gaussians in 256-d are hopeless (every point nearly equidistant,
    no index beats a full scan) and well-separated tight clusters are trivial (the cluster is the
    answer). Learned embeddings sit in between: low intrinsic dimension (variance j^-1.5 along
    axis j, randomly rotated) and clusters close enough (centre spread 0.05 per axis) that true
    neighbours straddle cluster boundaries, so IVF needs a real nprobe to reach high recall.
    """
    centers = (0.05 * rng.standard_normal((n_clusters, dim))).astype(np.float32)
    scale = (np.arange(1, dim + 1) ** -0.75).astype(np.float32)
    rot = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65536):  # chunks keep the float32 scratch small at 1M rows
        m = min(65536, n - s)
        z = rng.standard_normal((m, dim), dtype=np.float32) * scale
        out[s : s + m] = centers[rng.integers(0, n_clusters, m)] + z @ rot
    return out


def per_call_us(fn: Callable[[int], object], calls: int) -> float:
    t = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t) / calls * 1e6


def run(n: int, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    # Queries come from the same mixture but are not catalogue items, like a predicted j̃.
    # One distribution (1,000 clusters) at every size: only the catalogue size changes.
    data = clustered(n + args.queries, args.dim, 1000, rng)
    x, q = data[:n], data[n:]
    ids = [f"item{i}" for i in range(n)]
    ix = TieredIndex(args.dim, exact_below=0, codec=args.codec, nprobe=max(args.nprobe))
    t0 = time.perf_counter()
    ix.exact_below = n + 1  # fill the store exactly first, then time the IVF build on its own
    ix.upsert(ids, x)
    t_fill = time.perf_counter() - t0
    ix.exact_below = 0
    t0 = time.perf_counter()
    if n >= 1024:
        ix.rebuild()
    t_build = time.perf_counter() - t0
    nlist = ix._ivf.index.nlist if ix._ivf is not None else 0
    print(
        f"\n== n={n:,} dim={args.dim} codec={args.codec} nlist={nlist} approximate={ix.approximate}"
    )
    print(f"build: store fill {t_fill:.2f} s, IVF train+add {t_build:.2f} s")

    t0 = time.perf_counter()
    truth = ix.search_exact(q, K)[0]
    exact_batch_us = (time.perf_counter() - t0) / len(q) * 1e6
    n_single = min(len(q), 20 if n >= 500_000 else 100)
    exact_us = per_call_us(lambda i: ix.search_exact(q[i : i + 1], K), n_single)
    print(f"exact:  {exact_us:9.0f} µs/query single, {exact_batch_us:9.0f} µs/query batched")

    for nprobe in sorted(args.nprobe) if ix.approximate else [0]:
        ix.nprobe = nprobe or ix.nprobe
        t0 = time.perf_counter()
        got = ix.search(q, K)[0]
        batch_us = (time.perf_counter() - t0) / len(q) * 1e6
        single_us = per_call_us(lambda i: ix.search(q[i : i + 1], K), len(q))
        recall = np.mean([len(set(g) & set(t)) / K for g, t in zip(got, truth, strict=True)])
        print(
            f"nprobe={nprobe:3d}: recall@10 {recall:.4f}, {single_us:7.0f} µs/query single, "
            f"{batch_us:7.0f} µs/query batched"
        )

    moved = rng.integers(0, n, args.updates)
    delta = 0.05 * rng.standard_normal((args.updates, args.dim), dtype=np.float32)
    one_us = per_call_us(lambda i: ix.upsert([ids[moved[i]]], x[moved[i]] + delta[i]), len(moved))
    batch = min(1000, args.updates)
    t0 = time.perf_counter()
    ix.upsert([ids[i] for i in moved[:batch]], x[moved[:batch]] - delta[:batch])
    batch_up_us = (time.perf_counter() - t0) / batch * 1e6
    print(
        f"update: {one_us:.1f} µs/upsert single, {batch_up_us:.1f} µs/upsert in batches of {batch}"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"memory: index ≈ {ix.memory_bytes() / 2**20:,.0f} MiB "
        f"(raw vectors {x.nbytes / 2**20:,.0f} MiB), process peak RSS {rss:.2f} GiB"
    )


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
p.add_argument("--dim", type=int, default=256)
p.add_argument("--queries", type=int, default=200)
p.add_argument("--nprobe", type=int, nargs="+", default=[32, 48, 64])
p.add_argument("--codec", choices=["flat", "sq8"], default="flat")
p.add_argument("--updates", type=int, default=2000)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
faiss.omp_set_num_threads(args.threads)
K = 10

for size in args.sizes:
    run(size, args)
