"""bench.py on the shipped SpeechGPT-tiny: real turns, every figure from the pipeline's Timings."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app_helpers import TINY

from speechgpt_app import bench, cli
from speechgpt_app.loaders import read_examples


def test_bench_prints_every_figure_and_writes_json(tmp_path: Path, capsys) -> None:
    question = bench.default_questions()[0]
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", str(TINY), "--questions", str(question), "--runs", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for _, label, _ in bench.FIGURES:
        assert f"| {label} |" in printed
    result = json.loads(out.read_text())
    (turn,) = result["turns"]
    example = next(e for e in read_examples() if e.audio == question)
    assert turn["heard"] == example.text  # a real turn of the real model, not a stand-in
    assert 0 < turn["units_ms"] < turn["time_to_transcript_ms"] < turn["time_to_first_audio_ms"]
    assert turn["prefill_ms"] > 0 and turn["tokens_per_second"] > 0 and turn["real_time_factor"] > 0
    assert result["memory"]["peak_ram_mib"] > 100 and result["memory"]["peak_gpu_mib"] is None


def test_page_benchmark_times_send_to_playable_audio(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # the app caches its example answers there
    (run,) = bench.page_send_to_audio(str(TINY), bench.default_questions()[0], runs=1)
    assert 0 < run["send_to_playable_s"] < bench.PAGE_TIMEOUT_S
    assert "time to first audio" in run["page_timings"]
    assert re.search(r"[0-9] tokens/s", run["page_timings"])  # read once the turn ended, not mid-answer
