"""The Avro codec: round trips, framing, schema evolution, bad bytes."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import pytest

from schemas import (
    INTERACTION,
    MODEL_ANNOUNCEMENT,
    RECOMMENDATION,
    Codec,
    ConfluentFraming,
    DecodeError,
    EncodeError,
    SchemaError,
    SingleObjectFraming,
    UnknownSchemaError,
    load_schema,
    recommendation_vectors,
)
from schemas.codec import ENTITY_RECORD, EVALUATION, canonical_form, fingerprint64

INTERACTION_RECORD: dict[str, Any] = {
    "event_id": "abc:2",
    "user_id": "u1",
    "item_id": "i9",
    "timestamp": 36.5,
    "features": [0.25, -1.5],
    "state_label": 1,
}


def test_interaction_round_trip_single_object() -> None:
    codec = Codec(INTERACTION)
    data = codec.encode(INTERACTION_RECORD)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == fingerprint64(load_schema(INTERACTION))
    assert codec.decode(data) == INTERACTION_RECORD


def test_optional_fields_default() -> None:
    codec = Codec(INTERACTION)
    record = {k: v for k, v in INTERACTION_RECORD.items() if k not in ("features", "state_label")}
    decoded = codec.decode(codec.encode(record))
    assert decoded["features"] == []
    assert decoded["state_label"] is None


def test_recommendation_and_announcement_round_trip() -> None:
    rec = {
        "user_id": "u1",
        "event_id": "abc:2",
        "item_id": "i7",
        "timestamp": 1.0,
        "model_version": "v3",
        "projected_user": [],
        "predicted_item": [],
        "projected_user_f32": np.array([0.5, 0.25], dtype="<f4").tobytes(),
        "predicted_item_f32": np.array([1.0, -2.0, 0.0], dtype="<f4").tobytes(),
        "candidates": [{"item_id": "i1", "score": -0.5}, {"item_id": "i2", "score": -1.25}],
        "state_change_probability": 0.125,
    }
    assert Codec(RECOMMENDATION).decode(Codec(RECOMMENDATION).encode(rec)) == rec
    projected, predicted = recommendation_vectors(rec)
    assert projected.tolist() == [0.5, 0.25] and predicted.tolist() == [1.0, -2.0, 0.0]
    # Written before vectors were packed: the arrays still read, and so do the vectors.
    v2_rec = {
        **{k: v for k, v in rec.items() if not k.endswith("_f32")},
        "projected_user": [0.5, 0.25],
        "predicted_item": [1.0, -2.0, 0.0],
    }
    data = Codec(load_schema("recommendation.v2")).encode(v2_rec)
    decoded = Codec(RECOMMENDATION).decode(data)
    # (the packed fields default to null)
    assert {k: v for k, v in decoded.items() if not k.endswith("_f32")} == v2_rec
    assert not decoded["projected_user_f32"] and not decoded["predicted_item_f32"]
    assert [v.tolist() for v in recommendation_vectors(decoded)] == [[0.5, 0.25], [1, -2, 0]]
    # Written before recommendations named their item: still read, with an empty one.
    old_rec = {k: v for k, v in v2_rec.items() if k != "item_id"}
    data = Codec(load_schema("recommendation.v1")).encode(old_rec)
    decoded = Codec(RECOMMENDATION).decode(data)
    assert {k: v for k, v in decoded.items() if not k.endswith("_f32")} == {
        **old_rec,
        "item_id": "",
    }
    ev = {
        "event_id": "e1",
        "seq": 41,
        "user_id": "u1",
        "item_id": "i2",
        "model_version": "v3",
        "rank": 3,
        "n_items": 1000,
    }
    assert Codec(EVALUATION).decode(Codec(EVALUATION).encode(ev)) == ev
    ann = {
        "name": "jodie",
        "version": "v3",
        "uri": "file:///models/v3",
        "sha256": "ab" * 32,
        "log_offsets": [{"partition": 0, "offset": 10}, {"partition": 1, "offset": 7}],
        "metrics": {"valid_mrr": 0.75},
        "created_at_ms": 1_700_000_000_000,
        "log_seq": 1234,
        "previous_version": "v2",
        "signature": "cd" * 32,
    }
    assert Codec(MODEL_ANNOUNCEMENT).decode(Codec(MODEL_ANNOUNCEMENT).encode(ann)) == ann
    # Written before announcements were signed: still read, as unsigned.
    old = {k: v for k, v in ann.items() if k != "signature"}
    data = Codec(load_schema("model_announcement.v1")).encode(old)
    assert Codec(MODEL_ANNOUNCEMENT).decode(data) == {**old, "signature": None}


def test_floats_are_float32_on_the_wire() -> None:
    codec = Codec(INTERACTION)
    decoded = codec.decode(codec.encode({**INTERACTION_RECORD, "features": [0.1]}))
    assert decoded["features"][0] != 0.1
    assert math.isclose(decoded["features"][0], 0.1, rel_tol=1e-7)


def _v2() -> dict[str, Any]:
    """Interaction with one more optional field, as a later release might add."""
    schema = copy.deepcopy(load_schema(INTERACTION))
    schema["fields"].append({"name": "session_id", "type": ["null", "string"], "default": None})
    return schema


def test_v1_writer_read_by_v2_reader() -> None:
    v1_writer = Codec(INTERACTION)
    v2_reader = Codec(_v2(), older=[load_schema(INTERACTION)])
    decoded = v2_reader.decode(v1_writer.encode(INTERACTION_RECORD))
    assert decoded == {**INTERACTION_RECORD, "session_id": None}


def test_v2_writer_read_by_v1_reader_skips_the_new_field() -> None:
    v2_writer = Codec(_v2())
    v1_reader = Codec(INTERACTION, older=[_v2()])
    data = v2_writer.encode({**INTERACTION_RECORD, "session_id": "s-1"})
    assert v1_reader.decode(data) == INTERACTION_RECORD


def test_unknown_fingerprint_is_a_clear_error() -> None:
    data = Codec(_v2()).encode({**INTERACTION_RECORD, "session_id": None})
    with pytest.raises(UnknownSchemaError, match="unknown writer schema fingerprint"):
        Codec(INTERACTION).decode(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x01garbage", b"\xc3\x01short"],
)
def test_malformed_bytes(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Codec(INTERACTION).decode(data)


def test_truncated_body_and_trailing_bytes() -> None:
    codec = Codec(INTERACTION)
    data = codec.encode(INTERACTION_RECORD)
    with pytest.raises(DecodeError):
        codec.decode(data[:-3])
    with pytest.raises(DecodeError, match="trailing"):
        codec.decode(data + b"\x00")


def test_encode_rejects_a_record_missing_a_field() -> None:
    with pytest.raises(EncodeError):
        Codec(INTERACTION).encode({"event_id": "x", "user_id": "u"})


def test_encode_rejects_an_int_beyond_a_long() -> None:
    schema = {"type": "record", "name": "Seq", "fields": [{"name": "seq", "type": "long"}]}
    assert Codec(schema).decode(Codec(schema).encode({"seq": 2**63 - 1})) == {"seq": 2**63 - 1}
    with pytest.raises(EncodeError, match="Seq"):
        Codec(schema).encode({"seq": 2**63})


class _FakeRegistry:
    def __init__(self) -> None:
        self.by_id: dict[int, dict[str, Any]] = {}

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        schema_id = 100 + len(self.by_id)
        self.by_id[schema_id] = schema
        return schema_id

    def lookup(self, schema_id: int) -> dict[str, Any]:
        return self.by_id[schema_id]


def test_confluent_framing_with_a_registry() -> None:
    registry = _FakeRegistry()
    writer = Codec(INTERACTION, ConfluentFraming(registry, "interactions-value"))
    data = writer.encode(INTERACTION_RECORD)
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == 100
    # A fresh reader knows nothing locally and resolves the id through the registry.
    reader = Codec(INTERACTION, ConfluentFraming(registry, "interactions-value"))
    assert reader.decode(data) == INTERACTION_RECORD
    with pytest.raises(UnknownSchemaError):
        reader.decode(b"\x00\x00\x00\x00\x07" + data[5:])


def test_single_object_framing_reports_marker_errors() -> None:
    framing = SingleObjectFraming()
    with pytest.raises(DecodeError, match="C3 01"):
        framing.split(b"\x00" * 12)


# Apache Avro's own test vectors (share/test/data/schema-tests.txt): input, Parsing Canonical
# Form, CRC-64-AVRO fingerprint as the signed 64-bit integer the Java implementation prints.
AVRO_SPEC_VECTORS = [
    ('"null"', '"null"', 7195948357588979594),
    (
        '{"type":"fixed","name":"foo","size":15}',
        '{"name":"foo","type":"fixed","size":15}',
        1756455273707447556,
    ),
    (
        '{"type":"record","name":"foo","fields":[{"name":"f1","type":"boolean"}]}',
        '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}',
        7843277075252814651,
    ),
    (
        '{"type":"record","name":"PigValue","fields":'
        '[{"name":"value","type":["null","int","long","PigValue"]}]}',
        '{"name":"PigValue","type":"record","fields":'
        '[{"name":"value","type":["null","int","long","PigValue"]}]}',
        -1759257747318642341,
    ),
]


@pytest.mark.parametrize(("schema", "canonical", "signed"), AVRO_SPEC_VECTORS)
def test_canonical_form_and_fingerprint_match_the_avro_test_vectors(
    schema: str, canonical: str, signed: int
) -> None:
    assert canonical_form(json.loads(schema)) == canonical
    # On the wire: the 64-bit fingerprint, little-endian (Avro spec, single-object encoding).
    assert fingerprint64(json.loads(schema)) == (signed % 2**64).to_bytes(8, "little")


def test_an_invalid_schema_is_a_schema_error() -> None:
    nameless = {"type": "record", "fields": [{"name": "f1", "type": "boolean"}]}
    with pytest.raises(SchemaError):
        canonical_form(nameless)
    with pytest.raises(SchemaError):
        fingerprint64(nameless)


def test_table_rows_written_before_the_ranker_counts_still_decode() -> None:
    row = {
        "embedding": b"\x00" * 8,
        "last_time": 5.0,
        "history": ["a", "b"],
        "applied_seq": 3,
        "sent_seq": 3,
        "waiting": [],
        "partners": [],
        "derived": None,
        "model_version": "v1",
    }
    data = Codec(load_schema("entity_record.v1")).encode(row)
    decoded = Codec(ENTITY_RECORD).decode(data)
    assert decoded == {
        **row,
        "history_counts": [],
        "count": 0,
        "trend": 0.0,
        "history_times": [],
        "habits": [],
    }


def test_table_rows_written_before_the_ranker_user_state_still_decode() -> None:
    row = {
        "embedding": b"\x00" * 8,
        "last_time": 5.0,
        "history": ["a", "b"],
        "history_counts": [2, 1],
        "count": 3,
        "trend": 0.0,
        "applied_seq": 3,
        "sent_seq": 3,
        "waiting": [],
        "partners": [],
        "derived": None,
        "model_version": "v1",
    }
    data = Codec(load_schema("entity_record.v2")).encode(row)
    assert Codec(ENTITY_RECORD).decode(data) == {**row, "history_times": [], "habits": []}
