"""JODIE-format CSV reader: ``user_id,item_id,timestamp,state_label[,f1..fF]``, plain or gzip."""

from __future__ import annotations

import gzip
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from operators.exceptions import BadRowError, DataError

_MIN_FIELDS = 4


@dataclass(frozen=True)
class Row:
    """One valid interaction row, with its 1-based line number in the file."""

    line: int
    user_id: str
    item_id: str
    timestamp: float
    state_label: int
    features: tuple[float, ...]


@dataclass(frozen=True)
class InteractionLog:
    """A whole interaction file as columns, in file (time) order."""

    user_ids: np.ndarray  # (N,) str
    item_ids: np.ndarray  # (N,) str
    timestamps: np.ndarray  # (N,) float64
    state_labels: np.ndarray  # (N,) int8
    features: np.ndarray  # (N, F) float32, F may be 0
    lines: np.ndarray  # (N,) int64, line numbers in the source file

    def __len__(self) -> int:
        return int(self.timestamps.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    def slice(self, start: int, stop: int) -> InteractionLog:
        return InteractionLog(
            self.user_ids[start:stop],
            self.item_ids[start:stop],
            self.timestamps[start:stop],
            self.state_labels[start:stop],
            self.features[start:stop],
            self.lines[start:stop],
        )


def open_text(path: str | Path) -> IO[str]:
    """Open a plain or gzip-compressed text file (detected by its magic bytes)."""
    p = Path(path)
    with p.open("rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(p, "rt", encoding="utf-8", newline="")
    return p.open("r", encoding="utf-8", newline="")


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's decompressed text: equal for the plain and the gzip copy."""
    digest = hashlib.sha256()
    with open_text(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), ""):
            digest.update(chunk.encode("utf-8"))
    return digest.hexdigest()


def parse_row(line_no: int, text: str, n_features: int | None) -> Row:
    """Parse one data line; raise BadRowError naming the line and the reason."""
    parts = text.rstrip("\r\n").split(",")
    if len(parts) < _MIN_FIELDS:
        raise BadRowError(
            line_no, f"expected at least {_MIN_FIELDS} fields, got {len(parts)}", text
        )
    user, item, ts_text, label_text = (p.strip() for p in parts[:_MIN_FIELDS])
    if not user:
        raise BadRowError(line_no, "missing user_id", text)
    if not item:
        raise BadRowError(line_no, "missing item_id", text)
    try:
        timestamp = float(ts_text)
    except ValueError:
        raise BadRowError(line_no, f"timestamp {ts_text!r} is not a number", text) from None
    if not math.isfinite(timestamp):
        raise BadRowError(line_no, f"timestamp {ts_text!r} is not finite", text)
    try:
        label = int(float(label_text))
    except ValueError:
        raise BadRowError(line_no, f"state_label {label_text!r} is not a number", text) from None
    if label not in (0, 1):
        raise BadRowError(line_no, f"state_label {label} is not 0 or 1", text)
    feature_texts = parts[_MIN_FIELDS:]
    if n_features is not None and len(feature_texts) != n_features:
        raise BadRowError(
            line_no, f"expected {n_features} features, got {len(feature_texts)}", text
        )
    try:
        features = tuple(float(f) for f in feature_texts)
    except ValueError:
        raise BadRowError(line_no, "a feature is not a number", text) from None
    if not all(math.isfinite(f) for f in features):
        raise BadRowError(line_no, "a feature is NaN or infinite", text)
    return Row(line_no, user, item, timestamp, label, features)


def iter_rows(
    path: str | Path, errors: list[BadRowError] | None = None, strict: bool = False
) -> Iterator[Row]:
    """Yield the valid rows of a JODIE CSV in file order.

    The feature count F is fixed by the first valid row; later rows must match it. Bad rows
    raise in strict mode, else are appended to ``errors`` (when given) and skipped, so the
    caller decides how to report them: nothing is dropped silently.
    """
    n_features: int | None = None
    with open_text(path) as fh:
        header = fh.readline()
        if not header:
            raise DataError(f"{path}: empty file")
        if not header.lower().startswith("user"):
            raise DataError(f"{path}: line 1 is not the JODIE header (user_id,item_id,...)")
        for line_no, text in enumerate(fh, start=2):
            if not text.strip():
                continue
            try:
                row = parse_row(line_no, text, n_features)
            except BadRowError as err:
                if strict:
                    raise
                if errors is not None:
                    errors.append(err)
                continue
            if n_features is None:
                n_features = len(row.features)
            yield row


def load_interactions(
    path: str | Path, errors: list[BadRowError] | None = None, strict: bool = False
) -> InteractionLog:
    """Read a whole JODIE CSV into columns (see ``iter_rows`` for bad-row handling)."""
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    labels: list[int] = []
    feats: list[tuple[float, ...]] = []
    lines: list[int] = []
    for row in iter_rows(path, errors=errors, strict=strict):
        users.append(row.user_id)
        items.append(row.item_id)
        times.append(row.timestamp)
        labels.append(row.state_label)
        feats.append(row.features)
        lines.append(row.line)
    n_features = len(feats[0]) if feats else 0
    features = (
        np.asarray(feats, dtype=np.float32).reshape(len(feats), n_features)
        if feats
        else np.zeros((0, 0), dtype=np.float32)
    )
    timestamps = np.asarray(times, dtype=np.float64)
    if timestamps.size > 1 and np.any(np.diff(timestamps) < 0):
        raise DataError(f"{path}: rows are not sorted by timestamp")
    return InteractionLog(
        user_ids=np.asarray(users, dtype=object).astype(str),
        item_ids=np.asarray(items, dtype=object).astype(str),
        timestamps=timestamps,
        state_labels=np.asarray(labels, dtype=np.int8),
        features=features,
        lines=np.asarray(lines, dtype=np.int64),
    )


def bundled_wikipedia() -> Path:
    """The Wikipedia edits file shipped in the repository's data/ folder."""
    path = Path(__file__).resolve().parent.parent / "data" / "wikipedia.csv.gz"
    if not path.exists():
        raise DataError(f"bundled data not found at {path}")
    return path


def comparison_logs() -> list[Path]:
    """The logs a modelling idea is checked on: the bundled Wikipedia file, then the public
    collegemsg and bitcoin_otc logs of the data folder beside the repository
    (``../shared/data``)."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    return [bundled_wikipedia(), shared / "collegemsg.csv", shared / "bitcoin_otc.csv"]
