"""`python -m speechgpt_app bench`: the whole spoken turn, timed by the pipeline's `Timings`.

    python -m speechgpt_app bench                      # the default model, the page's example questions
    python -m speechgpt_app bench --page --json bench.json

It runs the real pipeline on fixed spoken questions (by default the page's in-domain examples, about 2 s
each), one warm-up turn and then `--runs` timed turns each, greedy, and prints the median of every
figure: unit extraction, prefill, decode tokens/s, time to transcript, time to first audio, real-time
factor, and the process's peak RAM (and GPU memory on CUDA). Every time is the pipeline's own (`Timings`,
as the page, `eval` and the load script report them). With `--page` it also starts the app (`app.py`,
from a source checkout) and measures in Chromium (Playwright, /usr/bin/chromium), in the page's own
clock, the time from pressing Send on an uploaded question to an answer audio element that can play
(`canplay`: it holds audio, not merely a stream address): what a person waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from speechgpt_app.cli import add_model_flags, load_pipeline
from speechgpt_app.evaluate import greedy_options, run_turn
from speechgpt_app.loaders import read_examples
from speechgpt_app.pipeline import Pipeline

# (key in a turn's figures, label, unit): the table's rows, in the order a turn produces them.
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("units_ms", "unit extraction", "ms"),
    ("prefill_ms", "prefill", "ms"),
    ("tokens_per_second", "decode", "tokens/s"),
    ("time_to_transcript_ms", "time to transcript", "ms"),
    ("time_to_first_audio_ms", "time to first audio", "ms"),
    ("real_time_factor", "real-time factor", ""),
)
APP = Path(__file__).resolve().parents[1] / "app.py"  # the page as `bash scripts/run.sh` serves it
CHROMIUM = "/usr/bin/chromium"
PAGE_TIMEOUT_S = 120.0
# Timed in the page's own clock, from the Send click event to the answer player's `canplay` state
# (readyState HAVE_FUTURE_DATA: it has audio to play, not merely a stream address); Playwright's own
# round trips stay out of it.
ARM_JS = """() => {
  const t = window.__sendTimes = {};
  document.querySelector('#send').addEventListener('click', () => { t.click = performance.now(); }, {capture: true, once: true});
  const poll = setInterval(() => {
    const player = document.querySelector('#speech audio');
    if (t.click && player && player.readyState >= 3) { t.playable = performance.now(); clearInterval(poll); }
  }, 5);
}"""
PLAYABLE_JS = "window.__sendTimes.playable > 0"
SEND_TO_PLAYABLE_JS = "(window.__sendTimes.playable - window.__sendTimes.click) / 1000"
TURN_DONE_JS = "/[0-9] tokens\\/s/.test(document.querySelector('#timings').innerText)"  # End's figures are in


def default_questions() -> list[Path]:
    """The page's example recordings that are questions of the model's domain (they have an answer)."""
    return [e.audio for e in read_examples() if e.answer]


def bench_turns(pipeline: Pipeline, questions: Sequence[Path], runs: int) -> list[dict[str, Any]]:
    """One warm-up turn, then `runs` timed turns per question; every turn's figures."""
    options = greedy_options(pipeline)
    rows = []
    for path in questions:
        run_turn(pipeline, options, audio=str(path))  # warm-up: first-call allocations and caches
        for _ in range(runs):
            pipeline.clear_prefix_cache()  # a repeated question would reuse its own cache: start cold
            acc, timings = run_turn(pipeline, options, audio=str(path))
            rows.append({"question": path.name, "heard": acc.heard.strip(), "answer": acc.answer.strip(),
                         **timings.as_dict()})  # fmt: skip
    return rows


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process and peak CUDA memory allocated (None without CUDA), MiB."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_ram_mib": rss_kib / 1024, "peak_gpu_mib": gpu}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with status {server.returncode} before serving its page: {_tail(log)}")
        try:
            urllib.request.urlopen(url, timeout=10)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the app did not serve {url} within {timeout_s:.0f} s: {_tail(log)}")


def _tail(log: Path) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])


def page_send_to_audio(model: str | None, question: Path, runs: int) -> list[dict[str, Any]]:
    """Start the app on loopback and, in Chromium, time Send -> a playable answer audio element
    (`runs` turns after one warm-up); each turn's seconds and the page's own timings line."""
    from playwright.sync_api import sync_playwright  # a dev dependency: only the page benchmark needs it

    if not APP.is_file():
        raise RuntimeError(f"--page needs the app script {APP} (a source checkout)")
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", **({"SPEECHGPT_MODEL": model} if model else {})}  # fmt: skip
    log = Path(tempfile.mkstemp(prefix="speechgpt-bench-app-", suffix=".log")[1])
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, str(APP)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    results = []
    try:
        _wait_until_up(url, server, log, PAGE_TIMEOUT_S)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
            for n in range(runs + 1):
                page.goto(url)  # a fresh session each turn: nothing of the last answer on the page
                page.wait_for_selector("#audio-in")
                page.click("#audio-in button[aria-label='Upload file']")
                page.set_input_files("#audio-in input[type=file]", str(question))
                page.wait_for_selector("#audio-in [data-testid='waveform-controls']")
                page.evaluate(ARM_JS)
                page.click("#send")
                page.wait_for_function(PLAYABLE_JS, polling=10)
                seconds = page.evaluate(SEND_TO_PLAYABLE_JS)
                page.wait_for_function(TURN_DONE_JS)
                if n:  # the first turn warms the app up
                    results.append({"send_to_playable_s": seconds, "page_timings": page.inner_text("#timings")})
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.unlink(missing_ok=True)
    return results


def _median(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def table(result: dict[str, Any]) -> str:
    """The printed table: one row per figure, the median over every timed turn."""
    rows = result["turns"]
    lines = [f"{result['model']} on {result['machine']}, {len(rows)} timed turns", "| figure | median |", "| --- | --- |"]
    for key, label, unit in FIGURES:
        value = _median(rows, key)
        lines.append(f"| {label} | {'–' if value is None else f'{value:.3f}' if not unit else f'{value:.1f} {unit}'} |")
    for key, value in result["memory"].items():
        lines.append(f"| {key.replace('_mib', '').replace('_', ' ')} | {'–' if value is None else f'{value:.0f} MiB'} |")
    if result.get("page"):
        lines.append(f"| page: Send -> playable audio | {_median(result['page'], 'send_to_playable_s'):.2f} s |")
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """`bench` flags."""
    add_model_flags(p)
    p.add_argument("--questions", nargs="+", type=Path, default=None, help="spoken questions (default: the page's examples)")
    p.add_argument("--runs", type=int, default=5, help="timed turns per question, after one warm-up (default 5)")
    p.add_argument("--page", action="store_true", help="also time Send -> playable audio in Chromium")
    p.add_argument("--json", type=Path, default=None, help="write the figures and every turn here")


def run_cli(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write the JSON."""
    pipeline = load_pipeline(args)
    questions = args.questions or default_questions()
    result: dict[str, Any] = {
        "model": pipeline.description,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "turns": bench_turns(pipeline, questions, args.runs),
        "memory": peak_memory(),
    }
    if args.page:
        result["page"] = page_send_to_audio(args.model, questions[0], args.runs)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0
