"""A worker's metrics after a real run: /metrics in the Prometheus text format agrees with the
topics it wrote, /metrics.json is strict JSON, and `jodie metrics` reads it (or says no
worker answers)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.settings import Settings
from streams.tail import summarise, tail
from tests.streams.harness import STREAM, make_checkpoint, route, start_worker, stop, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        body: bytes = reply.read()
        return body


def _strict_json(text: str | bytes) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def _prometheus(port: int) -> tuple[set[str], Samples]:
    families = list(
        text_string_to_metric_families(_get(f"http://127.0.0.1:{port}/metrics").decode())
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    return {f.name for f in families}, samples


def _jodie(*args: str, port: int, prefix: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JODIE_WEB_PORT": str(port), "JODIE_TOPIC_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "streams", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_jodie_metrics_without_a_worker_says_so_in_one_line() -> None:
    port = _free_port()  # nothing listens there
    done = _jodie("metrics", "--workers", "2", port=port)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"ports {port}-{port + 1}" in lines[0] and "jodie worker" in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.kafka
def test_a_worker_serves_its_figures_to_prometheus_and_as_json(
    kafka: Settings, tmp_path: Path
) -> None:
    checkpoint = make_checkpoint(tmp_path / "v1", version="metrics-v1")
    port = _free_port()
    worker = start_worker(kafka, checkpoint, 0, tmp_path, env={"JODIE_WEB_PORT": str(port)})
    try:
        route(kafka)
        recs = wait_for(kafka, STREAM, timeout_s=240)
        assert len(recs) == STREAM, (tmp_path / "worker-0.log").read_text()[-3000:]
        # Settled: every event applied and every sampled one ranked.
        page: dict[str, Any] = {}
        for _ in range(120):
            page = _strict_json(_get(f"http://127.0.0.1:{port}/metrics.json"))
            if page["user_events"] == STREAM and page["evaluation"]["pending"] == 0:
                break
            time.sleep(1.0)
        names, got = _prometheus(port)
        cli = _jodie("metrics", port=port, prefix=kafka.topic_prefix)
    finally:
        stop(worker)
    evaluations = list(tail(kafka, "evaluations", idle_timeout_s=2.0))

    assert page["user_events"] == STREAM and page["evaluation"]["pending"] == 0, page
    for family in (
        "jodie_events_applied",
        "jodie_input_lag_records",
        "jodie_live_mrr",
        "jodie_live_recall_at_10",
        "jodie_served_mrr",
        "jodie_served_recall",
        "jodie_quarantined_events",
        "jodie_model_info",
        "jodie_batch_seconds",
        "jodie_batch_phase_seconds",
        "jodie_input_age_seconds",
        "jodie_pre_state_age_seconds",
        "jodie_gc_seconds",
        "jodie_gc_collections",
        "jodie_python_blocks",
        "jodie_malloc_in_use_bytes",
        "jodie_malloc_free_bytes",
        "jodie_rocksdb_memory_bytes",
        "process_resident_memory_bytes",
    ):
        assert family in names, family
    # The worker process runs the cycle collector on its own schedule, start-up frozen out.
    assert page["gc"]["frozen"] > 0 and len(page["gc"]["seconds"]) == 3, page["gc"]
    assert page["heap"]["python_blocks"] > 0 and page["heap"]["malloc_in_use_bytes"] > 0, page
    # RocksDB's memory by table: the rows written went through the memtables.
    stores = page["heap"]["rocksdb"]
    assert set(stores) == {"user-state", "item-state"}, stores
    assert all(kinds["memtables"] > 0 for kinds in stores.values()), stores
    assert got[("jodie_events_applied_total", (("side", "user"),))] == STREAM
    assert got[("jodie_events_applied_total", (("side", "item"),))] == STREAM
    assert got[("jodie_model_info", (("epoch", "unstamped"), ("version", "metrics-v1")))] == 1
    assert got[("process_resident_memory_bytes", ())] > 0
    # Every inbox record consumed was applied by a committed batch and timed once.
    assert got[("jodie_transactions_aborted_total", ())] == 0
    records = got[("jodie_input_records_total", ())]
    assert records == page["messages"] > 0
    assert got[("jodie_input_age_seconds_count", ())] == records
    assert 1 <= got[("jodie_batch_seconds_count", ())] <= got[("jodie_transactions_total", ())]
    # Each committed batch's time, split by phase, adds up to no more than the batches' own.
    phases = {
        phase: got[("jodie_batch_phase_seconds_total", (("phase", phase),))]
        for phase in ("app", "send", "commit", "wait")
    }
    waited = phases.pop("wait")
    assert all(seconds > 0 for seconds in phases.values()), phases
    assert sum(phases.values()) <= got[("jodie_batch_seconds_sum", ())] + 1e-6, phases
    # Of the commits' time, what the loop waited for (the rest overlapped the next batch).
    assert 0 <= waited <= phases["commit"] + 1e-6, (waited, phases)
    assert set(page["batch_phase_s"]) == {*phases, "wait"}, page["batch_phase_s"]
    # One worker owns every user and item: each pre-state is handed over in memory, none
    # crosses Kafka.
    assert got[("jodie_pre_state_age_seconds_count", ())] == 0
    assert page["pre_states"] == {
        "taken": 0,
        "age_ms_p50": None,
        "age_ms_p99": None,
        "age_ms_max": None,
    }

    # The live figures are those of the evaluations the worker wrote, one per ranked event.
    ranks = np.array([e["rank"] for e in evaluations], dtype=np.float64)
    assert len(ranks) == got[("jodie_live_ranked_events_total", ())] > 0
    assert got[("jodie_live_mrr", (("span", "all"),))] == pytest.approx((1 / ranks).mean())
    assert got[("jodie_live_recall_at_10", (("span", "all"),))] == pytest.approx(
        (ranks <= 10).mean()
    )
    # The served lists as a reader of the recommendations measures them.
    served = summarise(recs, [])["served"]
    assert got[("jodie_served_events_total", ())] == served["events"] > 0
    assert got[("jodie_served_mrr", (("ranker", "model"),))] == pytest.approx(served["mrr"])
    assert got[("jodie_served_recall", (("ranker", "model"),))] == pytest.approx(served["recall"])
    assert page["online"]["mrr"] == pytest.approx(got[("jodie_live_mrr", (("span", "all"),))])

    # `jodie metrics`: the same figures, strict JSON on one line.
    assert cli.returncode == 0, cli.stderr
    assert len(cli.stdout.strip().splitlines()) == 1, cli.stdout
    summary = _strict_json(cli.stdout)
    assert summary["workers"] == 1 and summary["events"] == STREAM
    assert summary["mrr"] == pytest.approx((1 / ranks).mean())
    assert summary["model_versions"] == ["metrics-v1"]
