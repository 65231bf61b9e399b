"""What one worker serves with one model version: weights, baseline states, candidate index,
the live evaluation, and the one place where user-side outputs become recommendation records.

Lists are ranked by the model's default ranker, the one ``jodie evaluate`` reports
(``operators.evaluation.scorer``, fitted parameters from the checkpoint): with the history
scorer, score = −α‖j̃ − [j, j̄]‖² + b_pos + β·log(1 + n_user,j) + γ·log(1 + n_j) +
δ·log(1 + m_j(t)). The index keeps each item's event count, decayed count and time beside its
vector (as its owner computed them after its latest event), so the popularity terms of an
item are as fresh as its vector; in the exact tier the list is the ranker's exact top k over
every indexed item (the decayed counts taken at the batch's latest event time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from operators.evaluation.live import LiveRanks
from operators.evaluation.scorer import HistoryScorer, Scorer, make_scorer
from operators.model.checkpoint import Checkpoint, load_checkpoint
from operators.model.state import trend_at
from operators.protocol.sides import CheckpointStates, StreamModel, UserOutput
from operators.retrieval.cooccurrence import CooccurrenceCandidates
from operators.retrieval.tiered import TieredIndex
from streams.app.epochs import UNSTAMPED, Epoch
from streams.settings import Settings


def model_version(ckpt: Checkpoint) -> str:
    meta = ckpt.meta
    version = meta.get("version")
    if isinstance(version, str) and version:
        return version
    return f"sha-{meta['sha256']['model.safetensors'][:12]}"


def ranking_key(ranker: Scorer, now: float) -> dict[str, Any]:
    """The ranker's scale and item-only term at time ``now``, as ``TieredIndex`` takes them
    (a function of the index's item attributes: count, decayed count, time); {} for plain."""
    if not isinstance(ranker, HistoryScorer):
        return {}
    gamma, delta = float(ranker.gamma), float(ranker.delta)

    def prior(attrs: np.ndarray) -> np.ndarray:
        trend = trend_at(attrs[:, 1], attrs[:, 2], now)
        return gamma * np.log1p(attrs[:, 0]) + delta * np.log1p(trend)

    return {"scale": float(ranker.log_alpha.exp()), "prior": prior}


@dataclass
class Serving:
    """What one worker process serves: weights, baseline states, the candidate index."""

    settings: Settings
    checkpoint: Checkpoint
    version: str
    stream: StreamModel
    baseline: CheckpointStates
    index: TieredIndex
    candidates: int
    live: LiveRanks
    ranker: Scorer
    cooccurrence: CooccurrenceCandidates | None = None
    epoch: Epoch = UNSTAMPED

    @classmethod
    def load(cls, settings: Settings, checkpoint_dir: Path, version: str | None = None) -> Serving:
        ckpt = load_checkpoint(checkpoint_dir)
        cooccurrence = CooccurrenceCandidates() if settings.cooccurrence else None
        return cls.of(settings, ckpt, version or model_version(ckpt), cooccurrence)

    @classmethod
    def of(
        cls,
        settings: Settings,
        ckpt: Checkpoint,
        version: str,
        cooccurrence: CooccurrenceCandidates | None,
        epoch: Epoch = UNSTAMPED,
    ) -> Serving:
        """Serve ``ckpt``'s weights from its states; the co-occurrence model is shared by
        every epoch a worker serves (it is made of the log, not of weights)."""
        torch.set_num_threads(1)  # one event at a time: threads only add synchronisation
        cfg = ckpt.config
        dim = cfg.embedding_dim + cfg.item_static_dim
        baseline = CheckpointStates(ckpt)
        index = TieredIndex(
            dim,
            settings.index_exact_below,
            kind=settings.index_kind,
            nprobe=settings.index_nprobe,
            shortlist=settings.index_shortlist,
            n_attrs=3,  # count, decayed count, time of each item
        )
        ids, vectors = baseline.item_vectors()
        stats = np.stack(baseline.item_stats(ids), axis=1) if ids else np.zeros((0, 3))
        ranker = make_scorer(cfg, ckpt.scorer_tensors)
        if ids:
            # The approximate index folds the ranker's popularity terms into its vectors:
            # known before the items, it is built once, for them.
            index.set_key(**ranking_key(ranker, float(np.nanmax(stats[:, 2], initial=0.0))))
            index.upsert(ids, vectors, stats)
        # The log position the baseline states hold: an epoch's start, a checkpoint's O (one
        # trained from a file is served on a log that starts after it: position 0).
        start = (
            epoch[1] if epoch != UNSTAMPED else int(ckpt.meta.get("log_offsets", {}).get("seq", 0))
        )
        return cls(
            settings=settings,
            checkpoint=ckpt,
            version=version,
            stream=StreamModel(ckpt.model, settings.horizon_s),
            baseline=baseline,
            index=index,
            candidates=settings.candidates,
            live=LiveRanks(
                ckpt.model, start, ids, vectors, stats, ranker, every=settings.evaluate_every
            ),
            ranker=ranker,
            cooccurrence=cooccurrence,
            epoch=epoch,
        )

    def upsert(
        self, ids: list[str], vectors: np.ndarray, stats: list[tuple[float, float, float]]
    ) -> None:
        """Items' latest vectors with their (count, decayed count, time) into the index."""
        self.index.upsert(ids, vectors, np.asarray(stats, dtype=np.float64).reshape(len(ids), 3))

    def _terms(self, outs: list[UserOutput]) -> dict[str, Any]:
        """The history scorer's terms as the index's key (see ``TieredIndex.recommend``)."""
        ranker = self.ranker
        if not isinstance(ranker, HistoryScorer):
            return {}
        beta, bonus = float(ranker.beta), ranker.bonus.tolist()
        # One prior for the batch, at its latest event time: the decayed counts move by
        # exp(-gap / one day) within it, and a per-event prior would be batch × all items.
        now = max(o.event.timestamp for o in outs)
        return {
            **ranking_key(ranker, now),
            "bonus": [
                {
                    item: bonus[j] + beta * float(np.log1p(c))
                    for j, (item, c) in enumerate(zip(o.history, o.history_counts, strict=False))
                    if j < len(bonus)
                }
                for o in outs
            ],
        }

    def recommendations(self, outs: list[UserOutput]) -> list[dict[str, Any]]:
        """Top candidates for each predicted item by the ranker: nearest neighbours ∪ the
        user's history ∪ items whose audiences resemble those of the user's recent items
        (co-occurrence, MinHash LSH), each candidate's score the ranker's."""
        if not outs:
            return []
        preds = np.stack([o.predicted for o in outs])
        extra = [
            [
                *out.history,
                *(
                    self.cooccurrence.candidates(out.history[:3], limit=2 * self.candidates)
                    if self.cooccurrence is not None
                    else []
                ),
            ]
            for out in outs
        ]
        # The item just touched at its state after the event (the index may hold an older one,
        # from before its owner's vector arrived): the most likely next item, ranked right.
        fresh = [None if o.item_vector is None else (o.event.item_id, o.item_vector) for o in outs]
        ranked = self.index.recommend(
            preds, self.candidates, extra, fresh=fresh, **self._terms(outs)
        )
        records = []
        for out, pred, (ids, dist) in zip(outs, preds, ranked, strict=True):
            records.append(
                {
                    "user_id": out.event.user_id,
                    "event_id": out.event.event_id,
                    "item_id": out.event.item_id,
                    "timestamp": out.event.timestamp,
                    "model_version": self.version,
                    "projected_user": out.projected.tolist(),
                    "predicted_item": pred.tolist(),
                    "candidates": [
                        {"item_id": i, "score": -float(d)}
                        for i, d in zip(ids, dist.tolist(), strict=True)
                    ],
                    "state_change_probability": out.state_change_probability,
                }
            )
        return records
