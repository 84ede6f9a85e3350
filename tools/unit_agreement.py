"""How speaker-invariant a speech tokenizer's units are: normalised edit distance between the
deduplicated units of the same text spoken by two voices, against unrelated pairs (lower is better).

    python tools/unit_agreement.py --corpus runs/mini/corpus --units runs/mini/data/units.jsonl

Pairs: two training voices saying the same text; a training voice and the held-out Piper voice (joe)
saying the same held-out text; two different texts (the floor of chance agreement in this grammar).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import defaultdict
from pathlib import Path

from speechgpt_app.evaluate import edit_distance


def ned(a: list[int], b: list[int]) -> float:
    """Edit distance over the longer length."""
    return edit_distance(a, b) / max(1, len(a), len(b))


def agreement(corpus: Path, units_file: Path, pairs: int = 300, seed: int = 0) -> dict[str, float]:
    """Median normalised edit distance per kind of pair."""
    units = {d["audio"]: d["units"] for d in map(json.loads, units_file.read_text().splitlines())}
    rng = random.Random(seed)
    said: dict[str, list[tuple[str, list[int]]]] = defaultdict(list)
    for part in ("questions", "heldout"):
        for e in map(json.loads, (corpus / f"{part}.jsonl").read_text().splitlines()):
            if e["audio"] in units:
                said[e["text"]].append((e["voice"], units[e["audio"]]))
    same = [t for t, v in said.items() if len({x for x, _ in v if not x.startswith("piper")}) >= 2]
    joe = [t for t, v in said.items() if any(x.startswith("piper") for x, _ in v) and len(v) >= 2]
    texts = list(said)
    out: dict[str, list[float]] = defaultdict(list)
    for _ in range(pairs):
        if same:
            v = [u for x, u in said[rng.choice(same)] if not x.startswith("piper")]
            a, b = rng.sample(v, 2)
            out["two training voices, same text"].append(ned(a, b))
        if joe:
            v = said[rng.choice(joe)]
            a = next(u for x, u in v if x.startswith("piper"))
            b = next(u for x, u in v if not x.startswith("piper"))
            out["training voice vs Piper joe, same text"].append(ned(a, b))
        t1, t2 = rng.sample(texts, 2)
        out["unrelated texts"].append(ned(said[t1][0][1], said[t2][0][1]))
    return {k: round(statistics.median(v), 3) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=Path("runs/mini/corpus"))
    p.add_argument("--units", type=Path, default=Path("runs/mini/data/units.jsonl"))
    p.add_argument("--pairs", type=int, default=300)
    args = p.parse_args()
    print(json.dumps(agreement(args.corpus, args.units, args.pairs), indent=2))


if __name__ == "__main__":
    main()
