"""The symmetric exchange: each side applies an event once it holds the other side's pre-state.

An event r = (u, i) is applied twice, once by u's owner (user side) and once by i's owner
(item side), each needing the other's state *just before r*. Both sides follow the same small
state machine, kept per entity in its table (so waiting survives a crash):

- an entity is *ready* for r when r's link (``prev_*_seq``) names the entity's last applied
  event; it then sends its pre-state for r to the other side (once);
- it applies r when it is ready and the other side's pre-state for r has arrived;
- events and partner states may arrive in any order and more than once: they wait in the
  entity's record until their turn, and repeats are ignored;
- when both entities' previous events are the same event (the pair interacts again with
  nothing in between, the common case of repeat consumption), each side already computed the
  other's post-state when it applied that event, so nothing is sent and nothing awaited: the
  pair proceeds without a round trip;
- more generally, the partner's pre-state for r is its post-state from its previous event,
  which every applier of that event computed. A process that applied it (on this side, for
  another entity) may keep that post-state (``DerivedStates``) and apply r without waiting
  for the partner's message, which still comes and is then ignored as a repeat.

The globally earliest unapplied event always has both sides ready, so the exchange cannot
deadlock, and every side applies its events in sequence order: the result equals a sequential
replay in sequence order, at any partitioning.

The model math is injected (``apply``), so this module knows nothing of JODIE.

>>> add = lambda mine, theirs, event, previous: (mine + theirs, "done", theirs + mine)
>>> box = Inbox(state=0)
>>> first = Pending(seq=0, prev_seq=-1, partner="i", payload=None, partner_prev_seq=-1)
>>> out = box.on_event(first, add)
>>> [type(o).__name__ for o in out]
['SendPreState']
>>> out = box.on_partner(PartnerState(seq=0, state=5), add)
>>> box.state, box.applied_seq, out[-1].output
(5, 0, 'done')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

S = TypeVar("S")  # this side's entity state
P = TypeVar("P")  # the partner's pre-state as sent over the exchange


class Pending(NamedTuple):
    """An event waiting at one entity.

    ``prev_seq`` is this entity's previous event, ``partner_prev_seq`` the partner's (-1: none
    in the log; the partner may still have a checkpoint state).
    """

    seq: int
    prev_seq: int
    partner: str
    payload: Any
    partner_prev_seq: int = -2  # unknown: never take the shared-previous shortcut

    @property
    def shares_previous(self) -> bool:
        """Both entities' previous event is one and the same logged event."""
        return self.prev_seq >= 0 and self.prev_seq == self.partner_prev_seq


class PartnerState(NamedTuple, Generic[P]):
    """The other side's state just before event ``seq``."""

    seq: int
    state: P


class SendPreState(NamedTuple, Generic[S]):
    """Send this entity's pre-state for event ``seq`` to ``partner``'s owner."""

    seq: int
    partner: str
    state: S


class Ready(NamedTuple, Generic[S, P]):
    """An event this entity can apply now: its state, the partner's pre-state and the
    partner's post-state from the entity's previous event (the ``Apply`` arguments)."""

    event: Pending
    state: S
    partner: P
    previous: P | None


class Applied(NamedTuple):
    """Event ``seq`` was applied; ``output`` is whatever ``apply`` returned beside the state."""

    seq: int
    output: Any


# (own state, partner's pre-state, event, the previous partner's post-state as this entity
# computed it at its last applied event, None before any) → (own post-state, output, partner's
# post-state). The fourth argument lets a user side predict from its last item's state.
Apply = Callable[[S, P, Pending, P | None], tuple[S, Any, P]]


