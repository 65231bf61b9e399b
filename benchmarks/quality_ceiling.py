"""How far any ranker could go on the three logs, given the best signal measured for new items.

Events of the test split (the last 10 %) fall into three kinds: the user's last item again,
an older item of the user's history, and an item new to the user. Repeats are ranked from the
user's own history; for new items the best signals measured (``transition_signal.py``) are
popularity and every user's transitions out of this user's last item. This script bounds what
a ranker can reach with them, so that a quality goal can be checked against the data before
a model is built for it:

- *perfect repeats*: every repeat at rank 1, every new item at the better of the two signals'
  ranks for that event (chosen per event, after the fact) among the known items the user has
  not touched. A full ranking also places the user's history among those, so a real ranker's
  new-item rank is no better: these MRR and Recall@10 bound any ranker whose new-item ranking
  is no better than the two signals together.
- *kind known*: a ranker told what kind each event is, but not the item: the last item at
  rank 1 when it is the one, an older repeat at its recency rank among the user's history
  without the last item, a new item at the best signal's rank.
- *last item first*: what every ranker here does (the last item again is 78 % of Wikipedia's
  test events, and each scores 0.99 on it): the last item at rank 1, so an older repeat is at
  best rank 2 and a new item one place behind its signal rank.

Next to them, the recency and popularity baselines (the same figures as ``jodie evaluate
--baseline``), and for each goal — ``--times`` × the better baseline's MRR, and ``--mrr`` and
``--recall`` when given — the new-item MRR or Recall@10 each ceiling would need to reach it,
beside what the best signal gives there. Ranks are 1 + the number of candidates scored
strictly higher, the same rule as ``jodie evaluate``; "known" items are those seen before the
event.

    python benchmarks/quality_ceiling.py [--data F ...] [--mrr 0.85 --recall 0.92]
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from operators.dataset import comparison_logs, load_interactions
from operators.evaluation.baselines import replay_before
from streams.cli.common import existing_file


@dataclass
class Split:
    """The test split's events by kind; for new items, the best signal's rank per event."""

    last: int = 0
    older: int = 0
    #: an older repeat's rank among the user's history without the last item, by recency
    older_ranks: list[int] = field(default_factory=list)
    new_ranks: list[int] = field(default_factory=list)
    #: every event's rank under the two baselines, for the relative goal
    recency: list[int] = field(default_factory=list)
    popularity: list[int] = field(default_factory=list)

    @property
    def events(self) -> int:
        return self.last + self.older + len(self.new_ranks)


def measure(path: Path, test_fraction: float = 0.1) -> Split:
    log = load_interactions(path)
    n_items, events = replay_before(log)
    start = int(len(log.user_ids) * (1.0 - test_fraction))
    moves: dict[int, Counter[int]] = defaultdict(Counter)  # item → next item → count
    split = Split()
    for k, _user, i, prev, before, popularity in events:
        if k >= start:
            known = popularity > 0
            known[i] = True  # an item never seen competes too: it scores 0 on both
            split.popularity.append(1 + int((popularity[known] > popularity[i]).sum()))
            if i in before:
                split.recency.append(1 + sum(1 for j in before.values() if j > before[i]))
            if i == prev:
                split.last += 1
            elif i in before:
                split.older += 1
                split.older_ranks.append(split.recency[-1] - 1)  # the last item is more recent
            else:
                known[list(before)] = False
                cands = np.flatnonzero(known)
                true = int(np.searchsorted(cands, i))
                pop = popularity[cands]
                best = 1 + int((pop > pop[true]).sum())
                if prev is not None and moves[prev]:
                    counted = np.zeros(n_items)
                    out = moves[prev]
                    counted[list(out)] = list(out.values())
                    tie = pop / (popularity.max() + 1.0)
                    score = counted[cands] + tie
                    best = min(best, 1 + int((score > score[true]).sum()))
                split.new_ranks.append(best)
                split.recency.append(len(before) + 1 + int((pop > pop[true]).sum()))
        if prev is not None:
            moves[prev][i] += 1
    return split


def ceilings(split: Split) -> dict[str, tuple[float, float]]:
    """(MRR, Recall@10) of the two ceilings and of the new-item signal alone."""
    n = split.events
    r = np.asarray(split.new_ranks, dtype=float)
    o = np.asarray(split.older_ranks, dtype=float)
    repeats = split.last + split.older
    return {
        "new items, best signal": (float((1 / r).mean()), float((r <= 10).mean())),
        "perfect repeats": (
            (repeats + float((1 / r).sum())) / n,
            (repeats + float((r <= 10).sum())) / n,
        ),
        "kind known": (
            (split.last + float((1 / o).sum()) + float((1 / r).sum())) / n,
            (split.last + float((o <= 10).sum()) + float((r <= 10).sum())) / n,
        ),
        "last item first": (
            (split.last + split.older / 2 + float((1 / (r + 1)).sum())) / n,
            (repeats + float((r + 1 <= 10).sum())) / n,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=existing_file, nargs="*", default=comparison_logs())
    parser.add_argument("--mrr", type=float, help="an MRR goal to check besides the relative one")
    parser.add_argument("--recall", type=float, help="a Recall@10 goal to check")
    parser.add_argument(
        "--times", type=float, default=1.10, help="the relative goal: this × the best baseline MRR"
    )
    args = parser.parse_args()
    for path in args.data:
        split = measure(path)
        n = split.events
        new = len(split.new_ranks)
        print(
            f"{path.name}: test split, {n} events: last item again {split.last / n:.3f}, "
            f"older repeat {split.older / n:.3f}, new to the user {new / n:.3f}"
        )
        figures = {
            "recency (baseline)": _figures(split.recency),
            "popularity (baseline)": _figures(split.popularity),
            **ceilings(split),
        }
        for name, (mrr, recall) in figures.items():
            print(f"  {name:24s} MRR {mrr:.4f}  Recall@10 {recall:.4f}")
        best = max(figures["recency (baseline)"][0], figures["popularity (baseline)"][0])
        goals = [(args.times * best, "MRR", f"{args.times:.2f} × the best baseline")]
        goals += [(g, what, "") for g, what in ((args.mrr, "MRR"), (args.recall, "Recall@10")) if g]
        r = np.asarray(split.new_ranks, dtype=float)
        for goal, what, why in goals:
            # What the new items must score for the goal: with every repeat at rank 1, and
            # with the last item at rank 1 and every older repeat at rank 2 (new items behind it)
            if what == "MRR":
                cases = [
                    (split.last + split.older, 1 / r),
                    (split.last + split.older / 2, 1 / (r + 1)),
                ]
            else:
                repeats = split.last + split.older
                cases = [(repeats, r <= 10), (repeats, r + 1 <= 10)]
            needs = []
            for repeats, signal in cases:
                need = (goal * n - repeats) / new if new else float("inf")
                verdict = "out of reach" if need > 1 else f"{max(need, 0.0):.4f}"
                has = float(np.mean(signal)) if new else float("nan")
                needs.append(f"{verdict} (best signal {has:.4f})")
            print(
                f"  {what} {goal:.4f}{f' ({why})' if why else ''}: new items need {what} "
                f"{needs[0]} with perfect repeats, {needs[1]} with the last item first"
            )


def _figures(ranks: list[int]) -> tuple[float, float]:
    r = np.asarray(ranks, dtype=float)
    return float((1 / r).mean()), float((r <= 10).mean())


if __name__ == "__main__":
    main()
