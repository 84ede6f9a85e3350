"""Load and soak the running app: `python tools/load_test.py load` / `python tools/load_test.py soak`.

Starts app.py in its own process on loopback (the default model unless `--model`), then drives it
with gradio_client sessions, each asking held-out spoken questions of SpeechGPT-tiny's domain
(tests/data/eval-subset) and exporting its conversation at the end.

- load: `--clients` sessions at once, `--turns` each, against a queue of `--queue`, with the language
  model in the app's process (`--lm local`), on a vLLM server this script starts (`--lm vllm`,
  scripts/vllm.sh) or one already running (`--lm-url`), or both paths one after the other in one
  sitting (`--lm both`, the default), printed side by side at the end. Prints p50/p95
  turn latency (client side, submit to last update), p50/p95 time to first audio and real-time
  factor (the pipeline's `Timings`, from each session's export), turns per minute, errors by
  message, and whether every session's export holds exactly its own turns.
- soak: `--sessions` sessions one after another, `--turns` each (so history trimming runs). Prints
  the server's resident memory after each session, its growth after warm-up, the app's session
  folders left behind after the sessions closed, and files older than the retention time.

Times are the pipeline's `Timings` (ms); the machine is named in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "tests" / "data" / "eval-subset"
SETTINGS = (0.0, 0.8, 50, 320, 0, "Speech + text")  # temperature 0 (greedy), top-p, top-k, max tokens, seed, output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions() -> list[tuple[Path, str]]:
    rows = [json.loads(line) for line in (QUESTIONS / "ci-subset.jsonl").read_text().splitlines() if line]
    return [(QUESTIONS / r["audio"], r["text"]) for r in rows]


class VLLM:
    """scripts/vllm.sh serving the default model's language model on a free loopback port."""

    def __init__(self) -> None:
        from speechgpt_app.lm_server import wait_until_up

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix="vllm-load-", suffix=".log")[1])
        env = {**os.environ, "VLLM_PORT": str(port)}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(["bash", "scripts/vllm.sh", "serve"], cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            wait_until_up(self.url, 900, alive=lambda: self.proc.poll() is None)
        except Exception:
            self.close()
            raise RuntimeError(f"vLLM did not start; its log: {self.log}") from None

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)


