"""What one worker serves with one model version: weights, baseline states, candidate index,
the live evaluation, and the one place where user-side outputs become recommendation records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from operators.evaluation.live import LiveRanks
from operators.model.checkpoint import Checkpoint, load_checkpoint
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
        index = TieredIndex(dim)
        ids, vectors = baseline.item_vectors()
        if ids:
            index.upsert(ids, vectors)
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
            live=LiveRanks(ckpt.model, start, ids, vectors, every=settings.evaluate_every),
            cooccurrence=cooccurrence,
            epoch=epoch,
        )

    def recommendations(self, outs: list[UserOutput]) -> list[dict[str, Any]]:
        """Top candidates for each predicted item, re-ranked by exact distance: nearest
        neighbours ∪ the user's history ∪ items whose audiences resemble those of the user's
        recent items (co-occurrence, MinHash LSH)."""
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
        ranked = self.index.recommend(preds, self.candidates, extra)
        records = []
        for out, pred, (ids, dist) in zip(outs, preds, ranked, strict=True):
            records.append(
                {
                    "user_id": out.event.user_id,
                    "event_id": out.event.event_id,
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
