"""The dashboard process: the board, the Kafka reader and poller that fill it, the server."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from streams.dashboard.board import Board, BoardConfig
from streams.dashboard.reader import Poller, Reader
from streams.dashboard.server import Server
from streams.settings import Settings


@dataclass
class Dashboard:
    """A running dashboard; ``url`` is its page. ``close`` stops every part."""

    board: Board
    reader: Reader
    poller: Poller
    server: Server

    @classmethod
    def start(
        cls,
        settings: Settings,
        port: int = 8066,
        workers: int = 0,
        backfill: int = 100_000,
        max_users: int = 2000,
        host: str = "127.0.0.1",
    ) -> Dashboard:
        """Read the pipeline of ``settings`` (the last ``backfill`` messages of each topic
        first), poll its groups' lag and its first ``workers`` workers' metrics, serve the
        page on ``host:port``. DashboardError when a topic is missing or the port taken."""
        lock = threading.Lock()
        board = Board(BoardConfig(max_users=max_users, evaluate_every=settings.evaluate_every))
        board.meta = {"bootstrap": settings.bootstrap_servers, "prefix": settings.topic_prefix}
        server = Server(board, lock, port, host)  # first: a taken port fails before Kafka
        try:
            reader = Reader(settings, board, lock, backfill)
        except BaseException:
            server.close()
            raise
        poller = Poller(settings, board, lock, workers)
        reader.start()
        poller.start()
        server.start()
        return cls(board, reader, poller, server)

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}/"

    def close(self) -> None:
        self.server.close()
        self.poller.close()
        self.reader.close()
