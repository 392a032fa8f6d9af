"""The web client end to end: a real server (tiny model) and Debian's headless Chromium driven by Playwright.

Everything is checked from inside the page through `window.rtStats` (see rt_server/web/app.js): audio arrived
and played out with zero underruns, Stop silences playback at once and the server answers `cleared`, and the
server's errors reach the page. Screenshots go to pytest's tmp_path, and also to $RT_EVIDENCE_DIR when set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_harness import RunningServer, make_settings, start_server

CHROMIUM = Path("/usr/bin/chromium")

try:
    from playwright.sync_api import BrowserContext, ConsoleMessage, Error, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("playwright is not installed (pip install -r requirements-test.txt)", allow_module_level=True)
if not CHROMIUM.exists():  # pragma: no cover - depends on the environment
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(60)]

# As the machine notes prescribe: no sandbox (root), no GPU, no network chatter of Chromium's own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
WAIT_MS = 20_000
LEAD_MS = 500  # the page's default lead_ms
PREROLL_MS = 60  # rt_server/web/app.js PREROLL_MS


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    # One segment per turn (no early cut, no idle cut): the whole turn's audio reaches the server's outbox at
    # once, so "zero underruns" measures the client (pacing, ring, worklet), not how fast a shared two-core
    # machine synthesises a second segment (the tiny model is anywhere from 0.2x to 1.5x real time there).
    running = start_server(make_settings(first_segment_min_phonemes=500, idle_cut_ms=10_000))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh, empty profile
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            # Playwright mutes headless Chromium by default; keep the output path as a listener's would be.
            ignore_default_args=["--mute-audio"],
            viewport={"width": 1280, "height": 860},
        )
        yield context
        context.close()


@pytest.fixture
def page(browser_context: BrowserContext, server: RunningServer) -> Iterator[Page]:
    """A fresh tab on the client, models and voices loaded; fails the test on any script error."""
    tab = browser_context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console: {message.text}")

    tab.on("console", on_console)
    tab.goto(server.http + "/")
    tab.wait_for_function("() => window.rtStats && window.rtStats.status === 'ready to speak'", timeout=WAIT_MS)
    yield tab
    tab.close()
    assert not problems, problems


def stats(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate("() => JSON.parse(JSON.stringify(window.rtStats))")
    return result


def screenshot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    evidence = os.environ.get("RT_EVIDENCE_DIR")
    if evidence:
        Path(evidence).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(evidence) / name)


def speak_sample(page: Page, sample: str, *, interval_ms: int = 40) -> None:
    page.get_by_role("button", name=sample).click()
    page.fill("#interval-ms", str(interval_ms))
    page.click("#speak")


def test_streams_word_by_word_and_plays_without_underruns(page: Page) -> None:
    page.evaluate(
        """() => {  // the largest buffered level seen, sampled as the page renders
            window.maxBufferedMs = 0;
            setInterval(() => {
                window.maxBufferedMs = Math.max(window.maxBufferedMs, window.rtStats.bufferedMs);
            }, 10);
        }"""
    )
    speak_sample(page, "Quick fox")  # nine words, one sentence: one segment on this server
    page.wait_for_function("() => window.rtStats.turnDone", timeout=WAIT_MS)
    s = stats(page)
    assert s["lastError"] is None, s["lastError"]
    assert s["sampleRate"] == 24_000
    assert s["framesReceived"] > 5 and s["receivedS"] > 0.2, s
    assert s["playedS"] == pytest.approx(s["receivedS"], abs=1e-9), "everything received was played"
    assert s["underruns"] == 0, s
    assert s["overflowSamples"] == 0, s
    assert s["ttfaMs"] is not None and s["ttfaMs"] > 0
    assert s["segments"] == 1
    assert s["highlighted"] > 0, "alignment: phonemes were highlighted while playing"
    assert "speak-1" in s["flushed"]
    # pace: realtime keeps the browser's lead bounded (lead_ms, plus the preroll and a frame of slack)
    assert page.evaluate("() => window.maxBufferedMs") <= LEAD_MS + PREROLL_MS + 40

    page.click("#flush")
    page.wait_for_function("() => window.rtStats.flushed.includes('flush-1')", timeout=WAIT_MS)
    expect(page.locator("#f-event")).to_have_text("flushed flush-1")


def test_stop_silences_playback_and_the_server_answers_cleared(page: Page, tmp_path: Path) -> None:
    speak_sample(page, "Rights (long)")
    page.wait_for_function(
        "() => window.rtStats.playback === 'playing' && window.rtStats.playedS > 0.6", timeout=WAIT_MS
    )
    screenshot(page, tmp_path, "web_client.png")  # mid-sentence: meter, figures, highlighted phoneme
    page.click("#stop")
    # The player drops its ring at once, before the server has even answered.
    page.wait_for_function("() => window.rtStats.playback === 'idle' && window.rtStats.bufferedMs === 0", timeout=1000)
    page.wait_for_function("() => window.rtStats.cleared === 1", timeout=WAIT_MS)
    expect(page.locator("#f-event")).to_have_text("cleared")
    before = stats(page)
    page.wait_for_timeout(600)
    after = stats(page)
    assert after["playedS"] == before["playedS"], "nothing played after Stop"
    assert after["receivedS"] == before["receivedS"], "no audio from before the clear was played"
    assert after["peak"] == 0 and after["playback"] == "idle" and after["bufferedMs"] == 0
    assert not after["turnDone"] and after["lastError"] is None
    assert after["underruns"] == before["underruns"], "silence after Stop is not an underrun"


def test_server_errors_show_on_the_page(page: Page, tmp_path: Path) -> None:
    page.fill("#text", "9")
    page.click("#speak")
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=WAIT_MS)
    shown = error.text_content() or ""
    assert "unknown_symbols" in shown and "[9]" in shown, shown
    assert stats(page)["lastError"]["code"] == "unknown_symbols"
    screenshot(page, tmp_path, "web_client_error.png")

    # A fatal one: an unknown voice closes the session with 1008, and the page says so.
    page.fill("#blend", "no_such_voice")
    page.fill("#text", "həlˈO")
    page.click("#speak")
    page.wait_for_function("() => window.rtStats.closeCode === 1008", timeout=WAIT_MS)
    text = error.text_content() or ""
    assert "1008" in text and "unknown_voice" in text, text
    assert stats(page)["errors"][-1]["code"] == "unknown_voice"


def test_the_page_works_from_the_server_alone(page: Page, server: RunningServer) -> None:
    """Every request the page makes goes to the server itself (nothing fetched from elsewhere)."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    try:
        page.reload()
        page.wait_for_function("() => window.rtStats.status === 'ready to speak'", timeout=WAIT_MS)
    except Error as exc:  # pragma: no cover - a failure message with the requests so far
        raise AssertionError(seen) from exc
    assert seen, "the page made no requests"
    assert all(url.startswith(server.http + "/") for url in seen), seen


