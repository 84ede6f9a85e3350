"""SpeechInstruct-mini: a small spoken domain whose every held-out answer follows from training.

Seven kinds of question, each a template over a small world: arithmetic (numbers up to 20; products
up to 10 x 10), capitals of 40 countries, opposites, counting (what comes after / before a number),
spelling, days and months, and follow-ups that only make sense with the previous turn ("and what is
that times two?", "and of Spain?"). Answers restate the question ("seven plus five is twelve"), so a
spoken answer carries its key fact.

Held out (never trained, only evaluated): whole arithmetic pairs (the model must compute), and for the
other kinds a (fact, phrasing) pair whose fact is trained in the other phrasings. Every question has a
`key`: the word (or number) an answer must contain to be right (`evaluate.answer_is_right`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

MAX_OPERAND = 20  # plus and minus
MAX_FACTOR = 10  # times
HELDOUT_SHARE = 0.12  # share of arithmetic pairs / (fact, phrasing) pairs never trained
# Stage 0's text also does arithmetic beyond the spoken domain (what LLaMA brings to the 7B): sums and
# differences up to 40, products up to 12 x 12 (background_arithmetic).
BACKGROUND_OPERAND = 40
BACKGROUND_FACTOR = 12


def number_words(n: int) -> str:
    """0..999 in words, as the answers say them: 42 -> "forty two", 100 -> "one hundred"."""
    if not 0 <= n < 1000:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("" if ones == 0 else " " + ONES[ones])
    hundreds, rest = divmod(n, 100)
    return ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


CAPITALS = {
    "france": "paris", "spain": "madrid", "italy": "rome", "germany": "berlin", "portugal": "lisbon",
    "japan": "tokyo", "china": "beijing", "russia": "moscow", "egypt": "cairo", "kenya": "nairobi",
    "canada": "ottawa", "mexico": "mexico city", "peru": "lima", "chile": "santiago", "cuba": "havana",
    "greece": "athens", "poland": "warsaw", "austria": "vienna", "hungary": "budapest", "ireland": "dublin",
    "norway": "oslo", "sweden": "stockholm", "finland": "helsinki", "denmark": "copenhagen",
    "belgium": "brussels", "england": "london", "scotland": "edinburgh", "wales": "cardiff",
    "turkey": "ankara", "iran": "tehran", "iraq": "baghdad", "india": "new delhi", "nepal": "kathmandu",
    "thailand": "bangkok", "vietnam": "hanoi", "korea": "seoul", "australia": "canberra",
    "argentina": "buenos aires", "colombia": "bogota", "morocco": "rabat",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "old": "young",
    "happy": "sad", "open": "closed", "full": "empty", "light": "dark", "hard": "soft", "early": "late",
    "loud": "quiet", "rich": "poor", "tall": "short", "wet": "dry", "strong": "weak", "clean": "dirty",
    "high": "low", "near": "far", "left": "right", "black": "white", "good": "bad", "thick": "thin",
    "heavy": "light", "sweet": "sour", "first": "last", "inside": "outside", "win": "lose",
    "buy": "sell", "push": "pull", "true": "false", "begin": "end", "love": "hate", "north": "south",
    "east": "west", "alive": "dead", "cheap": "expensive", "friend": "enemy", "question": "answer",
}  # fmt: skip
SPELL_WORDS = (
    "cat dog sun moon tree book fish bird milk cake frog ship star rain snow wind lamp door "
    "chair table apple bread house horse water green blue red king queen boat road hand foot "
    "nose bell duck cow pig hat cup box"
).split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()


@dataclass(frozen=True)
class Question:
    """One question of the domain.

    `text` is what is spoken; `answer` the reference answer (restating the question); `key` the fact an
    answer must contain; `kind` one of KINDS; `fact` names the underlying fact (the held-out split is
    drawn on facts and phrasings); `value` the number or word a follow-up refers to.
    """

    kind: str
    text: str
    answer: str
    key: str
    fact: str
    phrasing: int
    value: str = ""


@dataclass(frozen=True)
class Conversation:
    """A follow-up exchange: a first question, then a question that only makes sense after it."""

    first: Question
    follow: Question


KINDS = ("arithmetic", "capital", "opposite", "counting", "spelling", "calendar", "follow-up")

_ARITH = {
    "plus": ("what is {a} plus {b}", "how much is {a} plus {b}", "what do you get when you add {a} and {b}",
             "tell me {a} plus {b}"),
    "minus": ("what is {a} minus {b}", "how much is {a} minus {b}", "what do you get when you take {b} from {a}",
              "tell me {a} minus {b}"),
    "times": ("what is {a} times {b}", "how much is {a} times {b}", "what do you get when you multiply {a} by {b}",
              "tell me {a} times {b}"),
}  # fmt: skip
_CAPITAL = ("what is the capital of {x}", "which city is the capital of {x}", "name the capital of {x}",
            "tell me the capital of {x}")  # fmt: skip
_OPPOSITE = ("what is the opposite of {x}", "what is the opposite of the word {x}", "tell me the opposite of {x}")
_AFTER = ("what number comes after {x}", "which number is after {x}", "count one up from {x}")
_BEFORE = ("what number comes before {x}", "which number is before {x}", "count one down from {x}")
_SPELL = ("how do you spell {x}", "spell the word {x}", "can you spell {x}")
_DAY = ("what day comes after {x}", "which day is after {x}", "what day comes before {x}", "which day is before {x}")
_MONTH = ("what month comes after {x}", "which month is after {x}", "what month comes before {x}",
          "which month is before {x}")  # fmt: skip


def _arithmetic_question(op: str, a: int, b: int, phrasing: int) -> Question:
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    wa, wb, wv = number_words(a), number_words(b), number_words(value)
    text = _ARITH[op][phrasing].format(a=wa, b=wb)
    return Question("arithmetic", text, f"{wa} {op} {wb} is {wv}", wv, f"{op}:{a}:{b}", phrasing, str(value))


def _pairs(op: str, limit: int) -> Iterator[tuple[int, int]]:
    """(a, b) with both at most `limit` (minus: b <= a, answers are never negative)."""
    return ((a, b) for a in range(limit + 1) for b in range(limit + 1) if op != "minus" or b <= a)


def _arithmetic() -> Iterator[Question]:
    for op, phrasings in _ARITH.items():
        for a, b in _pairs(op, MAX_FACTOR if op == "times" else MAX_OPERAND):
            for i in range(len(phrasings)):
                yield _arithmetic_question(op, a, b, i)


def _capitals() -> Iterator[Question]:
    for country, city in CAPITALS.items():
        for i, p in enumerate(_CAPITAL):
            yield Question("capital", p.format(x=country), f"the capital of {country} is {city}", city, country, i, country)


def _opposites() -> Iterator[Question]:
    pairs = {**OPPOSITES, **{b: a for a, b in OPPOSITES.items() if b not in OPPOSITES}}
    for word, opposite in pairs.items():
        for i, p in enumerate(_OPPOSITE):
            yield Question("opposite", p.format(x=word), f"the opposite of {word} is {opposite}", opposite, word, i, word)


def _counting() -> Iterator[Question]:
    for n in range(0, 100):
        w = number_words(n)
        if n < 99:
            for i, p in enumerate(_AFTER):
                nxt = number_words(n + 1)
                yield Question("counting", p.format(x=w), f"after {w} comes {nxt}", nxt, f"after:{n}", i, str(n + 1))
        if n > 0:
            for i, p in enumerate(_BEFORE):
                prv = number_words(n - 1)
                yield Question("counting", p.format(x=w), f"before {w} comes {prv}", prv, f"before:{n}", i, str(n - 1))


def _spelling() -> Iterator[Question]:
    for word in SPELL_WORDS:
        letters = " ".join(word)
        for i, p in enumerate(_SPELL):
            yield Question("spelling", p.format(x=word), f"{word} is spelled {letters}", letters, word, i, word)


def _calendar() -> Iterator[Question]:
    for kind, items, phrasings in (("day", DAYS, _DAY), ("month", MONTHS, _MONTH)):
        for j, x in enumerate(items):
            for i, p in enumerate(phrasings):
                after = i < 2
                y = items[(j + 1) % len(items)] if after else items[j - 1]
                rel = "after" if after else "before"
                yield Question("calendar", p.format(x=x), f"the {kind} {rel} {x} is {y}", y, f"{kind}:{rel}:{x}", i % 2, y)


def questions() -> list[Question]:
    """Every single-turn question of the domain, in a fixed order."""
    return [*_arithmetic(), *_capitals(), *_opposites(), *_counting(), *_spelling(), *_calendar()]


def _follow_up(first: Question) -> Question | None:
    """The follow-up question that refers to `first`'s answer or topic, if its kind has one."""
    if first.kind == "arithmetic" and int(first.value) <= 40:
        v = int(first.value)
        w = number_words(v)
        return Question("follow-up", "and what is that times two", f"{w} times two is {number_words(2 * v)}",
                        number_words(2 * v), f"double:{v}", 0, str(2 * v))  # fmt: skip
    if first.kind == "capital":
        return None  # capital follow-ups pair two countries: built in conversations()
    if first.kind == "counting" and first.fact.startswith("after:") and int(first.value) < 99:
        v = int(first.value)
        w, nxt = number_words(v), number_words(v + 1)
        return Question("follow-up", "and what comes after that", f"after {w} comes {nxt}", nxt, f"after:{v}", 1, str(v + 1))
    return None


