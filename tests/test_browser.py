"""The voice chat in a real browser: Debian's Chromium, headless, driven by Playwright.

Two ways in: speaking through Chromium's fake microphone (fed from a recording), and uploading a
file; and the page's cached example. Each must fill the three live panels and give the answer player
a source that decodes to audible speech; an uploaded question and the example, both in
SpeechGPT-tiny's domain, must get the domain's answer. Screenshots go to pytest's temporary directory, or `$SPEECHGPT_SCREENSHOTS_DIR`;
`SPEECHGPT_UPDATE_SCREENSHOTS=1` writes them over the tracked ones in docs/screenshots/ (the README
shows the mid-answer one), so that an ordinary test run leaves the git tree clean.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf
from app_helpers import REPO, TINY, known_questions, running_app
from playwright.sync_api import Browser, Page, sync_playwright

from speechgpt_app.audio import resample
from speechgpt_app.loaders import read_examples

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"  # Debian's package; never `playwright install`
DOCS_SCREENSHOTS = REPO / "docs" / "screenshots"
MIC_RATE = 48_000  # Chromium's fake capture device runs at 48 kHz
RECORD_MS = 3_000  # how long the test "speaks" into the fake microphone
TIMEOUT_MS = 90_000  # a turn on a busy 2-core CI machine
SILENCE_RMS = 1e-3
VIEWPORT = {"width": 1280, "height": 1500}

# Decodes the answer player's audio (the stream's combined file, which its download link points
# at) with Web Audio and measures it.
DECODE_JS = """async (href) => {
  const data = await (await fetch(href)).arrayBuffer();
  const audio = await new OfflineAudioContext(1, 1, 16000).decodeAudioData(data);
  const x = audio.getChannelData(0);
  let sum = 0;
  for (const v of x) sum += v * v;
  return {seconds: audio.duration, rms: Math.sqrt(sum / x.length)};
}"""


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this run's screenshots go (docs/screenshots/ only when asked to update them)."""
    if os.environ.get("SPEECHGPT_UPDATE_SCREENSHOTS") == "1":
        folder = DOCS_SCREENSHOTS
    elif os.environ.get("SPEECHGPT_SCREENSHOTS_DIR"):
        folder = Path(os.environ["SPEECHGPT_SCREENSHOTS_DIR"])
    else:
        folder = tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_app(TINY, tmp_path_factory.mktemp("hf_home")) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, lj_wav: Path) -> Iterator[Browser]:
    # The fake microphone plays a 16-bit WAV file at its own rate.
    data, rate = sf.read(lj_wav, dtype="float32")
    mic_wav = tmp_path_factory.mktemp("browser") / "mic.wav"
    sf.write(mic_wav, resample(data, rate, MIC_RATE), MIC_RATE, subtype="PCM_16")
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_wav}",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


def open_page(browser: Browser, url: str) -> Page:
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#audio-in")
    return page


def value_of(selector: str) -> str:
    return f"document.querySelector('{selector} textarea').value"


def wait_for_answer(page: Page, screenshot: Path | None = None, expect: tuple[str, str] | None = None) -> dict:
    """Wait for the three panels (with `expect`: these transcript and answer texts) and the answer
    audio; return the decoded audio's measures."""
    page.wait_for_function(f"{value_of('#heard')}.length > 0 && {value_of('#answer')}.length > 0")
    if screenshot:  # as soon as the answer speech starts: the README's mid-answer picture
        page.wait_for_function("document.querySelector('#speech audio')?.src.length > 0")
        page.screenshot(path=str(screenshot), full_page=True)
    if expect:
        heard, answer = expect
        page.wait_for_function(f"{value_of('#heard')} === {heard!r} && {value_of('#answer')} === {answer!r}")
    page.wait_for_function("/[1-9][0-9]* speech units/.test(document.querySelector('#units-count').innerText)")
    page.wait_for_function("document.querySelector('#speech audio')?.src.length > 0")
    # The turn is over when the conversation holds its question and answer.
    page.wait_for_function("document.querySelectorAll('#conversation .message-row').length >= 2")
    href = page.get_attribute("#speech a.download-link", "href")
    assert href, "the answer player has no download link"
    return page.evaluate(DECODE_JS, href)


def check_audio(measure: dict) -> None:
    assert measure["seconds"] > 0.5, measure  # the shortest answer ("six is after five") is over a second
    assert measure["rms"] > SILENCE_RMS, measure


def test_speak_through_the_microphone(browser: Browser, server: str, screenshots: Path) -> None:
    page = open_page(browser, server)
    page.click("#audio-in button.record-button")
    page.wait_for_timeout(RECORD_MS)
    page.click("#audio-in button.stop-button")  # "Send when I stop recording" is on by default
    check_audio(wait_for_answer(page, screenshot=screenshots / "voice-chat-mid-answer.png"))
    # The question's recording is in the conversation, playable.
    assert page.locator("#conversation audio").count() >= 2
    page.screenshot(path=str(screenshots / "voice-chat-microphone.png"), full_page=True)


def test_upload_a_file(browser: Browser, server: str, screenshots: Path) -> None:
    question = known_questions()[0]
    page = open_page(browser, server)
    page.click("#audio-in button[aria-label='Upload file']")
    page.set_input_files("#audio-in input[type=file]", str(question.audio))
    page.wait_for_selector("#audio-in [data-testid='waveform-controls']")
    page.click("#send")
    check_audio(wait_for_answer(page, expect=(question.text, question.answer)))
    page.screenshot(path=str(screenshots / "voice-chat-upload.png"), full_page=True)


def test_cached_example(browser: Browser, server: str) -> None:
    example = read_examples()[0]  # a question in SpeechGPT-tiny's domain
    page = open_page(browser, server)
    page.click(f"text={example.audio.name}")  # the example under the inputs: runs once, then comes from the cache
    page.wait_for_function(f"{value_of('#heard')} === {example.text!r} && {value_of('#answer')} === {example.answer!r}")
    page.wait_for_selector("#speech a.download-link")
    check_audio(page.evaluate(DECODE_JS, page.get_attribute("#speech a.download-link", "href")))
