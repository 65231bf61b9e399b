"""The dashboard in a real headless browser, on a running pipeline on the real broker.

Two versions are announced, v1 serving; the router and a worker run as processes (``--model``),
`jodie dashboard` as a process too. Wikipedia events stream in at a steady rate with a few
malformed messages, and v2 is promoted half-way. Debian's chromium, driven by selenium
through the system's chromedriver (nothing is downloaded), opens the page: it loads, its
figures and charts change while the events stream, the switch to v2 and the dead letters
show, and searching a user shows that user's latest recommendations as the topic holds them.
A screenshot of the whole page is written to ``artifacts/dashboard.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from operators.dataset import bundled_wikipedia, load_interactions
from schemas import INTERACTION
from streams.codecs import make_codec
from streams.models import Registry
from streams.produce import produce_file, produce_messages
from streams.runtime.clients import idempotent_producer
from streams.settings import Settings
from streams.tail import tail
from tests.streams.harness import HISTORY, make_checkpoint, start_worker, stop, wait_for

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[3]
SCREENSHOT = ROOT / "artifacts" / "dashboard.png"
EVENTS = 900
RATE = 30.0  # events/s: the stream lasts half a minute
MALFORMED = 3
T = TypeVar("T")


def until(what: str, check: Callable[[], T | None], timeout_s: float, every_s: float = 0.5) -> T:
    """``check()``'s first truthy answer, asked every ``every_s`` for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless chromium through the system's chromedriver: with the driver's path given,
    selenium never runs selenium-manager, so nothing is fetched."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Debian's chromium and chromium-driver (.ci/run does)"
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1440,1000")
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def settled(read: Callable[[], T]) -> T:
    """``read()`` once the page holds still under it: the page redraws every second, and an
    element found just before a redraw is gone when it is read (StaleElementReferenceException,
    seen in CI); a fresh find after the redraw reads the new one."""
    for _ in range(9):
        try:
            return read()
        except StaleElementReferenceException:
            time.sleep(0.1)
    return read()


def _text(browser: webdriver.Chrome, element_id: str) -> str:
    def read() -> str:
        found = browser.find_elements(By.ID, element_id)
        return str(found[0].text) if found else ""

    return settled(read)


def _count(browser: webdriver.Chrome, element_id: str) -> int | None:
    """A figure the page shows (``1,234``), None while it shows none."""
    text = _text(browser, element_id).replace(",", "")
    return int(text) if text.isdigit() else None


def _updates(browser: webdriver.Chrome) -> int:
    """How many times the page has drawn what the server answered."""
    return settled(
        lambda: int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0)
    )


def _path(browser: webdriver.Chrome, chart: str) -> str:
    """The first line of a chart, as SVG path data."""

    def read() -> str:
        paths = browser.find_elements(By.CSS_SELECTOR, f"#{chart} path.series")
        return str(paths[0].get_attribute("d")) if paths else ""

    return settled(read)


def _logs(tmp: Path) -> str:
    return "\n".join(
        f"--- {name}\n{(tmp / name).read_text()[-2500:]}"
        for name in ("router.log", "worker-0.log", "dashboard.log")
        if (tmp / name).exists()
    )


def _ready(tmp: Path, procs: list[subprocess.Popen[bytes]]) -> str | None:
    """The dashboard's address once it serves, the router is ready and the worker owns
    partitions."""
    assert all(p.poll() is None for p in procs), _logs(tmp)
    found = re.search(
        r"dashboard on (http://127\.0\.0\.1:\d+/)", (tmp / "dashboard.log").read_text()
    )
    routed = "router ready" in (tmp / "router.log").read_text()
    lines = (tmp / "worker-0.log").read_text().splitlines()
    assigned = [x for x in lines if "assigned [" in x]
    owns = bool(assigned) and "assigned []" not in assigned[-1]
    return found.group(1) if found and routed and owns else None


