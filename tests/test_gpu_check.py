"""The GPU check script runs anywhere and reports what it could not do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_writes_a_report_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(out)], check=True)
    report = json.loads(out.read_text())
    env = report["steps"]["environment"]
    assert env["status"] == "ok" and env["torch"]
    import torch

    if not torch.cuda.is_available():
        assert report["steps"]["matmul"] == {"status": "not run", "why": "CUDA is not available"}
