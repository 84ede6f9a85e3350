"""The SpeechGPT-tiny rebuild command, shortened (`--quick`): every step runs, a rerun resumes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from speechgpt_app.bundle import read_bundle
from speechgpt_app.units import read_speech_config

REPO = Path(__file__).resolve().parents[2]


def _rebuild(root: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "training.mini.rebuild", "--quick", "--root", str(root), "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_quick_rebuild_runs_every_step_and_resumes(tmp_path: Path) -> None:
    root = tmp_path / "mini"
    log = _rebuild(root)
    for step in ("training.mini.speak", "training.mini.train_units", "training.mini.records",
                 "training.mini.train_vocoder", "training.stage0_base", "training.stage0_text", "training.stage1_pretrain",
                 "training.stage2_instruct", "training.stage3_chain", "training.export", "speechgpt_app eval"):  # fmt: skip
        assert step in log, step
    for part in ("questions", "answers", "heldout"):
        assert (root / "corpus" / f"{part}.jsonl").read_text().strip()
    assert read_speech_config(root / "speech").feature_type == "ctc"
    info = read_bundle(root / "bundle")
    assert info.n_units == read_speech_config(root / "speech").n_units
    result = json.loads((root / "bundle" / "eval.json").read_text())
    assert result["groups"] and all(g["questions"] + g["follow_ups"] > 0 for g in result["groups"].values())

    # An interruption after stage 2: the rerun does stage 3, export and eval, and nothing before.
    shutil.rmtree(root / "stage3")
    shutil.rmtree(root / "bundle")
    log = _rebuild(root)
    assert "training.stage3_chain" in log and "training.export" in log and "speechgpt_app eval" in log
    for step in ("training.mini.speak", "training.mini.train_units", "training.stage2_instruct"):
        assert step not in log, step
