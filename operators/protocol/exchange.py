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
  pair proceeds without a round trip.

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
from typing import Any, Generic, TypeVar

S = TypeVar("S")  # this side's entity state
P = TypeVar("P")  # the partner's pre-state as sent over the exchange


@dataclass(frozen=True)
class Pending:
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


@dataclass(frozen=True)
class PartnerState(Generic[P]):
    """The other side's state just before event ``seq``."""

    seq: int
    state: P


@dataclass(frozen=True)
class SendPreState(Generic[S]):
    """Send this entity's pre-state for event ``seq`` to ``partner``'s owner."""

    seq: int
    partner: str
    state: S


@dataclass(frozen=True)
class Ready(Generic[S, P]):
    """An event this entity can apply now: its state, the partner's pre-state and the
    partner's post-state from the entity's previous event (the ``Apply`` arguments)."""

    event: Pending
    state: S
    partner: P
    previous: P | None


@dataclass(frozen=True)
class Applied:
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

    def step(self) -> tuple[SendPreState[S] | None, Ready[S, P] | None]:
        """What is due for the next event: our pre-state to send (once) and, when the
        partner's pre-state is here too, the event ready to apply (then ``complete`` it)."""
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
        if nxt.seq not in self.partners:
            return send, None
        return send, Ready(nxt, self.state, self.partners[nxt.seq], self.derived)

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


def drive(
    boxes: Iterable[Inbox[S, P]], apply_many: ApplyMany[S, P]
) -> list[SendPreState[S] | Applied]:
    """Advance every inbox as far as it can go, applying ready events in waves.

    Each wave takes the next ready event of every inbox (at most one per entity, so the waves
    are independent and can be computed as one batch), then the inboxes that applied
    something are stepped again. The result per inbox is the one ``on_event``/``on_partner``
    would give; only the model calls are grouped.
    """
    out: list[SendPreState[S] | Applied] = []
    active = list({id(box): box for box in boxes}.values())  # distinct, first-seen order
    while active:
        ready: list[tuple[Inbox[S, P], Ready[S, P]]] = []
        for box in active:
            send, r = box.step()
            if send is not None:
                out.append(send)
            if r is not None:
                ready.append((box, r))
        if not ready:
            return out
        results = apply_many([r for _, r in ready])
        for (box, r), (state, output, post) in zip(ready, results, strict=True):
            out.append(box.complete(r, state, output, post))
        active = [box for box, _ in ready]
    return out
