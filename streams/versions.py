"""Which model versions a worker serves: it follows promotions on ``models``, prepares each
epoch's states in the background (streams.switch) and hands them to the processor."""

from __future__ import annotations

import json
import logging
import time

from operators.retrieval.cooccurrence import CooccurrenceCandidates
from streams.app.epochs import UNSTAMPED, Epoch, label
from streams.app.processor import Processor, WorkerStats
from streams.app.serving import Serving
from streams.exceptions import ModelMismatchError
from streams.feeds import Feeds
from streams.models import Registry
from streams.settings import Settings
from streams.switch import Preparation, ServingWatch

_log = logging.getLogger("jodie.worker")


class Versions:
    """The epochs of one worker: those served (in the processor) and those being prepared."""

    def __init__(
        self,
        settings: Settings,
        worker_id: int,
        model: str | None,
        processor: Processor,
        cooccurrence: CooccurrenceCandidates | None,
        stats: WorkerStats,
    ) -> None:
        """``model``: the registry model whose promoted versions are served (None: only the
        processor's checkpoint, on the unstamped stream)."""
        self.settings = settings
        self.worker_id = worker_id
        self.model = model
        self.processor = processor
        self.cooccurrence = cooccurrence
        self.stats = stats
        self.preparations: list[Preparation] = []
        self.feeds: Feeds | None = None
        self._watch: ServingWatch | None = None

    def start(self, feeds: Feeds) -> None:
        self.feeds = feeds
        if self.model is not None:
            self._watch = ServingWatch(self.settings, self.model)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        for prep in self.preparations:
            prep.stop.set()

    def serves(self, epoch: Epoch) -> bool:
        """Whether to handle a message of ``epoch``, preparing the epoch first if needed."""
        if epoch in self.processor.servings:
            return True
        if self.model is None:
            raise ModelMismatchError(
                f"an event is stamped for model {label(epoch)}, but this worker serves the "
                "checkpoint it was given: run the workers with --model when the router has one"
            )
        if epoch == UNSTAMPED:
            # Routed before any version was promoted (or by a router without --model): no
            # version is meant to serve it.
            if self.stats.unstamped % 10_000 == 0:
                _log.warning(
                    "worker %d: skipping events routed without a model version (%d so far); "
                    "promote a version and run the router with --model %s",
                    self.worker_id,
                    self.stats.unstamped + 1,
                    self.model,
                )
            self.stats.unstamped += 1
            return False
        self._prepare(epoch)
        return True

    def follow(self) -> None:
        """On a promotion, start catching the new version up while the current one serves."""
        if self._watch is None:
            return
        record = self._watch.poll()
        if record is None:
            return
        version = record["version"]
        for prep in [
            p
            for p in self.preparations
            if p.target is None and p.version != version and not p.done.is_set()
        ]:
            # Promoted over before its epoch started: it may never start; a stamped event
            # of it would prepare it again (with its start known).
            prep.stop.set()
            self.preparations.remove(prep)
        if any(p.version == version and p.target is None for p in self.preparations):
            return
        current = self.processor.serving
        if current is not None and current.version == version:
            return
        _log.info("worker %d: %s promoted; catching it up", self.worker_id, version)
        self.preparations.append(Preparation(self.settings, record).start())

    def _prepare(self, epoch: Epoch) -> None:
        """Serve ``epoch`` from its states at its start: a catch-up already under way (the
        promotion was seen in time: usually done by now) or one started here and waited for."""
        version, since = epoch
        began = time.time()
        prep = next(
            (
                p
                for p in self.preparations
                if p.version == version
                and (p.target == since or (p.target is None and p.since in (None, since)))
            ),
            None,
        )
        if prep is not None and prep.target is None:
            prep.done.wait()
            if prep.error is not None or prep.since != since:
                self.preparations.remove(prep)
                prep = None
        if prep is None:
            assert self.model is not None
            announcement = Registry(self.settings, self.model).show(version)
            prep = Preparation(self.settings, announcement, target=since).start()
            self.preparations.append(prep)
        ckpt = prep.wait()
        self.preparations.remove(prep)
        serving = Serving.of(
            self.settings, ckpt, version, self.cooccurrence, epoch, self.settings.evaluate_apart
        )
        if self.feeds is not None:
            self.feeds.adopt(serving)
        self.processor.add(serving)
        info = {
            "version": version,
            "since": since,
            "replayed": prep.replayed,
            "catch_up_s": round((prep.finished or began) - prep.began, 3),
            "waited_s": round(time.time() - began, 3),
            "serving_from": time.time(),
        }
        self.stats.epochs.append(info)
        _log.info("worker %d: serving %s %s", self.worker_id, label(epoch), json.dumps(info))
