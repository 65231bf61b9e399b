"""End-to-end training run: t-batch training, scorer fitting on the training split (the served
margin on the validation split), checkpoint."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from operators.dataset import InteractionLog, file_fingerprint
from operators.evaluation.protocols import (
    frozen_replay,
    frozen_validation_mrr,
    ranker_samples,
    scorer_samples,
)
from operators.evaluation.ranker import PREFIX as RANKER_PREFIX
from operators.evaluation.ranker import fit_ranker
from operators.evaluation.scorer import fit_history_scorer, make_scorer
from operators.evaluation.served import LastItemMargins
from operators.model.config import ScorerName, TrainConfig
from operators.model.events import encode
from operators.model.jodie import Jodie
from operators.model.kernel import batched, replay
from operators.model.online import OnlineJodie
from operators.model.state import States
from operators.training.trainer import Progress, TrainResult, train

if TYPE_CHECKING:
    from operators.model.checkpoint import EntitySeqs

#: Share of the training split, at its end, on which the history scorer is fitted.
SCORER_FIT_FRACTION = 0.2
#: The same for the learned ranker: with more weights than the history scorer it gains from
#: a longer stretch of the split (measured on the validation split of all three datasets);
#: its samples stay bounded by ``RANKER_SAMPLE_CELLS`` whatever the stretch.
RANKER_FIT_FRACTION = 0.4


@dataclass
class RunResult:
    """A finished run: the trained result, the fitted scorer parameters, the checkpoint path.

    ``result.states`` are always those at the end of the training split. A run on the log
    (``seqs`` given) also has ``states``: those saved, advanced over the validation and test
    events with frozen weights, and ``last_seq`` of their rows.
    """

    result: TrainResult
    scorer_tensors: dict[str, Tensor]
    checkpoint: Path | None
    states: States | None = None
    last_seq: EntitySeqs | None = None


def advance(model: Jodie, states: States, log: InteractionLog) -> None:
    """Apply ``log``'s events to ``states`` one at a time with frozen weights.

    The sequential semantics of ``OnlineJodie.observe``, which frozen evaluation and the
    workers follow, so the result is what serving these events would have left.
    """
    online = OnlineJodie(model, states)
    feats = log.features if log.n_features else None
    uids, iids, ts = log.user_ids.tolist(), log.item_ids.tolist(), log.timestamps.tolist()
    for k in range(len(log)):
        online.observe(uids[k], iids[k], ts[k], feats[k] if feats is not None else None)


def last_seqs(states: States, log: InteractionLog, seqs: np.ndarray) -> EntitySeqs:
    """The seq of each state row's last event in ``log`` (rows aligned, seqs ascending), -1
    for a row without one."""
    from operators.model.checkpoint import EntitySeqs

    def per_row(ids: list[str], column: np.ndarray) -> np.ndarray:
        # Later events overwrite earlier ones in the dict, so each id keeps its largest seq.
        last = dict(zip(column.tolist(), seqs.tolist(), strict=True))
        return np.fromiter((last.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    return EntitySeqs(
        per_row(states.users.ids, log.user_ids), per_row(states.items.ids, log.item_ids)
    )


def fit_scorer(
    model: Jodie, train_log: InteractionLog, timespan: float, scorer: ScorerName | None = None
) -> dict[str, Tensor]:
    """Fit ``scorer`` (by default the one the model's config names: the history scorer or the
    learned ranker) on the last SCORER_FIT_FRACTION (RANKER_FIT_FRACTION for the ranker) of
    the training split.

    States for the fit come from a replay of the earlier training events; the fit events are
    then replayed sequentially with frozen weights, exactly as at serving time. Validation
    and test events are never used: pass the training split only.
    """
    mcfg = model.config
    states = States.empty(
        mcfg.embedding_dim, mcfg.user_static_dim, mcfg.item_static_dim, max(1, mcfg.history_size)
    )
    ranker = (scorer or mcfg.scorer) == "ranker"
    fraction = RANKER_FIT_FRACTION if ranker else SCORER_FIT_FRACTION
    cut = int(len(train_log) * (1.0 - fraction))
    head = train_log.slice(0, cut)
    replay(model, states, batched(encode(head, states), mcfg, timespan))
    tail = train_log.slice(cut, len(train_log))
    if ranker:
        return fit_ranker(ranker_samples(model, states, tail), mcfg.history_size).tensors()
    return fit_history_scorer(scorer_samples(model, states, tail), mcfg.history_size).tensors()


def fit_served_margin(
    model: Jodie, states: States, valid_log: InteractionLog, tensors: dict[str, Tensor]
) -> tuple[dict[str, Tensor], LastItemMargins]:
    """The scorer's ``tensors`` (the history scorer's or the learned ranker's) with the bonus
    of the user's last item raised by the margin of ``operators.evaluation.served.MARGINS``
    whose served lists on ``valid_log`` have the highest served MRR (the smallest such
    margin), and those figures.

    The scorer's terms are fitted by likelihood, which spreads probability over every item
    of a user's history; a served list is read from the top. On Wikipedia that fit let an
    older item the user had touched often pass the item just touched, which came next more
    often: the lists lost first place on "same item again" events to the heuristic that
    serves the last item first. The margin is chosen by what the served metric measures, on
    the validation split only (the test figures never see it), at the horizon the stream
    serves by default. ``states``, at the end of the training split, are advanced over
    ``valid_log``: pass a copy.
    """
    margins = LastItemMargins()
    frozen_replay(model, states, valid_log, make_scorer(model.config, tensors), 0, margins)
    # The history scorer's bonus by position, or the learned ranker's linear weight of the
    # entry's position (its one-hot column 0 is the last item).
    key = "scorer.bonus" if "scorer.bonus" in tensors else f"{RANKER_PREFIX}entry_weights"
    bonus = tensors[key].clone()
    # A margin ≥ 0 only raises the last item (the history scorer's bonus stays
    # non-increasing in the position).
    bonus[0] += margins.best()
    return {**tensors, key: bonus}, margins


def rebuilt_states(model: Jodie, train_log: InteractionLog, timespan: float) -> States:
    """The states a checkpoint of these weights holds after the training split, recomputed
    by the same no-grad t-batch replay: for a checkpoint saved before some of that state
    existed (``EntityStore.missing``)."""
    mcfg = model.config
    states = States.empty(
        mcfg.embedding_dim, mcfg.user_static_dim, mcfg.item_static_dim, max(1, mcfg.history_size)
    )
    replay(model, states, batched(encode(train_log, states), mcfg, timespan))
    return states


def run_training(
    log: InteractionLog,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    data_path: str | Path | None = None,
    *,
    seqs: np.ndarray | None = None,
    source: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Train, fit the scorer when the config asks for it (the history scorer's served margin
    on the validation split, ``fit_served_margin``), and write a checkpoint to ``out_dir``.

    From a CSV (``seqs`` None) the checkpoint holds the states at the end of the training
    split (``log_offsets.events`` = its length). From interactions.log, ``seqs`` (N,) gives
    each row's seq, ascending: the best weights are then run over the validation and test
    events too, so the states are at log position O = last seq + 1, where serving resumes
    (``log_offsets = {"events": N, "seq": O}``), and every row's last seq is saved. ``source``
    is recorded in the metadata as given.
    """
    from operators.model.checkpoint import save_checkpoint

    if seqs is not None and (seqs.shape != (len(log),) or np.any(np.diff(seqs) <= 0)):
        raise ValueError(f"seqs must be {len(log)} ascending positions, one per event")

    started = time.perf_counter()
    result = train(log, config, progress=progress)
    scorer_tensors: dict[str, Tensor] = {}
    if result.model.config.scorer != "plain":
        scorer_tensors = fit_scorer(
            result.model, log.slice(0, result.split.train_end), result.timespan
        )
    valid = log.slice(result.split.train_end, result.split.valid_end)
    if result.model.config.scorer in ("history", "ranker"):
        scorer_tensors, margins = fit_served_margin(
            result.model, result.states.copy(), valid, scorer_tensors
        )
        result.metrics["served_margin"] = margins.best()
        result.metrics["valid_served_mrr_by_margin"] = dict(
            zip(map(str, margins.margins), margins.mrr().tolist(), strict=True)
        )
    with torch.no_grad():
        result.metrics["valid_mrr_frozen_checkpoint_states"] = frozen_validation_mrr(
            result.model, result.states.copy(), valid
        )
    result.metrics["train_seconds"] = time.perf_counter() - started
    saved, last_seq = result.states, None
    offsets: dict[str, int] = {"events": result.split.train_end}
    if seqs is not None:
        saved = result.states.copy()
        advance(result.model, saved, log.slice(result.split.train_end, len(log)))
        last_seq = last_seqs(saved, log, seqs)
        offsets = {"events": len(log), "seq": int(seqs[-1]) + 1}
    path: Path | None = None
    if out_dir is not None:
        meta: dict[str, Any] = {
            "data_fingerprint": file_fingerprint(data_path) if data_path else None,
            "data_path_name": Path(data_path).name if data_path else None,
            "split": {
                "train": [0, result.split.train_end],
                "valid": [result.split.train_end, result.split.valid_end],
                "test": [result.split.valid_end, result.split.n],
            },
            # The states are those after the first `events` events trained on (from
            # interactions.log: after all of them, i.e. just before the event at `seq`).
            "log_offsets": offsets,
            "timespan": result.timespan,
            "best_epoch": result.best_epoch,
            "metrics": result.metrics,
            "curves": result.curves,
        }
        if source is not None:
            meta["source"] = source
        path = save_checkpoint(
            out_dir, result.model, saved, result.config, scorer_tensors, meta, last_seq
        )
        (path / "curves.json").write_text(json.dumps(result.curves, indent=2))
    return RunResult(result, scorer_tensors, path, saved if seqs is not None else None, last_seq)