def conversations() -> list[Conversation]:
    """Two-turn exchanges whose second question needs the first: doubling a result, the next number,
    another country's capital ("and of spain"), another word's opposite ("and of big")."""
    out: list[Conversation] = []
    for q in questions():
        follow = _follow_up(q)
        if follow is not None and q.phrasing == 0:
            out.append(Conversation(q, follow))
    countries = list(CAPITALS)
    for i, country in enumerate(countries):
        for step in (1, 7):
            other = countries[(i + step) % len(countries)]
            first = Question("capital", _CAPITAL[0].format(x=country), f"the capital of {country} is {CAPITALS[country]}",
                             CAPITALS[country], country, 0, country)  # fmt: skip
            follow = Question("follow-up", f"and of {other}", f"the capital of {other} is {CAPITALS[other]}",
                              CAPITALS[other], other, 2, other)  # fmt: skip
            out.append(Conversation(first, follow))
    words = list(OPPOSITES)
    for i, word in enumerate(words):
        other = words[(i + 3) % len(words)]
        first = Question("opposite", _OPPOSITE[0].format(x=word), f"the opposite of {word} is {OPPOSITES[word]}",
                         OPPOSITES[word], word, 0, word)  # fmt: skip
        follow = Question("follow-up", f"and of {other}", f"the opposite of {other} is {OPPOSITES[other]}",
                          OPPOSITES[other], other, 3, other)  # fmt: skip
        out.append(Conversation(first, follow))
    return out


