"""Phoneme targets for the unit encoder: espeak-ng's phoneme mnemonics of a text (`espeak-ng -q -x`).

The targets depend on the text only (always the en-us voice), never on who spoke it: that is what
makes the encoder's units speaker-invariant. Stress marks are dropped (they would double the
inventory for a difference the vocoder can model from context); pauses are dropped too.
"""

from __future__ import annotations

import subprocess

_STRIP = str.maketrans("", "", "',;")  # primary and secondary stress, palatalisation
# espeak-ng's allophone variants, merged into the phoneme they vary: a listener (and the encoder)
# cannot tell most of them apart, and each one kept would be a unit with little data.
MERGE = {"@2": "@", "I#": "I", "I2": "I", "t#": "t", "t2": "t", "a#": "a", "aI3": "aI", "i@3": "i@",
         "r-": "r", "O2": "O:", "3": "@"}  # fmt: skip


def _symbols(line: str) -> tuple[str, ...]:
    out: list[str] = []
    for word in line.split():
        for sym in word.translate(_STRIP).split("_"):
            if sym and not set(sym) <= {":", "_"}:
                out.append(MERGE.get(sym, sym))
    return tuple(out)


def _espeak(text: str) -> str:
    proc = subprocess.run(
        ["espeak-ng", "-q", "-x", "--sep=_", "-v", "en-us"],
        input=text.encode(), capture_output=True, check=True, timeout=600,
    )  # fmt: skip
    return proc.stdout.decode()


_CACHE: dict[str, tuple[str, ...]] = {}


def phonemes(text: str) -> tuple[str, ...]:
    """`text` as a tuple of espeak-ng phoneme symbols (en-us), e.g. "seven" -> ('s', 'E', 'v', '@', 'n')."""
    if text not in _CACHE:
        _CACHE[text] = _symbols(_espeak(text))
    return _CACHE[text]


def phonemise_all(texts: list[str]) -> None:
    """Phonemise many texts in one espeak-ng call (one output line per input line; texts without
    punctuation or newlines), filling the cache `phonemes` reads."""
    todo = [t for t in dict.fromkeys(texts) if t not in _CACHE]
    if not todo:
        return
    if any("\n" in t or any(c in t for c in ".,;:!?") for t in todo):
        raise ValueError("phonemise_all takes texts without punctuation or newlines")
    lines = _espeak("\n".join(todo)).splitlines()
    if len(lines) != len(todo):
        raise RuntimeError(f"espeak-ng returned {len(lines)} lines for {len(todo)} texts")
    _CACHE.update(zip(todo, map(_symbols, lines)))


def inventory(texts: list[str]) -> list[str]:
    """Every phoneme symbol the texts use, sorted: the unit inventory (unit id = index)."""
    phonemise_all(texts)
    return sorted({p for t in texts for p in phonemes(t)})