def test_a_server_with_api_keys_is_usable_from_the_page(browser_context: BrowserContext) -> None:
    """With API keys configured, the page (public, like /healthz) says it needs one; a key typed into it, or given
    in its address as `#api_key=`, goes with its HTTP requests (Bearer) and its WebSocket (`?api_key=`), and the
    fragment is cleared from the address bar."""
    key = "page-test-key-0123456789"
    keyed = start_server(make_settings(api_keys=(key,), first_segment_min_phonemes=500, idle_cut_ms=10_000))
    tab = browser_context.new_page()
    try:
        tab.goto(keyed.http + "/")
        tab.wait_for_function("() => window.rtStats.status === 'API key needed'", timeout=WAIT_MS)
        assert "unauthorized" in (tab.locator("#error").text_content() or "")
        tab.fill("#api-key", key)
        tab.dispatch_event("#api-key", "change")
        tab.wait_for_function("() => window.rtStats.status === 'ready to speak'", timeout=WAIT_MS)
        assert tab.locator("#error").is_hidden()

        tab.goto("about:blank")
        tab.goto(keyed.http + "/#api_key=" + key)  # a fresh load, the key in the fragment
        tab.wait_for_function("() => window.rtStats.status === 'ready to speak'", timeout=WAIT_MS)
        assert key not in tab.url and tab.input_value("#api-key") == key
        tab.evaluate("() => { location.hash = 'api_key=wrong-key-0123456789abc'; }")  # pasted into an open tab
        tab.wait_for_function("() => window.rtStats.status === 'API key needed'", timeout=WAIT_MS)
        tab.wait_for_function("() => location.hash === ''", timeout=WAIT_MS)
        tab.fill("#api-key", key)
        tab.dispatch_event("#api-key", "change")
        tab.wait_for_function("() => window.rtStats.status === 'ready to speak'", timeout=WAIT_MS)
        speak_sample(tab, "Quick fox")
        tab.wait_for_function("() => window.rtStats.turnDone", timeout=WAIT_MS)
        s = stats(tab)
        assert s["lastError"] is None and s["receivedS"] > 0.2, s
    finally:
        tab.close()
        keyed.stop()
