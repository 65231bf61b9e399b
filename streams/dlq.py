"""The dead-letter topic read back, and its events sent again to `interactions`.

The router copies a rejected message's original key and bytes, the workers write a
quarantined event framed as clients frame it: either way the value is what a client sends, so
re-sending it needs no re-encoding. Re-sending does not bypass validation: the router judges
the event again (a duplicate is rejected again as a duplicate, which is right).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jodie_errors import JodieError
from operators.protocol.sequencer import RejectReason
from schemas.codec import INTERACTION
from streams.codecs import make_codec
from streams.exceptions import DlqFileError
from streams.peek import dead_letter_decoder, read_messages
from streams.produce import produce_messages
from streams.settings import Settings

#: Why an event is in the DLQ: the router's reasons, a worker's quarantine, an inbox message
#: a worker could not read.
DlqReason = Literal[RejectReason, "quarantined", "unreadable_inbox"]


@dataclass(frozen=True)
class DeadLetter:
    """One DLQ message: why it is there, and the event it holds (None when its bytes are not
    an Interaction: a malformed message, or an inbox message a worker could not read)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    reason: str
    detail: str
    source: str
    truncated: str | None  # "key K value V": the original sizes of a copy cut to fit
    event: dict[str, Any] | None

    @property
    def resendable(self) -> bool:
        """Whether its bytes are a whole client event (an Interaction, not cut short)."""
        return self.event is not None and self.truncated is None

    def as_json(self) -> dict[str, Any]:
        """What `jodie dlq show --json` prints, and `jodie dlq replay --from` reads back."""
        return {
            "partition": self.partition,
            "offset": self.offset,
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
            **({"truncated": self.truncated} if self.truncated else {}),
            "key": None if self.key is None else self.key.decode(errors="replace"),
            "event": self.event,
        }


def dead_letters(
    settings: Settings, reason: str | None = None, limit: int | None = None
) -> Iterator[DeadLetter]:
    """The DLQ's messages, oldest first (``reason``'s only, at most ``limit``)."""
    decode = dead_letter_decoder(settings)
    seen = 0
    for m in read_messages(settings, settings.topic("interactions.dlq")):
        if limit is not None and seen >= limit:
            return
        fields = decode(m.key, m.value, m.headers)
        if reason is not None and fields.get("reason") != reason:
            continue
        seen += 1
        yield DeadLetter(
            partition=m.partition,
            offset=m.offset,
            key=m.key,
            value=m.value or b"",
            reason=fields.get("reason", ""),
            detail=fields.get("detail", ""),
            source=fields.get("source", ""),
            truncated=fields.get("truncated"),
            event=fields["event"],
        )


@dataclass
class ReplaySummary:
    """What a replay sent, and what it left out and why."""

    sent: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def replay(settings: Settings, letters: Iterable[DeadLetter]) -> ReplaySummary:
    """Send each resendable letter's original key and bytes to `interactions`, in DLQ order;
    the others (not an event, or a copy cut short) are counted as skipped."""
    summary = ReplaySummary()
    chosen = []
    for letter in letters:
        if letter.event is None:
            summary.skipped["not an event"] += 1
        elif letter.truncated is not None:
            summary.skipped["cut short"] += 1
        else:
            chosen.append((letter.key, letter.value))
    summary.sent = produce_messages(settings, chosen) if chosen else 0
    return summary


def replay_file(settings: Settings, path: Path) -> ReplaySummary:
    """Send the events of a file as `jodie dlq show --json` prints them, edited or not: each
    line's ``event`` encoded as an Interaction (framed per the settings), keyed by its user."""
    codec = make_codec(settings, INTERACTION, settings.topic("interactions"))
    messages = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)["event"]
            messages.append((str(event["user_id"]).encode(), codec.encode(event)))
        except (ValueError, KeyError, TypeError, JodieError) as exc:
            raise DlqFileError(f"{path}:{n}: not an event to re-send ({exc})") from exc
    return ReplaySummary(sent=produce_messages(settings, messages) if messages else 0)
