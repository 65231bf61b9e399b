"""Ask the running workers what a user should see now (interactive queries), typed.

Any worker answers for any user (streams.interactive forwards to the owner), so a client
tries the addresses it knows in turn and takes the first answer. Only the standard library
is used here, so a client process needs neither Kafka nor torch.

>>> urls = worker_urls(Settings(web_port=6066), workers=2)
>>> urls
['http://127.0.0.1:6066', 'http://127.0.0.1:6067']
>>> answer = recommend("6170", k=3, urls=urls)  # doctest: +SKIP
>>> [(r.item_id, round(r.score, 2)) for r in answer.recommendations]  # doctest: +SKIP
[('913', -0.18), ('7', -1.02), ('41', -1.1)]
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from streams.exceptions import BadQueryError, NoWorkerError, QueryError, UnknownEntityError
from streams.settings import Settings

#: The longest list a query may ask for (the workers refuse more).
MAX_K = 1000


@dataclass(frozen=True)
class Scored:
    """One recommended item: its score (higher is better) and the terms it is the sum of
    (``distance``, and with the history ranker ``history``, ``popularity``, ``trend``;
    ``UserRecommendations.score_meaning`` says what each is)."""

    item_id: str
    score: float
    terms: Mapping[str, float]


@dataclass(frozen=True)
class UserRecommendations:
    """What a user should see now, as the worker owning the user computed it."""

    user_id: str
    k: int
    model_version: str
    epoch: str | None  # version@since when the router stamps epochs
    #: Seq in interactions.log of the user's last applied event (None: the state comes from
    #: a checkpoint trained from a file, or the user is unknown).
    log_seq: int | None
    pending_events: int  # events of the user received but not applied yet
    last_event_time: float | None
    projected_to: float | None  # the event time the user was projected to
    cold_start: bool  # the user is unknown: popular and trending items instead
    served_by: str  # the worker that computed the answer
    score_meaning: str
    recommendations: tuple[Scored, ...]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> UserRecommendations:
        return cls(
            user_id=str(body["user_id"]),
            k=int(body["k"]),
            model_version=str(body["model_version"]),
            epoch=body.get("epoch"),
            log_seq=body.get("log_seq"),
            pending_events=int(body.get("pending_events", 0)),
            last_event_time=body.get("last_event_time"),
            projected_to=body.get("projected_to"),
            cold_start=bool(body.get("cold_start", False)),
            served_by=str(body["served_by"]),
            score_meaning=str(body["score"]),
            recommendations=tuple(
                Scored(str(r["item_id"]), float(r["score"]), dict(r.get("terms", {})))
                for r in body["recommendations"]
            ),
        )


def worker_urls(settings: Settings, workers: int, host: str = "127.0.0.1") -> list[str]:
    """The HTTP addresses of workers 0 .. ``workers``-1 (worker N: JODIE_WEB_PORT + N)."""
    return [f"http://{host}:{settings.web_port + n}" for n in range(workers)]


def recommend(
    user_id: str,
    k: int = 10,
    *,
    urls: Sequence[str],
    cold_start: bool = False,
    at: float | None = None,
    timeout_s: float = 10.0,
) -> UserRecommendations:
    """The top ``k`` items for ``user_id`` now (or projected to event time ``at``).

    ``cold_start``: for an unknown user, the items popular and trending now instead of
    ``UnknownEntityError``. Raises ``NoWorkerError`` when no address answers,
    ``BadQueryError`` for parameters the workers refuse.
    """
    params: dict[str, str] = {"k": str(k)}
    if cold_start:
        params["cold_start"] = "1"
    if at is not None:
        params["at"] = repr(float(at))
    path = f"/users/{quote(user_id, safe='')}/recommendations?{urlencode(params)}"
    return UserRecommendations.from_json(_ask(urls, path, timeout_s))


def item(item_id: str, *, urls: Sequence[str], timeout_s: float = 10.0) -> dict[str, Any]:
    """An item's state at its owner: event count, decayed count, last event time, log seq."""
    return _ask(urls, f"/items/{quote(item_id, safe='')}", timeout_s)


def _ask(urls: Sequence[str], path: str, timeout_s: float) -> dict[str, Any]:
    """The first worker's answer; a worker that cannot answer now (starting, rebalancing:
    5xx) is passed over like one that does not answer."""
    failures: dict[str, list[str]] = {}  # why → the addresses that failed so
    for base in urls:
        try:
            with urllib.request.urlopen(base + path, timeout=timeout_s) as reply:
                found: dict[str, Any] = json.loads(reply.read())
                return found
        except urllib.error.HTTPError as reply:
            with reply:
                message = _message(reply.read()) or reply.reason
            if reply.code == 404:
                raise UnknownEntityError(message) from None
            if 400 <= reply.code < 500:
                raise BadQueryError(message) from None
            failures.setdefault(f"{reply.code} {message}", []).append(base)
        except (OSError, ValueError) as exc:
            failures.setdefault(str(getattr(exc, "reason", exc)), []).append(base)
    if not urls:
        raise QueryError("no worker address to ask")
    why = "; ".join(f"{', '.join(where)}: {reason}" for reason, where in failures.items())
    raise NoWorkerError(
        f"no worker answered ({why}): start the workers (jodie worker --id N), or point "
        "JODIE_WEB_PORT and --workers at the running ones"
    )


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:200]
