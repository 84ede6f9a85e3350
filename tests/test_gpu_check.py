"""The GPU check script runs anywhere, reports what it could not do, and its steps' cores run on CPU.

The cores (`spoken_turn`, `chain_to_stage2` + `stage3_step`, `speech_bench`) are what the script runs
on "cuda"; here they run on the CPU at tiny sizes (on a CUDA machine, on CUDA).
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from speechgpt_app.loaders import default_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.py"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_STEPS = ("matmul", "nf4_generate", "int4", "qlora_step", "speech_bench")


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


@pytest.fixture
def restore_process_state():
    """Training sets torch's threads, seeds every RNG and builds Accelerate's singletons: put them back."""
    threads = torch.get_num_threads()
    rngs = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)
    torch.set_rng_state(rngs[0])
    np.random.set_state(rngs[1])
    random.setstate(rngs[2])


def test_gpu_check_writes_a_report_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert list(report["steps"]) == [name for name, _, _ in gpu_check.STEPS]
    env = report["steps"]["environment"]
    assert env["status"] == "ok" and env["torch"] and env["transformers"] != "missing"
    if not torch.cuda.is_available():
        for name in CUDA_STEPS:
            assert report["steps"][name] == {"status": "not run", "why": "CUDA is not available"}


def test_steps_option_runs_a_subset_and_refuses_unknown_names(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert gpu_check.main(["--out", str(out), "--steps", "int4"]) == 0
    assert list(json.loads(out.read_text())["steps"]) == ["environment", "int4"]
    with pytest.raises(SystemExit, match="unknown step.*nope"):
        gpu_check.main(["--out", str(out), "--steps", "int4,nope"])


def test_budget_stops_new_steps(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    gpu_check.main(["--out", str(out), "--budget-s", "-1", "--steps", "matmul"])
    steps = json.loads(out.read_text())["steps"]
    assert steps["environment"]["why"] == steps["matmul"]["why"] == "budget of -1 s spent"


def test_attempt_tells_missing_from_error() -> None:
    missing = gpu_check.attempt(gpu_check.need, "torch", "no_such_package_xyz")
    assert missing["status"] == "missing" and missing["why"] == "no_such_package_xyz is not installed"

    def imports() -> dict:
        import no_such_package_abc  # noqa: F401

        return {}

    assert gpu_check.attempt(imports)["why"] == "no_such_package_abc is not installed"
    error = gpu_check.attempt(lambda: {"x": 1 / 0})
    assert error["status"] == "error" and "ZeroDivisionError" in error["why"]
    assert gpu_check.attempt(lambda: {"x": 1})["x"] == 1
    step = gpu_check.combine(a={"status": "ok"}, b=missing)
    assert step["status"] == "missing" and step["b"] is missing
    assert gpu_check.combine(a=error, b=missing)["status"] == "error"


def test_spoken_turn_nf4_and_unquantised() -> None:
    bundle = default_model()  # the shipped SpeechGPT-tiny
    for quant in ("nf4", "none"):
        result = gpu_check.spoken_turn(bundle, DEVICE, quant)
        assert ("NF4" in result["description"]) == (quant == "nf4")
        for turn in ("cold", "warm1"):
            t = result[turn]
            assert t["end"] in ("eoa", "eos") and isinstance(t["heard_right"], bool) and t["heard"]
            assert 0 < t["time_to_transcript_ms"] <= t["time_to_first_audio_ms"] <= t["total_ms"]
            assert t["tokens_per_second"] > 0 and t["real_time_factor"] > 0 and t["audio_seconds"] > 0
        assert (result["peak_cuda_gib"] is None) == (DEVICE == "cpu")


def test_qlora_step_through_the_tiny_chain(tmp_path: Path, restore_process_state) -> None:
    chain = gpu_check.chain_to_stage2(tmp_path / "chain", DEVICE, size="tiny", steps=1)
    assert chain["shape"]["hidden_size"] == 64 and set(chain["stage_seconds"]) == {"stage0", "stage1", "stage2"}
    result = gpu_check.stage3_step(Path(chain["stage2_model"]), Path(chain["records"]), tmp_path / "s3", DEVICE,
                                   "nf4", steps=2)  # fmt: skip
    assert result["quant"] == "nf4" and len(result["losses"]) == 2 and len(result["step_seconds"]) == 2
    assert all(np.isfinite(result["losses"])) and all(s > 0 for s in result["step_seconds"])
    assert 1.0 < result["losses"][0] < 20.0  # cross-entropy of a barely trained model over ~470 tokens


def test_speech_bench_at_tiny_sizes() -> None:
    from scripted import TINY_VOCODER
    from transformers import HubertConfig

    hubert = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(32,) * 7, num_conv_pos_embedding_groups=4)  # fmt: skip
    result = gpu_check.speech_bench(DEVICE, seconds=1.0, runs=1, hubert_config=hubert,
                                    vocoder_config={**TINY_VOCODER, "num_embeddings": 50})  # fmt: skip
    assert result["audio_s"] == 1.0 and result["units_ms"] > 0 and result["units"] > 1
    voc = result["vocoder"]
    assert abs(voc["audio_s"] - 1.0) < 0.1  # units_for picks units whose durations add up to 1 s
    assert voc["whole_ms"] > 0 and set(voc["streamed_ms"]) == {"min_frames_1", "min_frames_25", "min_frames_50"}
    assert result["vocoder_rtf_whole"] > 0
