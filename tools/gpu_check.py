"""One prepared script for a borrowed GPU machine: `python tools/gpu_check.py --out $OUT/gpu_check.json`.

Runs each step in order, writes the JSON report after every step (so a timeout still
leaves the finished steps on disk) and stops starting new steps past `--budget-s`
(default 420 s, well inside the 8-minute window). A step that needs a missing package
records `"status": "missing"` with what is absent, instead of failing the run; a step that
needs CUDA on a machine without it records `"status": "not run", "why": "CUDA is not available"`.
`--steps a,b` runs a subset (environment always runs). Everything is built locally: no downloads.

Steps and what each measures
- environment: Python, torch, CUDA, GPU name and memory, bf16 support, optional package versions
  (missing ones listed), and whether espeak-ng/flite are on the PATH.
- matmul: bf16 4096x4096 matmul throughput (TFLOP/s), to put the other timings in context.
- nf4_generate: loads `--bundle` (default: the shipped SpeechGPT-tiny, loaders.default_model) with
  `Pipeline.load(quant="nf4", device="cuda")` and answers the bundled example question twice (cold,
  warm): time to transcript, time to first audio, tokens/s, real-time factor, load seconds, peak
  CUDA memory, what it heard and whether that is the question's text. The same with quant "none"
  (bf16) for comparison. Each variant reports its own status.
- int4: the same turn with quant "int4" (torchao int4 weight-only, model.py): ok with timings, or
  the clear error (SpeechGPT-tiny's widths are multiples of int4's group of 128).
  (matmul runs first and sets CUDA up, so a cold turn carries only its own first-use kernel costs.)
- qlora_step: the tiny training chain on text-only data (no espeak-ng/flite needed): stage 0 (base,
  `small` size on CUDA: 8 layers x 1024) -> stage 1 (random unit lines) -> stage 2 (text->text
  records from the tiny recipe's instructions) -> stage 3 LoRA over a 4-bit NF4 base (QLoRA) through
  training/stage3_chain.py and training/fit.py: per-step loss and seconds (from fit's log.csv), peak
  CUDA memory; and stage 3 over the unquantised bf16 base for comparison.
- speech_bench: tools/bench_speech.py's measurements on CUDA: random HuBERT-base units for 5 s of
  the LJ Speech recording, and the released-size unit HiFi-GAN on 5 s of audio, whole and streamed.

Each step's core is a function with a `device` argument (`spoken_turn`, `chain_to_stage2`,
`stage3_step`, `speech_bench`), so tests/test_gpu_check.py runs the same code on CPU at tiny sizes.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "assets" / "examples" / "LJ050-0131.wav"  # 7.66 s of real speech, in the repo
TINY_RECIPE = REPO / "training" / "recipes" / "tiny"
# Stage-0 base shapes: `tiny` is the tiny recipe's (CPU tests); `small` (~100 M params) gives GPU
# step times that are not all launch overhead, and still builds and saves in seconds.
MODEL_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16),
}
CHAIN_N_UNITS = 32  # the tiny recipe's unit vocabulary
UNIT_LINES = 40  # random stage-1 unit lines (no audio needed)
TTS_BACKENDS = ("espeak-ng", "flite")

Step = Callable[[dict], dict]


class Missing(RuntimeError):
    """Something a measurement needs (a package, a tool) is not on this machine."""


class CheckFailed(RuntimeError):
    """A measurement ran but its output is wrong."""


# --- helpers -------------------------------------------------------------------------------------------


def need(*modules: str) -> None:
    """Raise Missing naming every one of `modules` that cannot be imported."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        raise Missing(", ".join(absent) + (" is" if len(absent) == 1 else " are") + " not installed")


def attempt(fn: Callable[..., dict], *args, **kwargs) -> dict:
    """Run one measurement: its figures with status ok, or status missing / error and why."""
    t0 = time.perf_counter()
    try:
        result = {"status": "ok", **fn(*args, **kwargs)}
    except Exception as exc:  # one failing measurement must not hide the others
        result = _failure(exc)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _failure(exc: BaseException) -> dict:
    """status missing when an import (anywhere in the cause chain) failed, else error with a short trace."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, Missing):
            return {"status": "missing", "why": str(cause)}
        if isinstance(cause, ImportError):
            name = getattr(cause, "name", None)
            return {"status": "missing", "why": f"{name} is not installed" if name else str(exc)}
        cause = cause.__cause__
    return {"status": "error", "why": repr(exc), "trace": traceback.format_exc(limit=6)}


def combine(**parts: dict) -> dict:
    """A step made of several measurements: its status is the worst of theirs (error > missing > ok)."""
    statuses = [p["status"] for p in parts.values()]
    status = next((s for s in ("error", "missing") if s in statuses), "ok")
    return {"status": status, **parts}


def _reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    """Peak CUDA memory allocated since the last _reset_peak (None off CUDA)."""
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _load_tool(name: str):
    """A module of tools/ by file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- step cores (device-agnostic, used by the tests on CPU) --------------------------------------------


