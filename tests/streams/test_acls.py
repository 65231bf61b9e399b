"""Each role's ACLs, from the table alone (tests/streams/test_secure.py checks them on the
secure broker)."""

from __future__ import annotations

from streams.acls import grants
from streams.settings import Settings


def _topics(prefix: str = "p-") -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for g in grants(Settings(topic_prefix=prefix)):
        if g.resource == "topic":
            table.setdefault((g.role, g.operation), set()).add(g.name)
    return table


def test_a_client_may_send_events_and_read_recommendations_only() -> None:
    table = _topics()
    assert table[("client", "write")] == {"p-interactions"}
    assert table[("client", "read")] == {"p-recommendations"}


def test_only_the_trainer_writes_models() -> None:
    writers = {
        role for (role, op), names in _topics().items() if op == "write" and "p-models" in names
    }
    assert writers == {"trainer"}


def test_topics_are_granted_by_full_name_with_the_prefix() -> None:
    # A PREFIXED `interactions` would also grant `interactions.log`.
    topic_grants = [g for g in grants(Settings(topic_prefix="p-")) if g.resource == "topic"]
    assert not [g for g in topic_grants if g.prefixed]
    assert all(g.name.startswith("p-") for g in topic_grants)


def test_the_pipeline_roles_write_what_the_stream_needs() -> None:
    table = _topics("")
    own = {"interactions.log", "interactions.positions"}
    assert {*own, "user-inbox", "item-inbox", "interactions.dlq"} <= table[("router", "write")]
    assert own <= table[("router", "read")]
    assert {"recommendations", "item-vectors", "jodie-user-state-changelog"} <= table[
        ("worker", "write")
    ]
    assert "interactions" not in table[("worker", "read")]


def test_transactional_ids_follow_the_pipeline_prefix() -> None:
    ids = {
        (g.role, g.name, g.prefixed)
        for g in grants(Settings(topic_prefix="p-"))
        if g.resource == "transactional_id"
    }
    assert ids == {("router", "p-jodie-router", False), ("worker", "p-jodie-worker-", True)}
