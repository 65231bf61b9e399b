"""Codecs built from the settings, including confluent-kafka's in-process mock registry."""

from __future__ import annotations

import pytest

from schemas import INTERACTION, UnknownSchemaError
from streams.codecs import make_codec
from streams.settings import Settings

RECORD = {
    "event_id": "f:2",
    "user_id": "7",
    "item_id": "3",
    "timestamp": 12.0,
    "features": [1.0],
    "state_label": 0,
}


def test_single_object_by_default() -> None:
    codec = make_codec(Settings(schema_registry_url=None), INTERACTION, "interactions")
    data = codec.encode(RECORD)
    assert data[:2] == b"\xc3\x01"
    assert codec.decode(data) == RECORD


def test_confluent_mock_registry_round_trip() -> None:
    settings = Settings(schema_registry_url="mock://codec-test")
    writer = make_codec(settings, INTERACTION, "interactions")
    data = writer.encode(RECORD)
    assert data[0] == 0  # Confluent magic byte, then the registry's schema id
    reader = make_codec(settings, INTERACTION, "interactions")
    assert reader.decode(data) == RECORD
    with pytest.raises(UnknownSchemaError):
        reader.decode(b"\x00\x7f\xff\xff\xff" + data[5:])