def _bucket(name: str) -> float:
    """A fixed pseudo-random number in [0, 1) for a name: the split does not depend on list order."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def is_heldout(q: Question) -> bool:
    """Held out: whole arithmetic pairs; for other kinds one (fact, phrasing) pair, its fact trained in
    the other phrasings (a fact is never held out in every phrasing)."""
    if q.kind == "arithmetic":
        return _bucket(q.fact) < HELDOUT_SHARE
    if q.kind == "follow-up":
        return _bucket("follow:" + q.fact) < HELDOUT_SHARE
    return _bucket(q.fact) < HELDOUT_SHARE * 3 and int(_bucket(q.fact + "#") * 1000) % 3 == q.phrasing % 3


def split() -> tuple[list[Question], list[Question]]:
    """(train, held-out) single-turn questions."""
    qs = questions()
    return [q for q in qs if not is_heldout(q)], [q for q in qs if is_heldout(q)]


def split_conversations() -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out) conversations: held out when either question is."""
    convs = conversations()
    held = [c for c in convs if is_heldout(c.first) or is_heldout(c.follow)]
    return [c for c in convs if c not in held], held


def all_texts() -> list[str]:
    """Every question and answer text of the domain, follow-ups included, each once."""
    qs = questions() + [q for c in conversations() for q in (c.first, c.follow)]
    return list(dict.fromkeys(t for q in qs for t in (q.text, q.answer)))


def _doubled(op: str, a: int, b: int) -> int | None:
    """The number this pair doubles (v plus v, v times two), if it is a doubling."""
    if op == "plus" and a == b:
        return a
    if op == "times" and 2 in (a, b):
        return a * b // 2
    return None


def background_arithmetic() -> list[Question]:
    """Arithmetic beyond the spoken domain for stage 0's text, one seeded phrasing per pair: sums and
    differences of numbers up to BACKGROUND_OPERAND, products up to BACKGROUND_FACTOR.

    A held-out sum must be computed, and a model that has seen 400 sums computes them poorly (held-out
    differences 31 %, text in): a base model knows arithmetic from far more pairs than it is asked. None
    of these pairs is one the domain asks (so no held-out pair is among them), nor a held-out
    follow-up's doubling (v plus v, v times two).
    """
    held_doubles = {int(c.follow.value) // 2 for c in conversations()
                    if c.follow.fact.startswith("double:") and is_heldout(c.follow)}  # fmt: skip
    out = []
    for op in _ARITH:
        small, limit = (MAX_FACTOR, BACKGROUND_FACTOR) if op == "times" else (MAX_OPERAND, BACKGROUND_OPERAND)
        for a, b in _pairs(op, limit):
            if max(a, b) <= small or _doubled(op, a, b) in held_doubles:
                continue
            out.append(_arithmetic_question(op, a, b, int(_bucket(f"{op}:{a}:{b}@") * len(_ARITH[op]))))
    return out