@dataclass
class Inbox(Generic[S, P]):
    """Per-entity exchange record: the model state plus what waits for its turn."""

    state: S
    applied_seq: int = -1
    sent_seq: int = -1
    waiting: dict[int, Pending] = field(default_factory=dict)  # keyed by prev_seq
    partners: dict[int, P] = field(default_factory=dict)  # keyed by seq
    # The partner's post-state computed when this entity applied ``applied_seq``.
    derived: P | None = None

    def offer_event(self, event: Pending) -> bool:
        """Queue an event for its turn; False for a repeat."""
        if event.seq <= self.applied_seq or event.prev_seq in self.waiting:
            return False
        self.waiting[event.prev_seq] = event
        return True

    def offer_partner(self, message: PartnerState[P]) -> bool:
        """Keep the partner's pre-state for its event; False for a repeat."""
        if message.seq <= self.applied_seq:
            return False
        self.partners[message.seq] = message.state
        return True

    def step(
        self, known: Callable[[str, int], P | None] | None = None
    ) -> tuple[SendPreState[S] | None, Ready[S, P] | None]:
        """What is due for the next event: our pre-state to send (once) and, when the
        partner's pre-state is here too, the event ready to apply (then ``complete`` it).
        ``known(partner, seq)``: the partner's post-state from its event ``seq``, where this
        process computed it (see ``DerivedStates``), standing in for the partner's message."""
        nxt = self.waiting.get(self.applied_seq)
        if nxt is None:
            return None, None
        if nxt.shares_previous and self.derived is not None:
            # The partner derives our pre-state just as we derive theirs: no message.
            return None, Ready(nxt, self.state, self.derived, self.derived)
        send = None
        if self.sent_seq != nxt.seq:
            send = SendPreState(nxt.seq, nxt.partner, self.state)
            self.sent_seq = nxt.seq
        if nxt.seq in self.partners:
            return send, Ready(nxt, self.state, self.partners[nxt.seq], self.derived)
        if known is None or nxt.partner_prev_seq < 0:
            return send, None
        partner = known(nxt.partner, nxt.partner_prev_seq)
        if partner is None:
            return send, None
        return send, Ready(nxt, self.state, partner, self.derived)

    def complete(self, ready: Ready[S, P], state: S, output: Any, partner_post: P) -> Applied:
        """Record the result of applying ``ready`` (what ``Apply`` returned for it)."""
        event = ready.event
        self.partners.pop(event.seq, None)
        del self.waiting[event.prev_seq]
        self.state, self.derived, self.applied_seq = state, partner_post, event.seq
        return Applied(event.seq, output)

    def on_event(self, event: Pending, apply: Apply[S, P]) -> list[SendPreState[S] | Applied]:
        return self._advance(apply) if self.offer_event(event) else []

    def on_partner(
        self, message: PartnerState[P], apply: Apply[S, P]
    ) -> list[SendPreState[S] | Applied]:
        return self._advance(apply) if self.offer_partner(message) else []

    @property
    def idle(self) -> bool:
        """Nothing waits here: the record holds only the model state."""
        return not self.waiting and not self.partners

    def _advance(self, apply: Apply[S, P]) -> list[SendPreState[S] | Applied]:
        out: list[SendPreState[S] | Applied] = []
        while True:
            send, ready = self.step()
            if send is not None:
                out.append(send)
            if ready is None:
                return out
            state, output, post = apply(ready.state, ready.partner, ready.event, ready.previous)
            out.append(self.complete(ready, state, output, post))


# Many ready events of distinct entities at once → (own post-state, output, partner post-state)
# for each, in order: the batched form of ``Apply``.
ApplyMany = Callable[[list["Ready[S, P]"]], list[tuple[S, Any, P]]]


class DerivedStates(Generic[P]):
    """Partners' post-states this process computed while applying events, by (partner,
    event seq), for one side and one set of weights.

    Event r's partner pre-state is the partner's post-state from its previous event; when
    this side applied that event too (for another entity of its own), it holds that state
    already and r need not wait a round trip for the partner's message. Of use to a worker
    that owns part of the entities: with two workers on the whole Wikipedia log, the longest
    chain of waits for a crossing pre-state falls from 763 round trips to 180
    (benchmarks/scaling_sim.py). Kept in memory only,
    bounded (the oldest half dropped past ``most``); ``usable(output)`` says whether an
    application's post-state may stand in (not one the event was quarantined by).
    """

    def __init__(self, most: int, usable: Callable[[Any], bool] = lambda _output: True) -> None:
        if most < 0:
            raise ValueError(f"most must be >= 0, got {most}")
        self.most = most
        self.usable = usable
        self.hits = 0
        self._states: dict[tuple[str, int], P] = {}

    def get(self, partner: str, seq: int) -> P | None:
        state = self._states.get((partner, seq))
        if state is not None:
            self.hits += 1
        return state

    def offer(self, partner: str, seq: int, state: P, output: Any) -> None:
        if not self.most or not self.usable(output):
            return
        if len(self._states) >= self.most:  # dicts keep insertion order: oldest first
            for old in list(self._states)[: max(1, self.most // 2)]:
                del self._states[old]
        self._states[(partner, seq)] = state


def drive(
    boxes: Iterable[Inbox[S, P]],
    apply_many: ApplyMany[S, P],
    derived: DerivedStates[P] | None = None,
) -> list[SendPreState[S] | Applied]:
    """Advance every inbox as far as it can go, applying ready events in waves.

    Each wave takes the next ready event of every inbox (at most one per entity, so the waves
    are independent and can be computed as one batch), then the inboxes that applied
    something are stepped again. The result per inbox is the one ``on_event``/``on_partner``
    would give; only the model calls are grouped. ``derived``: the partners' post-states this
    side computed, used for a partner's pre-state not yet received, and kept from each
    application.
    """
    out: list[SendPreState[S] | Applied] = []
    known = None if derived is None else derived.get
    active = list({id(box): box for box in boxes}.values())  # distinct, first-seen order
    while active:
        ready: list[tuple[Inbox[S, P], Ready[S, P]]] = []
        for box in active:
            send, r = box.step(known)
            if send is not None:
                out.append(send)
            if r is not None:
                ready.append((box, r))
        if not ready:
            return out
        results = apply_many([r for _, r in ready])
        for (box, r), (state, output, post) in zip(ready, results, strict=True):
            out.append(box.complete(r, state, output, post))
            if derived is not None:
                derived.offer(r.event.partner, r.event.seq, post, output)
        active = [box for box, _ in ready]
    return out
