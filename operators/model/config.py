"""Configuration dataclasses of the JODIE model and its trainer, stored inside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

ScorerName = Literal["plain", "history", "ranker"]
Protocol = Literal["paper", "frozen"]
Split = Literal["train", "valid", "test"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the model and to turn raw events into its inputs.

    The Δ statistics are part of the model: they are measured on the training split only
    (never on valid/test events) and every consumer, batch or stream, standardises with them.
    """

    embedding_dim: int = 128
    user_static_dim: int = 128
    item_static_dim: int = 128
    n_features: int = 0
    state_change: bool = True
    state_change_hidden: int = 50
    lambda_user: float = 1.0
    lambda_item: float = 1.0
    # Standardisation of Δ (seconds since the entity's previous interaction, 0 for its first).
    delta_user_mean: float = 0.0
    delta_user_std: float = 1.0
    delta_item_mean: float = 0.0
    delta_item_std: float = 1.0
    # How candidates are scored at recommendation time (see operators/scorer.py).
    scorer: ScorerName = "history"
    # Per-user bounded history of distinct recent items (most recent first); kept by the
    # stream in its user table, so it must stay small.
    history_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data-split settings of the t-batch trainer."""

    epochs: int = 10
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 1e-5
    # Number of t-batch timespans over the training split (the paper uses 500); gradients are
    # truncated at every span end, where the optimiser steps.
    n_spans: int = 500
    train_fraction: float = 0.8
    valid_fraction: float = 0.1
    # Intra-op threads. The t-batch operators are small (B ≈ 10 rows), where OpenMP
    # synchronisation costs more than it saves: one thread measured ~2× faster than two on a
    # 2-core machine, and it leaves the other core to the data pipeline. Never above the cores.
    threads: int = 1
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and k != "model"}
        return cls(model=ModelConfig.from_dict(data.get("model", {})), **kwargs)
