"""One prepared script for a borrowed GPU machine: `python tools/gpu_check.py --out $OUT/gpu_check.json`.

Runs each step in order, writes the JSON report after every step (so a timeout still
leaves the finished steps on disk) and stops starting new steps past `--budget-s`
(default 420 s, well inside the 8-minute window). A step that needs a missing package
records `"status": "missing"` with what to install, instead of failing the run.

Later work adds steps to STEPS: each is a function `(report) -> dict` run only if CUDA is there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

Step = Callable[[dict], dict]


def step_environment(report: dict) -> dict:
    """Python, torch and CUDA versions, and which optional GPU packages are importable."""
    import torch

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
    for pkg in ("transformers", "peft", "accelerate", "bitsandbytes", "torchao", "gradio"):
        spec = importlib.util.find_spec(pkg)
        info[pkg] = _version(pkg) if spec else "missing"
    missing = [p for p in ("transformers", "peft", "bitsandbytes", "torchao") if info[p] == "missing"]
    if missing:
        info["note"] = "missing: " + ", ".join(missing) + " (steps that need them report 'missing')"
    return info


def step_matmul(report: dict) -> dict:
    """A bf16 matmul throughput figure, so later timings can be put in context."""
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"tflops_bf16": round(20 * 2 * 4096**3 / dt / 1e12, 1)}


STEPS: list[tuple[str, Step, bool]] = [
    # (name, function, needs CUDA)
    ("environment", step_environment, False),
    ("matmul", step_matmul, True),
]


def _version(pkg: str) -> str:
    try:
        return importlib.import_module(pkg).__version__
    except Exception as exc:  # a package that is present but broken is worth reporting
        return f"broken: {exc}"


def main(argv: list[str] | None = None) -> int:
    """Run every step, writing the report after each one."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--budget-s", type=float, default=420.0)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
    cuda = _cuda()
    for name, fn, needs_cuda in STEPS:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report["steps"][name] = {"status": "not run", "why": f"budget of {args.budget_s:.0f} s spent"}
        elif needs_cuda and not cuda:
            report["steps"][name] = {"status": "not run", "why": "CUDA is not available"}
        else:
            t0 = time.perf_counter()
            try:
                result = {"status": "ok", **fn(report)}
            except ModuleNotFoundError as exc:
                result = {"status": "missing", "why": f"{exc.name} is not installed"}
            except Exception as exc:  # one failing step must not hide the others
                result = {"status": "error", "why": repr(exc), "trace": traceback.format_exc(limit=5)}
            result["seconds"] = round(time.perf_counter() - t0, 2)
            report["steps"][name] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"[gpu_check] {name}: {report['steps'][name].get('status')}", flush=True)
    return 0


def _cuda() -> bool:
    try:
        import torch
    except ModuleNotFoundError:
        print("[gpu_check] torch is not installed", file=sys.stderr)
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
