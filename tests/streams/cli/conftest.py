"""What the CLI tests share: `jodie` run in this process, and a small pipeline run as the demo
runs it (a promoted model, the router and a worker serving it, a few rejected events)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner, Result

from operators.dataset import bundled_wikipedia, load_interactions
from operators.model.config import TrainConfig
from operators.training.trainer import Split
from streams.cli import app
from streams.models import Registry
from streams.produce import produce_messages, produce_rows
from streams.router import Router
from streams.settings import Settings, get_settings
from streams.topics import scratch_topics
from tests.streams.harness import make_checkpoint, route, start_worker, stop, wait_for

Jodie = Callable[..., Result]

#: Events the pipeline streams, from the first one after the training split: the events the
#: demo streams first.
STREAMED = 120
#: Of those, the first ones sent again (rejected as duplicates), and one message that is not
#: an event at all (rejected as malformed).
RESENT = 4


def invoke(args: list[str], env: Mapping[str, str | None] | None = None) -> Result:
    """`jodie ARGS` in this process, ``env`` on top of the environment (None: unset); the
    settings are read afresh, as a new process would."""
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, args, env=dict(env or {}))
    finally:
        get_settings.cache_clear()


@pytest.fixture
def jodie() -> Jodie:
    return invoke


def demo_start() -> int:
    """The first event the demo streams: the one after the training split of the bundled file."""
    tc = TrainConfig()
    n = len(load_interactions(bundled_wikipedia()))
    return Split.of(n, tc.train_fraction, tc.valid_fraction).bounds("train")[1]


@dataclass(frozen=True)
class Pipeline:
    settings: Settings
    #: The JODIE_* variables the pipeline ran with, beyond the broker's.
    env: dict[str, str]


@pytest.fixture(scope="package")
def pipeline(broker: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("pipeline")
    with scratch_topics("cli") as scratch:
        env = {
            "JODIE_TOPIC_PREFIX": scratch.topic_prefix,
            "JODIE_MODEL_STORE": str(tmp / "store"),
            "JODIE_STATE_DIR": str(tmp / "state"),
        }
        settings = scratch.model_copy(
            update={"model_store": tmp / "store", "state_dir": tmp / "state"}
        )
        registry = Registry(settings)
        registry.promote(registry.announce(make_checkpoint(tmp / "model", history=300))["version"])
        start = demo_start()
        route(settings, start, STREAMED, model="jodie")
        produce_rows(settings, start=start, limit=RESENT)
        produce_messages(settings, [(b"1087", b"not an Avro message")])
        stats = Router(settings, grace_s=0.2, model="jodie").run(until_idle_s=1.0, max_seconds=120)
        assert stats.rejected_by_reason == {"duplicate": RESENT, "malformed": 1}
        # Its own web port: other tests' workers may be running on this machine.
        web = {"JODIE_WEB_PORT": str(settings.broker_port + 57)}
        proc = start_worker(settings, None, 0, tmp, model="jodie", env={**env, **web})
        try:
            recs = wait_for(settings, STREAMED, timeout_s=300)
            # Ranks come from the worker's ranking process, a transaction after their
            # recommendations (streams.app.evaluation): wait for them too.
            wait_for(settings, 1, timeout_s=60, topic="evaluations")
        finally:
            stop(proc)
        assert len(recs) == STREAMED, (tmp / "worker-0.log").read_text()[-3000:]
        yield Pipeline(settings, env)