class Server:
    """app.py in a child process on a free loopback port (its language model at `lm_url` if given)."""

    def __init__(self, model: str | None, queue: int, lm_url: str | None = None) -> None:
        self.started = time.time()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
               "GRADIO_SERVER_PORT": str(self.port), "GRADIO_SERVER_NAME": "127.0.0.1"}  # fmt: skip
        env.pop("SPEECHGPT_LM_URL", None)
        if lm_url:
            env["SPEECHGPT_LM_URL"] = lm_url
        code = f"import app; app.launch(app.create_app(model={model!r}, queue_size={queue}), quiet=True)"
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url, timeout=2).is_success:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError("the app did not start within 300 s")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def files_dirs(self) -> list[Path]:
        """The app's own folders (ui.ChatApp's files_dir), by the child's open temp dirs."""
        return [p for p in Path(tempfile.gettempdir()).glob("speechgpt-ui-*") if p.stat().st_ctime >= self.started]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def session(url: str, turns: int, qs: list[tuple[Path, str]], offset: int, out: dict) -> None:
    """One browser session: `turns` spoken questions, then its export; results into `out`."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    latencies, errors, asked = [], [], []
    try:
        for i in range(turns):
            audio, text = qs[(offset + i) % len(qs)]
            t0 = time.perf_counter()
            try:
                client.predict(handle_file(str(audio)), "", "Chat", *SETTINGS, api_name="/send")
                latencies.append(time.perf_counter() - t0)
                asked.append(audio.name)
            except Exception as e:  # a refused or failed turn is a result here, not a crash
                errors.append(str(e).splitlines()[0][:120] or type(e).__name__)
        doc = None
        if asked:
            f = client.predict(api_name="/export")
            doc = json.loads(httpx.get(f["url"], timeout=30).text)
    finally:
        client.close()
    out.update(latencies=latencies, errors=errors, asked=asked, export=doc)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [float("nan")])[0]


def load(args: argparse.Namespace) -> dict:
    """One load run per language model path asked for (`--lm`), in this order, in one sitting."""
    paths = ("local", "vllm") if args.lm == "both" else (args.lm,)
    runs = {}
    for path in paths:
        if path == "local":
            runs[path] = load_once(args, None)
        elif args.lm_url:
            runs[path] = load_once(args, args.lm_url)
        else:
            vllm = VLLM()
            try:
                runs[path] = load_once(args, vllm.url)
            finally:
                vllm.close()
        print(f"[load] {path}: {json.dumps(runs[path])}", flush=True)
    return {"mode": "load", "runs": runs, "table": table(runs)}


def table(runs: dict[str, dict]) -> str:
    """The runs as a Markdown table (the README's load table)."""
    rows = ["| language model | turns done | errors | p50 / p95 time to first audio (s) | p50 / p95 turn (s) | turns/min |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for path, r in runs.items():
        t, lat = r["time_to_first_audio_ms"], r["turn_latency_s"]
        rows.append(f"| {path} | {r['completed_turns']}/{r['clients'] * r['turns_each']} | {sum(r['errors'].values())} "
                    f"| {t['p50'] / 1000:.2f} / {t['p95'] / 1000:.2f} | {lat['p50']:.1f} / {lat['p95']:.1f} "
                    f"| {r['turns_per_minute']} |")  # fmt: skip
    return "\n".join(rows)


def load_once(args: argparse.Namespace, lm_url: str | None) -> dict:
    server = Server(args.model, args.queue, lm_url)
    qs = questions()
    try:
        results = [dict() for _ in range(args.clients)]
        threads = [threading.Thread(target=session, args=(server.url, args.turns, qs, 7 * i, results[i]))
                   for i in range(args.clients)]  # fmt: skip
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.timeout_s)
        wall = time.perf_counter() - t0
        hung = sum(t.is_alive() for t in threads)
    finally:
        server.close()
    latencies = [x for r in results for x in r.get("latencies", [])]
    errors = Counter(e for r in results for e in r.get("errors", []))
    turns = [t for r in results if r.get("export") for t in r["export"]["turns"]]
    ttfa = [t["timings"]["time_to_first_audio_ms"] for t in turns if t["timings"].get("time_to_first_audio_ms")]
    rtf = [t["timings"]["real_time_factor"] for t in turns if t["timings"].get("real_time_factor")]
    own = all(
        r.get("export") is None or [t["question_audio"] for t in r["export"]["turns"]] == r["asked"] for r in results
    )
    return {
        "lm": lm_url or "local", "clients": args.clients, "turns_each": args.turns, "queue": args.queue,
        "completed_turns": len(latencies), "hung_clients": hung, "errors": dict(errors),
        "turn_latency_s": {"p50": round(pct(latencies, 50), 3), "p95": round(pct(latencies, 95), 3)},
        "time_to_first_audio_ms": {"p50": round(pct(ttfa, 50), 1), "p95": round(pct(ttfa, 95), 1)},
        "real_time_factor": {"p50": round(pct(rtf, 50), 3), "p95": round(pct(rtf, 95), 3)},
        "turns_per_minute": round(60 * len(latencies) / wall, 1), "wall_s": round(wall, 1),
        "each_session_sees_only_its_own_turns": own,
    }  # fmt: skip


def soak(args: argparse.Namespace) -> dict:
    from speechgpt_app.ui import RETENTION_SECONDS

    server = Server(args.model, args.queue)
    qs = questions()
    rss, errors, done = [], Counter(), 0
    try:
        for i in range(args.sessions):
            out: dict = {}
            session(server.url, args.turns, qs, 11 * i, out)
            done += len(out["latencies"])
            errors.update(out["errors"])
            rss.append(round(server.rss_mib(), 1))
            print(f"[soak] session {i + 1}/{args.sessions}: {done} turns, RSS {rss[-1]} MiB", flush=True)
        time.sleep(args.settle_s)  # closed sessions' unload handlers run
        dirs = server.files_dirs()
        left = [p for d in dirs for p in d.iterdir() if p.is_dir()]
        old = [f for d in dirs for f in d.rglob("*") if f.is_file() and time.time() - f.stat().st_mtime > RETENTION_SECONDS]
    finally:
        server.close()
    warm = rss[min(args.warmup, len(rss) - 1)]
    return {
        "mode": "soak", "sessions": args.sessions, "turns_each": args.turns, "completed_turns": done,
        "errors": dict(errors), "rss_mib": rss, "rss_after_warmup_mib": warm, "rss_last_mib": rss[-1],
        "rss_growth_after_warmup_pct": round(100 * (rss[-1] - warm) / warm, 2),
        "session_folders_left": len(left), "files_older_than_retention": len(old),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("load", "soak"))
    p.add_argument("--model", default=None, help="bundle for the app (default: the shipped SpeechGPT-tiny)")
    p.add_argument("--lm", choices=("local", "vllm", "both"), default="both",
                   help="load: the language model in the app, on vLLM (started here unless --lm-url), or both")
    p.add_argument("--lm-url", default=None, help="load: a running vLLM server to use for the vllm path")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--turns", type=int, default=None, help="turns per session (load: 3, soak: 10)")
    p.add_argument("--queue", type=int, default=20, help="the app's queue length")
    p.add_argument("--sessions", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3, help="soak: sessions before the memory baseline")
    p.add_argument("--settle-s", type=float, default=15.0, help="soak: wait for closed sessions' unload")
    p.add_argument("--timeout-s", type=float, default=900.0, help="load: give up on a client after this long")
    args = p.parse_args(argv)
    args.turns = args.turns or (3 if args.mode == "load" else 10)
    result = (load if args.mode == "load" else soak)(args)
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    print(json.dumps(result, indent=2))
    if "table" in result:
        print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
