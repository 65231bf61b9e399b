"""The JODIE CSV reader: valid files with and without features, bad rows with line numbers."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from operators.dataset import (
    bundled_wikipedia,
    file_fingerprint,
    iter_rows,
    load_interactions,
)
from operators.exceptions import BadRowError, DataError

HEADER = "user_id,item_id,timestamp,state_label,comma_separated_list_of_features\n"


def _write(tmp_path: Path, body: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def test_rows_with_features(tmp_path: Path) -> None:
    path = _write(tmp_path, "u1,i1,0.0,0,0.5,1.5\nu2,i1,3.0,1,-1,2\n")
    log = load_interactions(path)
    assert list(log.user_ids) == ["u1", "u2"]
    assert log.n_features == 2
    np.testing.assert_array_equal(log.features, np.array([[0.5, 1.5], [-1, 2]], dtype=np.float32))
    np.testing.assert_array_equal(log.state_labels, [0, 1])
    np.testing.assert_array_equal(log.lines, [2, 3])


def test_rows_without_features(tmp_path: Path) -> None:
    log = load_interactions(_write(tmp_path, "1,2,5,0\n1,3,6,0\n"))
    assert log.features.shape == (2, 0)
    np.testing.assert_array_equal(log.timestamps, [5.0, 6.0])


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("u1,i1,0.0\n", "expected at least 4 fields"),
        ("u1,i1,soon,0\n", "timestamp 'soon' is not a number"),
        ("u1,i1,1.0,0,nan,1\n", "NaN or infinite"),
        ("u1,i1,1.0,0,1\n", "expected 2 features, got 1"),
        (",i1,1.0,0,1,1\n", "missing user_id"),
        ("u1,,1.0,0,1,1\n", "missing item_id"),
        ("u1,i1,1.0,7,1,1\n", "state_label 7 is not 0 or 1"),
    ],
)
def test_bad_row_is_reported_with_its_line(tmp_path: Path, line: str, reason: str) -> None:
    path = _write(tmp_path, "u0,i0,0.0,0,1,1\n" + line + "u2,i2,2.0,0,1,1\n")
    errors: list[BadRowError] = []
    rows = list(iter_rows(path, errors=errors))
    assert [r.line for r in rows] == [2, 4]  # the rows around it survive
    assert len(errors) == 1
    assert errors[0].line == 3
    assert reason in str(errors[0])
    with pytest.raises(BadRowError, match="line 3"):
        list(iter_rows(path, strict=True))


def test_gzip_and_plain_are_the_same_file(tmp_path: Path) -> None:
    body = "1,2,5,0\n1,3,6,0\n"
    plain = _write(tmp_path, body)
    packed = tmp_path / "data.csv.gz"
    packed.write_bytes(gzip.compress((HEADER + body).encode()))
    assert file_fingerprint(plain) == file_fingerprint(packed)
    assert load_interactions(packed).lines.tolist() == load_interactions(plain).lines.tolist()


def test_unsorted_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not sorted"):
        load_interactions(_write(tmp_path, "1,2,5,0\n1,3,4,0\n"))


def test_missing_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("1,2,5,0\n")
    with pytest.raises(DataError, match="header"):
        list(iter_rows(path))


def test_bundled_wikipedia_matches_its_reference_counts() -> None:
    log = load_interactions(bundled_wikipedia())
    assert len(log) == 157_474
    assert len(set(log.user_ids.tolist())) == 8_227
    assert len(set(log.item_ids.tolist())) == 1_000
    assert int(log.state_labels.sum()) == 217
    assert log.n_features == 0