def test_the_page_follows_a_running_pipeline(
    kafka: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, browser: webdriver.Chrome
) -> None:
    monkeypatch.setenv("JODIE_MODEL_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("JODIE_SWITCH_DELAY_S", "0")
    monkeypatch.setenv("JODIE_EVALUATE_EVERY", "2")
    settings = Settings()
    registry = Registry(settings)
    registry.announce(make_checkpoint(tmp_path / "v1", version="v1"))
    registry.promote("v1")
    registry.announce(make_checkpoint(tmp_path / "v2", version="v2", seed=1))

    router = subprocess.Popen(
        [sys.executable, "-m", "streams", "router", "--model", "jodie", "--grace", "0.2"],
        stdout=(tmp_path / "router.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    procs = [router, start_worker(settings, None, 0, tmp_path, model="jodie")]
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "streams", "dashboard", "--port", "0", "--workers", "1"],
        env={**os.environ, "JODIE_WEB_PORT": "16066"},  # worker 0's, as the harness sets it
        stdout=(tmp_path / "dashboard.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    procs.append(dashboard)
    started = time.monotonic()
    try:
        url = until(
            "the router, the worker and the dashboard", lambda: _ready(tmp_path, procs), 180
        )
        browser.get(url)
        until("the page's first update", lambda: _updates(browser), 60)
        assert browser.title == "jodie-stream · live"

        topic = settings.topic("interactions")
        feeder = threading.Thread(
            target=produce_file,
            args=(bundled_wikipedia(), idempotent_producer(settings)),
            kwargs={
                "codec": make_codec(settings, INTERACTION, topic),
                "topic": topic,
                "start": HISTORY,
                "limit": EVENTS,
                "rate": RATE,
            },
            daemon=True,
        )
        feeder.start()
        produce_messages(settings, [(b"mallory", b"not an Avro event")] * MALFORMED)

        # The figures and the charts change while the events stream.
        first = until("events on the page", lambda: _count(browser, "kpi-log"), 90)
        first_path = _path(browser, "chart-throughput")
        assert first < EVENTS, "the page showed nothing before the stream was over"
        until("the count to move", lambda: (_count(browser, "kpi-log") or 0) > first, 60)
        until("a redrawn chart", lambda: _path(browser, "chart-throughput") != first_path, 30)

        # Half-way, v2 is promoted: the router starts its epoch, the worker switches.
        until(
            "half the recommendations",
            lambda: (_count(browser, "kpi-recs") or 0) >= EVENTS // 2,
            240,
        )
        registry.promote("v2")
        feeder.join(timeout=120)
        recs = wait_for(settings, EVENTS, timeout_s=300)
        assert len(recs) == EVENTS, _logs(tmp_path)
        assert {r["model_version"] for r in recs} == {"v1", "v2"}, "no switch under the stream"

        until("every recommendation on the page", lambda: _count(browser, "kpi-recs") == EVENTS, 60)
        assert _text(browser, "kpi-model") == "v2"
        assert "v2 serves from event seq" in _text(browser, "switches")
        assert _text(browser, "kpi-dlq") == str(MALFORMED)
        assert "malformed" in _text(browser, "dlq-bars")
        assert _path(browser, "chart-mrr") and _path(browser, "chart-lag")

        # A user search shows that user's latest list, as the topic holds it.
        # The most active user who moves between items: a trajectory with turns.
        log = load_interactions(bundled_wikipedia()).slice(HISTORY, HISTORY + EVENTS)
        events = Counter(log.user_ids.tolist())
        items: dict[str, set[str]] = {}
        for u, i in zip(log.user_ids.tolist(), log.item_ids.tolist(), strict=True):
            items.setdefault(u, set()).add(i)
        user = max((u for u in events if len(items[u]) >= 3), key=lambda u: events[u])
        latest = list(tail(settings, "recommendations", user=user))[-1]
        want = [c["item_id"] for c in latest["candidates"]]
        search = browser.find_element(By.ID, "user-search")
        search.clear()
        search.send_keys(user, Keys.ENTER)
        until("the user's view", lambda: _text(browser, "user-id") == user, 30)
        shown = settled(
            lambda: [
                td.text for td in browser.find_elements(By.CSS_SELECTOR, "#user-recs tbody td.item")
            ]
        )
        assert shown == want
        assert len(browser.find_elements(By.CSS_SELECTOR, "#user-trajectory circle")) >= 3

        # The whole page in one shot: a window as tall as the page plus the browser's frame.
        browser.execute_script("window.scrollTo(0, 0)")
        height = browser.execute_script(
            "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"
        )
        browser.set_window_size(1440, int(height))
        drawn = _updates(browser)
        until("a redraw at the new size", lambda: _updates(browser) > drawn + 1, 30)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = sum(int(x) for x in Path(f"/proc/{dashboard.pid}/stat").read_text().split()[13:15])
        print(
            f"\nscreenshot: {SCREENSHOT}; the dashboard used {cpu / ticks:.1f} s of CPU "
            f"in {time.monotonic() - started:.0f} s"
        )
    finally:
        for proc in procs:
            stop(proc)
    assert dashboard.returncode == 0, _logs(tmp_path)
