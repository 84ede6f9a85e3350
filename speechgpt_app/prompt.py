"""The prompt: system prompt, user messages, answer strings and the history within the context budget.

Everything here is exact to the character (REFERENCE.md §3): the released model was trained on these
strings, and the training data builder (`training/data/`) writes its records by calling this module, so
the app and the training data can never drift apart.

One exchange is `[Human]: {user} <eoh>. [SpeechGPT]: {assistant}`, where the assistant text ends with
`<eoa>`. An inference prompt is

    SYSTEM_PROMPT + (earlier exchange + TURN_SEPARATOR) * n + current exchange without an assistant

The turn separator is a newline, for the same reason SYSTEM_PROMPT ends with one: the prompt text
stays readable and every `[Human]` starts a line. It costs no tokens and changes no token: `[Human]`
is an added token that strips the whitespace on its left (as the released transformers-4.33 slow
tokenizer did, and vocab.extend_tokenizer reproduces), so `<eoa>\n[Human]` and `<eoa>[Human]` encode
to the same ids, exactly as the system prompt's final newline vanishes before the first `[Human]`
(checked on tests/lm_fixtures.py's released-layout tokenizer).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from speechgpt_app.units import EOSP, SOSP, text_to_units, units_to_text
from speechgpt_app.vocab import STAGE1_SPECIAL, STAGE2_TOKENS

SYSTEM_PROMPT = (
    "You are an AI assistant whose name is SpeechGPT.\n"
    "- SpeechGPT is a intrinsic cross-modal conversational language model that is developed by Fudan "
    "University.  SpeechGPT can understand and communicate fluently with human through speech or text "
    "chosen by the user.\n"
    "- It can perceive cross-modal inputs and generate cross-modal outputs.\n"
)

TURN_SEPARATOR = "\n"  # between an earlier exchange's `<eoa>` and the next `[Human]` (see module docstring)

Task = Literal["chat", "transcribe", "speak"]
OutputMode = Literal["speech+text", "text"]
PromptStyle = Literal["released", "explicit"]
TASKS: tuple[str, ...] = get_args(Task)
OUTPUT_MODES: tuple[str, ...] = get_args(OutputMode)
PROMPT_STYLES: tuple[str, ...] = get_args(PromptStyle)

# Our own wording for the ASR/TTS-style requests (REFERENCE.md §3: instruction + "This is input: " + input).
ASR_INSTRUCTION = "Transcribe the following speech into text."
TTS_INSTRUCTION = "Read the following text aloud."
INPUT_MARKER = " This is input: "

# The `explicit` style (models trained here) says which modality the answer must use; the released
# model never saw these, so the `released` style sends the bare input as its training data did.
OUTPUT_INSTRUCTIONS: dict[str, str] = {
    "speech+text": "Answer in speech.",
    "text": "Answer in text.",
}

# The chain-of-modality separators the model writes (spelled with ordinary text pieces, not added tokens).
HEARD_TAG = "[tq]"
ANSWER_TAG = "[ta]"
UNITS_TAG = "[ua]"
EOA = "<eoa>"
ANSWER_SEPARATOR = f"; {ANSWER_TAG} "
UNITS_SEPARATOR = f"; {UNITS_TAG} "

# What typed text may not contain: an added token (the tokenizer would turn it into a unit or a turn
# marker); what answer text may not contain: those and the chain-of-modality markers the parser splits on.
_ADDED = [*STAGE1_SPECIAL, *STAGE2_TOKENS]
_ADDED_TOKEN = re.compile("|".join(map(re.escape, _ADDED)) + r"|<\d+>")
_MARKER = re.compile("|".join(map(re.escape, [*_ADDED, HEARD_TAG, ANSWER_TAG, UNITS_TAG, EOA])) + r"|<\d+>")
_UNIT_SPAN = re.compile(f"{SOSP}.*?{EOSP}", re.S)
# An answer's speech part: "; [ua] <sosp>...<eosp>" with the spacing variants the parser accepts.
_ANSWER_UNITS = re.compile(rf"\s*;?\s*{re.escape(UNITS_TAG)}\s*{SOSP}.*?{EOSP}", re.S)


def without_added_tokens(text: str) -> str:
    """`text` with every unit span and added token replaced by a space: what a base tokenizer may be
    trained on (units and turn markers become added tokens of their own in stages 1-2)."""
    return _ADDED_TOKEN.sub(" ", _UNIT_SPAN.sub(" ", text))


@dataclass(frozen=True)
class Notice:
    """Something the user or researcher should know: `kind` is a stable slug, e.g. "history_trimmed"."""

    kind: str
    message: str
    t_ms: float = field(default=0.0, compare=False)


class PromptError(ValueError):
    """A request, history turn or answer that cannot be written as a SpeechGPT prompt."""


class PromptTooLongError(PromptError):
    """The current input alone does not fit the token budget."""


@dataclass(frozen=True)
class Turn:
    """One finished exchange, as the history keeps it.

    `user` is the exact user string placed in the prompt, `assistant` the exact answer text including
    the final `<eoa>`, `heard` the transcript of a spoken question (lets the history budget replace the
    question's units by its words; None when unknown or the question was typed).
    """

    user: str
    assistant: str
    heard: str | None = None

    def __post_init__(self) -> None:
        if not self.user.strip():
            raise PromptError("a history turn has an empty user message")
        if not self.assistant.endswith(EOA):
            raise PromptError(
                f"a history turn's answer must end with {EOA} (it ends {self.assistant[-20:]!r})"
            )


@dataclass(frozen=True)
class PromptPlan:
    """What `build_prompt` decided.

    `kept_turns` are the history turns as written into `text` (possibly shortened); they are the newest
    `len(kept_turns)` turns of the history, in order.
    """

    text: str
    notices: tuple[Notice, ...]
    kept_turns: tuple[Turn, ...]


def format_exchange(user: str, assistant: str | None = None) -> str:
    """One exchange: `[Human]: {user} <eoh>. [SpeechGPT]: ` followed by `assistant` when given."""
    return f"[Human]: {user} <eoh>. [SpeechGPT]: " + (assistant or "")


def format_history(turns: Sequence[Turn]) -> str:
    """The earlier exchanges of a conversation, each followed by TURN_SEPARATOR."""
    return "".join(format_exchange(t.user, t.assistant) + TURN_SEPARATOR for t in turns)


def format_prompt(user: str, history: Sequence[Turn] = ()) -> str:
    """The whole inference prompt: system prompt, history, and the current exchange awaiting the answer."""
    return SYSTEM_PROMPT + format_history(history) + format_exchange(user)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PromptError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def _check_typed_text(text: str) -> None:
    if not text.strip():
        raise PromptError("the text is empty")
    found = _ADDED_TOKEN.search(text)
    if found:
        raise PromptError(
            f"the text contains {found.group()!r}, which the model reads as a special token; remove it"
        )


def _check_unit_string(units: str) -> None:
    try:
        ids = text_to_units(units)
    except ValueError as e:
        raise PromptError(f"units must be a unit string like '<sosp><661><588><eosp>': {e}") from None
    if not ids:
        raise PromptError("the unit string holds no units")


def user_message(
    task: Task,
    output: OutputMode = "speech+text",
    *,
    units: str | None = None,
    text: str | None = None,
    style: PromptStyle = "released",
) -> str:
    """The user string of one request (what goes between `[Human]: ` and ` <eoh>`).

    - chat: exactly one of `units` (a spoken question) or `text` (a typed one). The `released` style
      sends it bare, as the released model was trained; the `explicit` style appends the answer's
      modality, e.g. `"<sosp>...<eosp> (Answer in speech.)"`.
    - transcribe: `units` -> `ASR_INSTRUCTION + " This is input: " + units`.
    - speak: `text` -> `TTS_INSTRUCTION + " This is input: " + text`.
    `output` only shapes chat requests: a transcript is text and spoken text is speech whatever it says.
    """
    _check_choice("task", task, TASKS)
    _check_choice("output mode", output, OUTPUT_MODES)
    _check_choice("prompt style", style, PROMPT_STYLES)
    if units is not None:
        _check_unit_string(units)
    if text is not None:
        _check_typed_text(text)
    if task == "chat":
        if (units is None) == (text is None):
            raise PromptError("a chat request needs exactly one of speech units or text")
        content = units if units is not None else text
        return content if style == "released" else f"{content} ({OUTPUT_INSTRUCTIONS[output]})"
    if task == "transcribe":
        if units is None or text is not None:
            raise PromptError("a transcribe request needs speech units and no text")
        return ASR_INSTRUCTION + INPUT_MARKER + units
    if units is not None or text is None:
        raise PromptError("a speak request needs text and no speech units")
    return TTS_INSTRUCTION + INPUT_MARKER + text


def _check_answer_text(name: str, value: str) -> None:
    if not value.strip():
        raise PromptError(f"{name} is empty")
    if value != value.strip():
        raise PromptError(f"{name} has leading or trailing whitespace; strip it first")
    found = _MARKER.search(value)
    if found:
        raise PromptError(f"{name} contains {found.group()!r}, a marker of the answer format; remove it")


def format_answer(
    heard: str | None = None, answer: str | None = None, units: Sequence[int] | None = None
) -> str:
    """The full assistant text of one chain-of-modality answer, ending with `<eoa>`.

    | given                  | format                                                  |
    | ---------------------- | ------------------------------------------------------- |
    | heard, answer, units   | `{heard}; [ta] {answer}; [ua] <sosp>...<eosp><eoa>` (speech -> speech) |
    | heard, answer          | `{heard}; [ta] {answer}<eoa>` (speech -> text)          |
    | answer, units          | `[ta] {answer}; [ua] <sosp>...<eosp><eoa>` (text -> speech) |
    | answer                 | `[ta] {answer}<eoa>` (text -> text)                     |
    | heard                  | `{heard}<eoa>` (an ASR-style record: the transcript)    |
    | units                  | `<sosp>...<eosp><eoa>` (a TTS-style record)             |
    """
    if heard is not None:
        _check_answer_text("the transcript", heard)
    if answer is not None:
        _check_answer_text("the answer", answer)
    if units is not None:
        if len(units) == 0:
            raise PromptError("the answer units are empty")
    speech = units_to_text(units) if units is not None else None
    if answer is None:
        if (heard is None) == (speech is None):
            raise PromptError("without a text answer, give either a transcript (ASR) or units (TTS)")
        return (heard if heard is not None else speech) + EOA
    text = f"{heard}{ANSWER_SEPARATOR}{answer}" if heard is not None else f"{ANSWER_TAG} {answer}"
    return text + (UNITS_SEPARATOR + speech if speech is not None else "") + EOA


def assistant_prefix_for(task: Task, heard: str) -> str:
    """The forced start of a regenerated chat answer: the corrected transcript, then `; [ta] `.

    Only chat answers have a transcript to correct; for the other tasks the transcript is the whole
    answer (transcribe) or there is none (speak).
    """
    _check_choice("task", task, TASKS)
    if task != "chat":
        raise PromptError(f"only chat answers can be regenerated from a transcript, not {task!r}")
    _check_answer_text("the transcript", heard)
    return heard + ANSWER_SEPARATOR


def _without_answer_units(turn: Turn) -> Turn | None:
    """The turn with its answer's `; [ua] <sosp>...<eosp>` removed, or None if there is nothing to remove.

    Only answers that keep a text answer (`[ta]`) lose their units: a speech-only answer would be empty.
    """
    found = _ANSWER_UNITS.search(turn.assistant)
    if found is None or ANSWER_TAG not in turn.assistant[: found.start()]:
        return None
    return replace(turn, assistant=turn.assistant[: found.start()] + turn.assistant[found.end() :])


def _with_question_transcribed(turn: Turn) -> Turn | None:
    """The turn with its question's unit string replaced by its transcript, or None if impossible."""
    if turn.heard is None or not turn.heard.strip() or not _UNIT_SPAN.search(turn.user):
        return None
    return replace(turn, user=_UNIT_SPAN.sub(lambda _: turn.heard, turn.user))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def build_prompt(
    user: str, history: Sequence[Turn], count_tokens: Callable[[str], int], budget: int
) -> PromptPlan:
    """The inference prompt for `user` after `history`, within `budget` tokens.

    `budget` is the context length minus the room reserved for the answer. While the prompt is too long,
    the history shrinks in this order, oldest turn first at each step: (1) drop the answer units of
    turns that keep a text answer, (2) replace spoken questions' unit strings by their transcript (when
    `heard` is known), (3) drop whole turns. The current input is never altered: if it does not fit
    with the system prompt alone, `PromptTooLongError` is raised. Each step taken is reported by a
    `Notice` (`history_units_dropped`, `history_units_transcribed`, `history_trimmed`) counting only the
    turns still in the prompt.
    """
    if budget <= 0:
        raise PromptError(f"the token budget must be positive, got {budget}")
    alone = count_tokens(format_prompt(user))
    if alone > budget:
        raise PromptTooLongError(
            f"the input takes {alone} tokens with the system prompt, more than the {budget} tokens the "
            "context leaves for it; use a shorter recording or text"
        )
    turns = list(history)
    units_dropped = [False] * len(turns)
    transcribed = [False] * len(turns)

    def fits() -> bool:
        return count_tokens(format_prompt(user, turns)) <= budget

    for flags, shorten in ((units_dropped, _without_answer_units), (transcribed, _with_question_transcribed)):
        for i in range(len(turns)):
            if fits():
                break
            shorter = shorten(turns[i])
            if shorter is not None:
                turns[i], flags[i] = shorter, True
    n_dropped = 0
    while not fits():  # terminates: with no turns left the prompt is the input alone, which fits
        n_dropped += 1
        turns = turns[1:]
    notices = []
    kept = slice(n_dropped, None)
    if n_units := sum(units_dropped[kept]):
        notices.append(
            Notice(
                "history_units_dropped",
                f"Dropped the answer speech units of {_plural(n_units, 'earlier turn')} "
                f"to fit the {budget}-token budget.",
            )
        )
    if n_words := sum(transcribed[kept]):
        notices.append(
            Notice(
                "history_units_transcribed",
                f"Replaced the spoken question of {_plural(n_words, 'earlier turn')} by its transcript "
                f"to fit the {budget}-token budget.",
            )
        )
    if n_dropped:
        notices.append(
            Notice(
                "history_trimmed",
                f"Dropped the {_plural(n_dropped, 'oldest earlier turn')} ({len(turns)} kept) "
                f"to fit the {budget}-token budget.",
            )
        )
    return PromptPlan(format_prompt(user, turns), tuple(notices), tuple(turns))
