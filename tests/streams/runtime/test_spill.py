"""The spill map: bounded memory, every value read back as written, scratch stores cleaned."""

from __future__ import annotations

import random
from pathlib import Path

from streams.runtime.spill import SpillMap


def test_values_read_back_as_written_with_most_on_disk(tmp_path: Path) -> None:
    rng = random.Random(1)
    m: SpillMap[tuple[int, float, int]] = SpillMap(tmp_path, "<qdq", capacity=50)
    want: dict[str, tuple[int, float, int]] = {}
    for n in range(5_000):
        key = f"u{rng.randrange(2_000)}"
        value = (n, n / 3, rng.randrange(-(2**63), 2**63))
        m[key] = value
        want[key] = value
        if n % 3 == 0:
            probe = f"u{rng.randrange(2_000)}"
            assert m.get(probe) == want.get(probe)
    assert len(m._hot) == 50 and m.spilled > 0
    assert all(m[k] == v for k, v in want.items())
    assert m.get("never") is None and "never" not in m
    m.close()


def test_a_store_left_by_a_dead_process_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / "999999999-deadbeef"  # no such pid
    stale.mkdir()
    m: SpillMap[tuple[int]] = SpillMap(tmp_path, "<q", capacity=1)
    assert not stale.exists() and m.path.exists()
    m.close()
    assert not m.path.exists()