def example_question() -> tuple[Path, str]:
    """The bundled example question in SpeechGPT-tiny's domain: (audio, its text)."""
    from speechgpt_app.loaders import read_examples

    example = read_examples()[0]  # the first is SpeechGPT-tiny's
    return example.audio, example.text


def spoken_turn(
    bundle: str | Path, device: str, quant: str, sample: Path | None = None, text: str | None = None, turns: int = 2
) -> dict:
    """Load `bundle` with `quant` on `device`, answer `sample` (default: the example question, whose
    text is `text`) `turns` times; timings of each turn, what it heard and whether that was `text`.

    Raises CheckFailed when a turn errs or produces no audio.
    """
    need("transformers", "peft", "soundfile", "soxr")
    if quant in ("nf4", "int8"):
        need("bitsandbytes")
    if quant == "int4":
        need("torchao")
    from speechgpt_app.events import Audio, End, Heard
    from speechgpt_app.generate import SamplingOptions
    from speechgpt_app.pipeline import Options, Pipeline, Timings

    _reset_peak(device)
    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, quant=quant, device=device)
    result: dict = {"description": pipe.description, "load_s": round(time.perf_counter() - t0, 3)}
    if sample is None:
        sample, text = example_question()
    for turn in range(turns):
        timings, heard, audio = Timings(), "", 0
        end = None
        for event in pipe.respond(audio=str(sample), options=Options(SamplingOptions(seed=0))):
            timings.observe(event)
            if isinstance(event, Heard):
                heard += event.text
            elif isinstance(event, Audio):
                audio += len(event.pcm)
            elif isinstance(event, End):
                end = event
        if end is None or end.reason == "error":
            raise CheckFailed(f"turn {turn} ended with {end}")
        if not audio:
            raise CheckFailed(f"turn {turn}: no answer audio (heard {heard.strip()!r})")
        result["cold" if turn == 0 else f"warm{turn}"] = {"end": end.reason, "heard": heard.strip(),
                                                          "heard_right": heard.strip() == text, **timings.as_dict()}
    result["peak_cuda_gib"] = _peak_gib(device)
    return result


def text_records(out: Path) -> Path:
    """Text->text chain-of-modality records (the `t2t` format of training.data.build's stage 3) from the
    tiny recipe's instructions: the real builder, with no speech synthesiser run."""
    from training.data import build

    items = build.read_instructions(str(TINY_RECIPE / "instructions.jsonl"))
    lines = []
    for indexed in enumerate(items):
        # t2t speaks nothing, so the voice is only drawn (a label), never run: no espeak-ng/flite needed.
        lines += build.stage3_item(indexed, seed=0, formats=("t2t",), backends=TTS_BACKENDS[:1],
                                   answer_voice=None, max_chars=build.DEFAULT_MAX_CHARS)  # fmt: skip
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out


def unit_lines(out: Path, n_units: int = CHAIN_N_UNITS, seed: int = 0) -> Path:
    """Random stage-1 unit lines (what `build stage1` writes from audio), seeded."""
    from speechgpt_app.units import units_to_text

    rng = random.Random(seed)
    out.write_text("".join(
        units_to_text(rng.randrange(n_units) for _ in range(rng.randint(20, 60))) + "\n" for _ in range(UNIT_LINES)
    ))  # fmt: skip
    return out


def _precision(device: str) -> str:
    """bf16 on CUDA (as the 7B recipe trains), fp32 on CPU. One value for every stage of a process:
    Accelerate's state is a singleton that refuses a second mixed-precision setting."""
    return "bf16" if device.startswith("cuda") else "fp32"


def _recipe(stage: str, device: str, **overrides):
    """The tiny recipe of `stage`, quick (no checkpoints, no evaluation, no TensorBoard)."""
    from training.config import parse_args
    from training.fit import TrainConfig

    cfg = parse_args(TrainConfig, ["--config", str(TINY_RECIPE / f"{stage}.yaml")])
    # One thread suits a small shared CPU; on a GPU machine torch's default keeps the host side quick.
    threads = 1 if device == "cpu" else 0
    return replace(cfg, save_every=0, eval_every=0, eval_examples=0, tensorboard=False, threads=threads,
                   precision=_precision(device), **overrides)  # fmt: skip


