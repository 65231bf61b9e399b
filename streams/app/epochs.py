"""Epochs: a model version serving from a log position on, and the table keys that carry them.

An *epoch* is ``(version, since)``: the router stamps every event with the epoch that serves
it (streams.switch). ``("", -1)`` is the unstamped stream of a router run without a model.
Table rows are keyed by epoch, so states computed by different weights never meet.
"""

from __future__ import annotations

from typing import Any

Epoch = tuple[str, int]  # (model version, seq of the epoch's first event)
UNSTAMPED: Epoch = ("", -1)
_SEPARATOR = b"\x00"


def epoch_of(record: dict[str, Any]) -> Epoch:
    """The epoch a log record or inbox message is stamped with."""
    return str(record.get("model_version") or ""), int(record.get("model_since", -1))


def label(epoch: Epoch) -> str:
    """``version@since``: how an epoch is written in row keys, headers and logs."""
    return f"{epoch[0]}@{epoch[1]}" if epoch != UNSTAMPED else "unstamped"


def parse_label(text: str) -> Epoch:
    """Inverse of ``label`` for a stamped epoch."""
    version, _at, since = text.rpartition("@")
    return version, int(since)


def row_key(entity: bytes, epoch: Epoch) -> bytes:
    """A table row's key: the entity id, then the epoch for stamped events (so one entity has
    one row per epoch, and rows of the unstamped stream keep the plain id)."""
    if epoch == UNSTAMPED:
        return entity
    return entity + _SEPARATOR + label(epoch).encode()


def split_row_key(key: bytes) -> tuple[bytes, Epoch]:
    """Inverse of ``row_key``."""
    entity, sep, tail = key.rpartition(_SEPARATOR)
    if not sep:
        return key, UNSTAMPED
    return entity, parse_label(tail.decode())
