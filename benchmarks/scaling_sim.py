"""Past one machine on the Wikipedia log: the exchange's cross-traffic, and routers split by user.

Three measurements, no broker needed (docs/scaling.md reads them):

1. Cross-traffic: with N workers sharing --partitions partitions of the inboxes (range
   assignment, the real partitioner ``partition_for``), how many pre-state messages per event
   cross between workers (2 when the user's and the item's owners differ and the pair does
   not share its previous event, else 0), how unevenly the events load the workers, and the
   longest chain of waits for those messages on a backlog, with and without the workers'
   derived states (``wait_chain``).
2. A prototype of the partitioned router, run in this process: R user routers (each the real
   ``Sequencer`` over its share of the ``interactions`` partitions: validation, duplicates,
   user links, its own (timestamp, event_id) order) and R item mergers (each merging the R
   sorted streams for its items, linking item chains). Checked: the merged order and every
   user and item link equal the single sequencer's, for every R. Measured: CPU µs per event
   of each role with the records read and written as the router does (schemas.wire).
3. Throughput with R routers, one core each, from the measured per-event costs and each
   router's measured share of the events (the busiest router sets the pace); and the latency
   the item side's watermark wait adds, from a time-stepped simulation of R routers
   committing batches (--commit-ms each) at --rate events/s.

    python benchmarks/scaling_sim.py --events 157474 --plot scaling.png
    python benchmarks/scaling_sim.py --start 125979 --events 10000 --partitions 4 \\
        --workers 1,2,4 --cross-traffic-only
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from operators.dataset import Row, bundled_wikipedia, iter_rows
from operators.protocol.sequencer import Interaction, SequencedEvent, Sequencer
from schemas import INTERACTION, wire
from schemas.codec import Codec
from streams.cli.common import script_main
from streams.produce import to_record
from streams.runtime.kafka import partition_for


def owner(partition: int, partitions: int, members: int) -> int:
    """The member the range assignor gives ``partition`` (Kafka's RangeAssignor)."""
    per, extra = divmod(partitions, members)
    # The first ``extra`` members take per + 1 partitions each.
    cut = extra * (per + 1)
    return partition // (per + 1) if partition < cut else extra + (partition - cut) // per


# -- 1. cross-traffic ---------------------------------------------------------------------------


def wait_chain(rows: Sequence[Row], user_owner: np.ndarray, item_owner: np.ndarray) -> dict:
    """The longest chain of cross-worker waits on a backlog (every event already routed),
    in rounds: a side applies an event once its own previous event is applied and the
    partner's pre-state is there, which takes one round (a transaction's commit and the
    other worker's fetch) when it comes from another worker and none in memory. Without and
    with the derived states (operators.protocol.exchange.DerivedStates): the partner's
    post-state from its previous event, taken from this side when this worker applied that
    event on this side (for another entity of its own)."""
    n = len(rows)
    prev_user, prev_item = np.full(n, -1), np.full(n, -1)
    last_user: dict[str, int] = {}
    last_item: dict[str, int] = {}
    for k, r in enumerate(rows):
        prev_user[k] = last_user.get(r.user_id, -1)
        prev_item[k] = last_item.get(r.item_id, -1)
        last_user[r.user_id] = last_item[r.item_id] = k
    out: dict[str, int] = {}
    for derived in (False, True):
        at_user, at_item = [0] * n, [0] * n  # the round each side applies each event
        for k in range(n):
            pu, pi = int(prev_user[k]), int(prev_item[k])
            if pu >= 0 and pu == pi:  # the pair shares its previous event: no message
                at_user[k], at_item[k] = at_user[pu], at_item[pi]
                continue
            hop = int(user_owner[k] != item_owner[k])
            item_pre = (at_item[pi] if pi >= 0 else 0) + hop
            if derived and pi >= 0 and user_owner[pi] == user_owner[k]:
                item_pre = min(item_pre, at_user[pi])
            user_pre = (at_user[pu] if pu >= 0 else 0) + hop
            if derived and pu >= 0 and item_owner[pu] == item_owner[k]:
                user_pre = min(user_pre, at_item[pu])
            at_user[k] = max(at_user[pu] if pu >= 0 else 0, item_pre)
            at_item[k] = max(at_item[pi] if pi >= 0 else 0, user_pre)
        out["derived" if derived else "plain"] = 1 + max(max(at_user), max(at_item))
    return out


def cross_traffic(rows: Sequence[Row], workers: Sequence[int], partitions: int) -> list[dict]:
    users = {u: partition_for(u.encode(), partitions) for u in {r.user_id for r in rows}}
    items = {i: partition_for(i.encode(), partitions) for i in {r.item_id for r in rows}}
    # The shortcut: a pair whose previous events are one and the same event sends nothing.
    last_user: dict[str, int] = {}
    last_item: dict[str, int] = {}
    shares = np.zeros(len(rows), dtype=bool)
    for n, r in enumerate(rows):
        pu, pi = last_user.get(r.user_id, -1), last_item.get(r.item_id, -2)
        shares[n] = pu >= 0 and pu == pi
        last_user[r.user_id] = last_item[r.item_id] = n
    out = []
    for n_workers in workers:
        u_owner = np.array([owner(users[r.user_id], partitions, n_workers) for r in rows])
        i_owner = np.array([owner(items[r.item_id], partitions, n_workers) for r in rows])
        apart = u_owner != i_owner
        crossing = apart & ~shares
        load = np.bincount(u_owner, minlength=n_workers) + np.bincount(i_owner, minlength=n_workers)
        chain = wait_chain(rows, u_owner, i_owner)
        out.append(
            {
                "workers": n_workers,
                "pairs_apart": float(apart.mean()),
                "crossing_messages_per_event": float(2 * crossing.mean()),
                "shortcut_share": float(shares.mean()),
                "busiest_worker_share": float(load.max() / load.sum()),
                "balance": float(load.mean() / load.max()),  # 1 = even
                "wait_rounds": chain["plain"],
                "wait_rounds_derived": chain["derived"],
            }
        )
    return out


# -- 2. the partitioned router, in process ------------------------------------------------------

Key = tuple[float, str]


@dataclass
class Routed:
    """What a user router sends an item merger: the event, its key and its user link (the key of
    the user's previous event), written as the router would write it."""

    key: Key
    prev_user: Key | None
    data: bytes


class ItemMerger:
    """Merges the user routers' sorted streams by (timestamp, event_id) and links the chains of
    its items. A stream's last key is its watermark: an event is released once every stream
    has passed it (here the streams are complete, so the merge runs to the end)."""

    def __init__(self) -> None:
        self.last_item: dict[str, Key] = {}

    def merge(
        self, streams: Sequence[Sequence[Routed]]
    ) -> list[tuple[Interaction, Key | None, Key | None]]:
        out = []
        heads = [(s[0].key, k, 0) for k, s in enumerate(streams) if s]
        heapq.heapify(heads)
        last_item = self.last_item
        while heads:
            _key, k, n = heads[0]
            routed = streams[k][n]
            fields = wire.read_interaction(routed.data)
            assert fields is not None
            event = Interaction(*fields)
            prev_item = last_item.get(event.item_id)
            last_item[event.item_id] = routed.key
            out.append((event, routed.prev_user, prev_item))
            if n + 1 < len(streams[k]):
                heapq.heapreplace(heads, (streams[k][n + 1].key, k, n + 1))
            else:
                heapq.heappop(heads)
        return out


def _bodies(rows: Sequence[Row]) -> list[bytes]:
    codec = Codec(INTERACTION)
    tag = "wikipedia"
    header = len(codec.header)
    return [codec.encode(to_record(r, tag))[header:] for r in rows]


def single(bodies: Sequence[bytes], parts: Sequence[int], partitions: int) -> list[SequencedEvent]:
    """Today's router in process: read, sequence, and write the three records of each event."""
    seq = Sequencer(range(partitions), None)
    for n, (body, p) in enumerate(zip(bodies, parts, strict=True)):
        fields = wire.read_interaction(body)
        assert fields is not None
        seq.offer(p, Interaction(*fields), n)
    log = seq.drain(set(range(partitions))).sequenced
    _write(log)
    return log


def _write(log: Sequence[SequencedEvent]) -> list[bytes]:
    """The log record and both inbox messages of each event, as the router writes them."""
    out = []
    stamp = wire.stamp_bytes("", -1)
    writer, inbox = wire.SequencedWriter(b""), wire.InboxWriter(b"")
    for seq, prev_user, prev_item, user_time, item_time, ev in log:
        core = wire.interaction_core(ev.event_id, ev.user_id, ev.item_id, ev.timestamp, ev.features)
        s, u, i = wire.long_bytes(seq), wire.long_bytes(prev_user), wire.long_bytes(prev_item)
        out.append(writer.record(s, u, i, user_time, item_time, core, ev.state_label, stamp))
        out.append(inbox.event(s, u, i, core, stamp))
        out.append(inbox.event(s, i, u, core, stamp))
    return out


def partitioned(
    bodies: Sequence[bytes], parts: Sequence[int], partitions: int, routers: int
) -> tuple[list[tuple[Interaction, Key | None, Key | None]], dict[str, float]]:
    """The R-router pipeline; returns the merged, linked events and the CPU µs per event of
    each role (summed over routers: the work, wherever it runs)."""
    mine = [
        [p for p in range(partitions) if owner(p, partitions, routers) == k] for k in range(routers)
    ]
    # User role: each router sequences its partitions (the real Sequencer: validation,
    # duplicates, user links and its own order), and writes each event to its item's merger.
    streams: list[list[list[Routed]]] = [[[] for _ in range(routers)] for _ in range(routers)]
    item_router: dict[str, int] = {}
    inputs: list[list[tuple[int, int, bytes]]] = [[] for _ in range(routers)]
    for n, (body, p) in enumerate(zip(bodies, parts, strict=True)):
        inputs[owner(p, partitions, routers)].append((n, p, body))
    t0 = time.process_time()  # what each router reads is given: not counted
    for k in range(routers):
        seq = Sequencer(mine[k], None)
        for n, p, body in inputs[k]:
            fields = wire.read_interaction(body)
            assert fields is not None
            seq.offer(p, Interaction(*fields), n)
        last_key: dict[str, Key] = {}
        for e in seq.drain(set(mine[k])).sequenced:
            ev = e.event
            key = (ev.timestamp, ev.event_id)
            core = wire.interaction_core(
                ev.event_id, ev.user_id, ev.item_id, ev.timestamp, ev.features
            )
            j = item_router.get(ev.item_id)
            if j is None:
                j = item_router[ev.item_id] = owner(
                    partition_for(ev.item_id.encode(), partitions), partitions, routers
                )
            streams[j][k].append(
                Routed(key, last_key.get(ev.user_id), core + wire.optional_int(ev.state_label))
            )
            last_key[ev.user_id] = key
    t1 = time.process_time()
    # Item role: each merger merges the R streams of its items and links item chains; the
    # merged order of all mergers is the global (timestamp, event_id) order.
    merged: list[tuple[Interaction, Key | None, Key | None]] = []
    for j in range(routers):
        linked = ItemMerger().merge(streams[j])
        merged.extend(linked)
        _write_linked(linked)
    t2 = time.process_time()
    merged.sort(key=lambda x: (x[0].timestamp, x[0].event_id))
    n = len(bodies)
    return merged, {"user_role_us": (t1 - t0) / n * 1e6, "item_role_us": (t2 - t1) / n * 1e6}


def _write_linked(linked: Sequence[tuple[Interaction, Key | None, Key | None]]) -> None:
    """The item role's three records per event (as ``_write``; the order keys stand for the
    sequence numbers, so the cost is the same)."""
    stamp = wire.stamp_bytes("", -1)
    writer, inbox = wire.SequencedWriter(b""), wire.InboxWriter(b"")
    for n, (ev, prev_user, prev_item) in enumerate(linked):
        core = wire.interaction_core(ev.event_id, ev.user_id, ev.item_id, ev.timestamp, ev.features)
        s = wire.long_bytes(n)
        u = wire.long_bytes(-1 if prev_user is None else n - 1)
        i = wire.long_bytes(-1 if prev_item is None else n - 2)
        user_time = None if prev_user is None else prev_user[0]
        item_time = None if prev_item is None else prev_item[0]
        writer.record(s, u, i, user_time, item_time, core, ev.state_label, stamp)
        inbox.event(s, u, i, core, stamp)
        inbox.event(s, i, u, core, stamp)


def same_as_single(
    merged: Sequence[tuple[Interaction, Key | None, Key | None]], log: Sequence[SequencedEvent]
) -> bool:
    if [m[0] for m in merged] != [e.event for e in log]:
        return False
    key_of = [(e.event.timestamp, e.event.event_id) for e in log]
    for (_ev, prev_user, prev_item), e in zip(merged, log, strict=True):
        if prev_user != (key_of[e.prev_user_seq] if e.prev_user_seq >= 0 else None):
            return False
        if prev_item != (key_of[e.prev_item_seq] if e.prev_item_seq >= 0 else None):
            return False
    return True


def router_shares(rows: Sequence[Row], partitions: int, routers: int) -> list[tuple[float, float]]:
    """Per router: its share of the user-role events and of the item-role events."""
    users = Counter(
        owner(partition_for(r.user_id.encode(), partitions), partitions, routers) for r in rows
    )
    items = Counter(
        owner(partition_for(r.item_id.encode(), partitions), partitions, routers) for r in rows
    )
    n = len(rows)
    return [(users[k] / n, items[k] / n) for k in range(routers)]


# -- 3. latency of the watermark wait -----------------------------------------------------------


def watermark_latency(
    routers: int, rate: float, commit_s: float, seconds: float, rng: np.random.Generator
) -> dict[str, float]:
    """Time-stepped: events arrive at ``rate`` spread over the routers; each router commits
    its user-role batch every ``commit_s`` (phase random), making its events and its
    watermark (the latest arrival time it has committed) visible; an item merger releases an
    event once every router's visible watermark has passed it, and commits every
    ``commit_s`` in turn. Returns the p50/p99 of arrival → item-side commit, in ms."""
    phases = rng.uniform(0, commit_s, size=routers)
    item_phase = rng.uniform(0, commit_s)
    n = int(rate * seconds)
    arrivals = np.sort(rng.uniform(0, seconds, size=n))
    router_of = rng.integers(0, routers, size=n)
    # Router k's commit times: phase + m * commit_s. An event is committed by its router at
    # the first commit after its arrival.
    committed = phases[router_of] + np.ceil((arrivals - phases[router_of]) / commit_s) * commit_s
    # The watermark of router k at time T: the latest arrival it committed by T. An event at
    # time a is releasable once every router committed a batch that began after a, i.e. at
    # max over routers of (their first commit after a).
    after = phases[None, :] + np.ceil((arrivals[:, None] - phases[None, :]) / commit_s) * commit_s
    releasable = np.maximum(after.max(axis=1), committed)
    done = item_phase + np.ceil((releasable - item_phase) / commit_s) * commit_s
    latency = (done - arrivals) * 1e3
    # Today's single router commits each event once, in its next batch: the first hop alone.
    hop = (committed - arrivals) * 1e3
    return {
        "p50_ms": float(np.percentile(latency, 50)),
        "p99_ms": float(np.percentile(latency, 99)),
        "one_hop_p50_ms": float(np.percentile(hop, 50)),
        "one_hop_p99_ms": float(np.percentile(hop, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=157_474, help="rows of the Wikipedia file")
    parser.add_argument("--start", type=int, default=0, help="first row")
    parser.add_argument(
        "--cross-traffic-only", action="store_true", help="measurement 1 alone, then stop"
    )
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--routers", default="1,2,4,8,16")
    parser.add_argument("--workers", default="1,2,4,8,16,32")
    parser.add_argument(
        "--single-us",
        type=float,
        default=None,
        help="measured CPU µs per event of today's router (router_speed.py); "
        "default: this script's in-process single-router cost",
    )
    parser.add_argument(
        "--kafka-us",
        type=float,
        default=None,
        help="CPU µs per message produced or consumed in the router process "
        "(default: what --single-us leaves beyond the in-process work, over "
        "its 4 messages; 3 without --single-us)",
    )
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--commit-ms", type=float, default=50.0)
    parser.add_argument("--plot", help="write the throughput curve here (PNG)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    rows = list(islice(iter_rows(bundled_wikipedia()), args.start, args.start + args.events))
    print(
        f"{len(rows)} events, {len({r.user_id for r in rows})} users, "
        f"{len({r.item_id for r in rows})} items, {args.partitions} partitions"
    )
    report: dict[str, Any] = {"events": len(rows), "partitions": args.partitions}

    report["cross_traffic"] = cross_traffic(
        rows, [int(x) for x in args.workers.split(",")], args.partitions
    )
    print(
        "workers | pairs on two workers | pre-state messages crossing per event | "
        "busiest worker's share | balance | longest chain of waits on a backlog, rounds: "
        "without / with derived states"
    )
    for c in report["cross_traffic"]:
        print(
            f"{c['workers']:7d} | {c['pairs_apart']:.3f} | "
            f"{c['crossing_messages_per_event']:.3f} | "
            f"{c['busiest_worker_share']:.3f} | {c['balance']:.2f} | "
            f"{c['wait_rounds']} / {c['wait_rounds_derived']}"
        )
    print(
        "(pairs sharing their previous event, which send nothing: "
        f"{report['cross_traffic'][0]['shortcut_share']:.3f})"
    )
    if args.cross_traffic_only:
        return

    bodies = _bodies(rows)
    parts = [partition_for(r.user_id.encode(), args.partitions) for r in rows]
    t0 = time.process_time()
    log = single(bodies, parts, args.partitions)
    single_us = (time.process_time() - t0) / len(rows) * 1e6
    if args.kafka_us is not None:
        kafka_us = args.kafka_us
    elif args.single_us is not None:
        kafka_us = max(0.0, (args.single_us - single_us) / 4)
    else:
        kafka_us = 3.0
    base = args.single_us if args.single_us is not None else single_us + 4 * kafka_us
    report["kafka_us_per_message"] = kafka_us
    curve = []
    for r in [int(x) for x in args.routers.split(",")]:
        merged, costs = partitioned(bodies, parts, args.partitions, r)
        exact = same_as_single(merged, log)
        shares = router_shares(rows, args.partitions, r)
        # Per router: its events × (its role's Python cost + its Kafka messages): the user role
        # reads 1 and writes 1 (the routed record), the item role reads 1 and writes 3.
        cu = costs["user_role_us"] + 2 * kafka_us
        ci = costs["item_role_us"] + 4 * kafka_us
        busiest = max(su * cu + si * ci for su, si in shares)
        curve.append(
            {
                "routers": r,
                "exact": exact,
                **costs,
                "busiest_share_user": max(s[0] for s in shares),
                "busiest_share_item": max(s[1] for s in shares),
                "events_per_s": 1e6 / busiest,
            }
        )
    report["single_router_us"] = base
    report["routers"] = curve
    print(
        f"single router: {base:.1f} µs per event (in process {single_us:.1f} µs, Kafka "
        f"{kafka_us:.1f} µs per message) = {1e6 / base:,.0f} events/s on one core"
    )
    print(
        "routers | same order and links as one router | user role µs | item role µs | "
        "busiest share (user, item) | events/s"
    )
    for c in curve:
        print(
            f"{c['routers']:7d} | {c['exact']} | {c['user_role_us']:.1f} | "
            f"{c['item_role_us']:.1f} | ({c['busiest_share_user']:.3f}, "
            f"{c['busiest_share_item']:.3f}) | {c['events_per_s']:,.0f}"
        )

    rng = np.random.default_rng(0)
    lat = []
    for c in curve:
        w = watermark_latency(c["routers"], args.rate, args.commit_ms / 1e3, 20.0, rng)
        lat.append({"routers": c["routers"], **w})
    report["watermark_latency"] = lat
    print(
        f"arrival → item side committed, at {args.rate:g} events/s, each router committing "
        f"every {args.commit_ms:g} ms (one router today commits once: p50 "
        f"{lat[0]['one_hop_p50_ms']:.0f} ms, p99 {lat[0]['one_hop_p99_ms']:.0f} ms):"
    )
    for w in lat:
        print(f"  {w['routers']:3d} routers: p50 {w['p50_ms']:.0f} ms, p99 {w['p99_ms']:.0f} ms")

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        rs = [c["routers"] for c in curve]
        a.plot(rs, [c["events_per_s"] for c in curve], "o-", label="routers partitioned by user")
        a.plot(
            rs, [r * 1e6 / base for r in rs], ":", color="grey", label="linear (today's router × R)"
        )
        a.axhline(1e6 / base, color="tab:red", ls="--", label="one router today")
        a.set_xlabel("routers (one core each)")
        a.set_ylabel("events/s")
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.legend(fontsize=8)
        a.set_title("Router throughput (Wikipedia, measured costs)")
        ws = [c["workers"] for c in report["cross_traffic"]]
        b.plot(
            ws,
            [c["crossing_messages_per_event"] for c in report["cross_traffic"]],
            "o-",
            label="pre-state messages crossing / event",
        )
        b.plot(
            ws,
            [c["balance"] for c in report["cross_traffic"]],
            "s-",
            label="balance (mean / busiest)",
        )
        b.set_xscale("log", base=2)
        b.set_xlabel("workers")
        b.legend(fontsize=8)
        b.set_title("Exchange between workers")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    script_main(main)