def _accelerator(cfg, device: str):
    """fit's Accelerator, refusing a device other than `device` (it takes CUDA whenever it is there)."""
    from training.fit import make_accelerator

    acc = make_accelerator(cfg)
    if acc.device.type != device.split(":")[0]:
        raise ValueError(f"the training code runs on {acc.device} here, not {device}: pass device={acc.device.type!r}")
    return acc


def chain_to_stage2(workdir: Path, device: str, size: str = "tiny", steps: int = 1) -> dict:
    """Stage 0 -> 1 -> 2 of the tiny chain on text-only data, `steps` steps each; the stage-2 model dir."""
    need("transformers", "accelerate", "sentencepiece", "safetensors")
    import torch

    from training import stage0_base, stage1_pretrain, stage2_instruct

    workdir.mkdir(parents=True, exist_ok=True)
    records = text_records(workdir / "records.jsonl")
    units = unit_lines(workdir / "units.txt")
    threads = torch.get_num_threads()
    seconds = {}
    try:
        t0 = time.perf_counter()
        base = stage0_base.main(stage0_base.Stage0Config(texts=(str(records),), out_dir=str(workdir / "s0"),
                                                         vocab_size=400, **MODEL_SIZES[size]))  # fmt: skip
        seconds["stage0"] = time.perf_counter() - t0
        model_dir = base
        for name, stage, data in (("stage1", stage1_pretrain, units), ("stage2", stage2_instruct, records)):
            t0 = time.perf_counter()
            cfg = _recipe(name, device, base=str(model_dir), data=str(data), out_dir=str(workdir / name),
                          max_steps=steps, block_size=256)  # fmt: skip
            model_dir = stage.main(_accelerator(cfg, device), cfg).model_dir
            seconds[name] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    params = json.loads((model_dir / "config.json").read_text())
    return {
        "stage2_model": str(model_dir),
        "records": str(records),
        "size": size,
        "shape": {k: params[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
        "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def stage3_step(base: Path, records: Path, out_dir: Path, device: str, quant: str = "nf4", steps: int = 3) -> dict:
    """`steps` stage-3 LoRA steps on `base` (quant nf4: QLoRA) through stage3_chain/fit: losses, seconds, memory."""
    need("transformers", "peft", "accelerate")
    if quant in ("nf4", "int8"):
        need("bitsandbytes")
    import torch

    from training import stage3_chain
    from training.fit import LOG_CSV

    cfg = _recipe("stage3", device, base=str(base), data=str(records), out_dir=str(out_dir), max_steps=steps,
                  quant=quant)  # fmt: skip
    threads = torch.get_num_threads()
    _reset_peak(device)
    try:
        result = stage3_chain.main(_accelerator(cfg, device), cfg)
    finally:
        torch.set_num_threads(threads)
    peak = _peak_gib(device)
    losses = result.train_losses
    if result.step != steps or not all(map(_finite, losses)):
        raise CheckFailed(f"stage 3 ran {result.step} of {steps} steps, losses {losses}")
    if not (result.model_dir / "adapter_model.safetensors").is_file():
        raise CheckFailed(f"stage 3 saved no adapter in {result.model_dir}")
    with (out_dir / LOG_CSV).open() as f:
        elapsed = [float(row["seconds"]) for row in csv.DictReader(f) if row["split"] == "train"]
    step_s = [round(b - a, 4) for a, b in zip([0.0, *elapsed], elapsed)]  # log.csv's seconds are cumulative
    return {"quant": quant, "precision": cfg.precision, "losses": [round(x, 4) for x in losses],
            "step_seconds": step_s, "peak_cuda_gib": peak}  # fmt: skip


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def speech_bench(
    device: str, seconds: float = 5.0, runs: int = 3, chunk_units: int = 10, hubert_config=None, vocoder_config=None
) -> dict:
    """tools/bench_speech.py's figures on `device` (defaults: HuBERT base, the released vocoder)."""
    need("transformers", "soundfile", "soxr")
    import torch

    bench = _load_tool("bench_speech")
    from speechgpt_app.audio import SAMPLE_RATE, load_audio

    torch.manual_seed(0)
    wav = load_audio(SAMPLE)[: int(seconds * SAMPLE_RATE)]
    tokenizer = bench.hubert_tokenizer(hubert_config, device=device)
    units_ms = bench.bench_units(tokenizer, wav, runs)
    n_units = len(tokenizer.encode(wav))
    del tokenizer
    vocoder = bench.random_vocoder(vocoder_config or bench.RELEASED_VOCODER, device=device)
    voc = bench.bench_vocoder(vocoder, seconds, runs, chunk_units)
    voc["streamed_ms"] = {f"min_frames_{k}": round(v, 2) for k, v in voc["streamed_ms"].items()}
    return {
        "audio_s": round(len(wav) / SAMPLE_RATE, 3),
        "units_ms": round(units_ms, 2),
        "units": n_units,
        "vocoder": {k: round(v, 3) if isinstance(v, float) else v for k, v in voc.items()},
        "vocoder_rtf_whole": round(voc["whole_ms"] / 1000 / voc["audio_s"], 4),
        "runs": runs,
    }


# --- steps ------------------------------------------------------------------------------------------


def step_environment(report: dict) -> dict:
    """Python, torch and CUDA versions, and which optional GPU packages and TTS tools are there."""
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
    packages = ("transformers", "peft", "accelerate", "bitsandbytes", "torchao", "sentencepiece", "safetensors",
                "soundfile", "soxr", "gradio")  # fmt: skip
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        info[pkg] = _version(pkg) if spec else "missing"
    for tool in TTS_BACKENDS:
        info[tool] = shutil.which(tool) or "missing"
    missing = [p for p in packages if info[p] == "missing"]
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


def step_nf4_generate(report: dict) -> dict:
    """One spoken turn (cold and warm) on the bundle, NF4 and bf16, on CUDA."""
    bundle = report["bundle"]
    return combine(nf4=attempt(spoken_turn, bundle, "cuda", "nf4"), bf16=attempt(spoken_turn, bundle, "cuda", "none"))


def step_int4(report: dict) -> dict:
    """The same turn with torchao int4 weight-only: ok with timings, or the clear error."""
    return combine(int4=attempt(spoken_turn, report["bundle"], "cuda", "int4"))


def step_qlora_step(report: dict) -> dict:
    """Stage 0 -> 2 (small, one step each), then 3 QLoRA steps over NF4 and 3 LoRA steps over bf16, on CUDA."""
    with tempfile.TemporaryDirectory() as tmp:
        chain = attempt(chain_to_stage2, Path(tmp) / "chain", "cuda", size="small")
        if chain["status"] != "ok":
            return combine(chain=chain)
        base, records = Path(chain["stage2_model"]), Path(chain["records"])
        return combine(chain=chain,
                       qlora_nf4=attempt(stage3_step, base, records, Path(tmp) / "nf4", "cuda", "nf4"),
                       lora_bf16=attempt(stage3_step, base, records, Path(tmp) / "bf16", "cuda", "none"))  # fmt: skip


def step_speech_bench(report: dict) -> dict:
    """HuBERT-base units for 5 s of speech and the released-size vocoder (whole, streamed), on CUDA."""
    return combine(speech=attempt(speech_bench, "cuda"))


STEPS: list[tuple[str, Step, bool]] = [
    # (name, function, needs CUDA)
    ("environment", step_environment, False),
    ("matmul", step_matmul, True),
    ("nf4_generate", step_nf4_generate, True),
    ("int4", step_int4, True),
    ("qlora_step", step_qlora_step, True),
    ("speech_bench", step_speech_bench, True),
]


def _version(pkg: str) -> str:
    try:
        return importlib.import_module(pkg).__version__
    except Exception as exc:  # a package that is present but broken is worth reporting
        return f"broken: {exc}"


def _selected(names: str | None) -> list[tuple[str, Step, bool]]:
    """STEPS named in `names` (comma-separated), environment always first; all when None."""
    if names is None:
        return STEPS
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = sorted(wanted - {name for name, _, _ in STEPS})
    if unknown:
        raise SystemExit(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(n for n, _, _ in STEPS)}")
    return [s for s in STEPS if s[0] == "environment" or s[0] in wanted]


def main(argv: list[str] | None = None) -> int:
    """Run the steps, writing the report after each one."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no step after this many seconds")
    ap.add_argument("--steps", default=None, help="comma-separated subset of: " + ", ".join(n for n, _, _ in STEPS))
    ap.add_argument("--bundle", default=None, help="model bundle for the spoken turns (default: SpeechGPT-tiny)")
    args = ap.parse_args(argv)
    steps = _selected(args.steps)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a network that is not there
    if str(REPO) not in sys.path:  # run as `python tools/gpu_check.py`: the packages live at the root
        sys.path.insert(0, str(REPO))
    start = time.perf_counter()
    from speechgpt_app.loaders import default_model

    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "bundle": args.bundle or str(default_model()), "steps": {}}  # fmt: skip
    cuda = _cuda()
    for name, fn, needs_cuda in steps:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report["steps"][name] = {"status": "not run", "why": f"budget of {args.budget_s:.0f} s spent"}
        elif needs_cuda and not cuda:
            report["steps"][name] = {"status": "not run", "why": "CUDA is not available"}
        else:
            t0 = time.perf_counter()
            try:
                result = {"status": "ok", **fn(report)}
            except Exception as exc:  # one failing step must not hide the others
                result = _failure(exc)
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
