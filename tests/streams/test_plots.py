"""streams.plots: the training curves' figure (moved out of the pure layer with matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

from streams.plots import save_curves


def test_curves_are_written_as_json_and_png(tmp_path: Path) -> None:
    curves = {"loss": [3.0, 2.0], "valid_mrr": [0.5, 0.6], "epoch_seconds": [1.0, 1.1]}
    json_path, png_path = save_curves(curves, tmp_path / "ck")
    assert json.loads(json_path.read_text()) == curves
    assert png_path.is_file() and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
