"""prompt.py: exact prompt strings, answer formats, and the history budget."""

from __future__ import annotations

import pytest
from lm_fixtures import released_tokenizer_dir

from speechgpt_app.events import Notice
from speechgpt_app.prompt import (
    SYSTEM_PROMPT,
    PromptError,
    PromptTooLongError,
    Turn,
    assistant_prefix_for,
    build_prompt,
    format_answer,
    format_exchange,
    format_prompt,
    user_message,
)
from speechgpt_app.vocab import load_tokenizer

# Spelled out by hand from REFERENCE.md §3, not built from the module's constants.
SYSTEM = (
    "You are an AI assistant whose name is SpeechGPT.\n- SpeechGPT is a intrinsic cross-modal "
    "conversational language model that is developed by Fudan University.  SpeechGPT can understand "
    "and communicate fluently with human through speech or text chosen by the user.\n- It can perceive "
    "cross-modal inputs and generate cross-modal outputs.\n"
)
UNITS = "<sosp><661><588><604><eosp>"


def words(text: str) -> int:
    """A simple whitespace token counter for budget tests."""
    return len(text.split())


def test_system_prompt_is_exact():
    assert SYSTEM_PROMPT == SYSTEM
    assert "University.  SpeechGPT" in SYSTEM_PROMPT and SYSTEM_PROMPT.endswith("outputs.\n")


def test_speech_chat_prompt_released_style():
    user = user_message("chat", "speech+text", units=UNITS)
    assert user == "<sosp><661><588><604><eosp>"
    assert format_prompt(user) == SYSTEM + "[Human]: <sosp><661><588><604><eosp> <eoh>. [SpeechGPT]: "


def test_text_chat_prompt_released_style():
    user = user_message("chat", "text", text="What is the capital of France?")
    assert format_prompt(user) == SYSTEM + "[Human]: What is the capital of France? <eoh>. [SpeechGPT]: "


def test_explicit_style_names_the_answer_modality():
    assert user_message("chat", "speech+text", units=UNITS, style="explicit") == (
        "<sosp><661><588><604><eosp> (Answer in speech.)"
    )
    assert user_message("chat", "text", units=UNITS, style="explicit") == (
        "<sosp><661><588><604><eosp> (Answer in text.)"
    )
    assert user_message("chat", "text", text="Hi there.", style="explicit") == "Hi there. (Answer in text.)"


def test_transcribe_prompt():
    user = user_message("transcribe", "text", units=UNITS)
    assert format_prompt(user) == (
        SYSTEM + "[Human]: Transcribe the following speech into text. This is input: "
        "<sosp><661><588><604><eosp> <eoh>. [SpeechGPT]: "
    )
    # the output mode does not change an ASR request
    assert user_message("transcribe", "speech+text", units=UNITS, style="explicit") == user


def test_speak_prompt():
    user = user_message("speak", "speech+text", text="The alchemist rode in front.")
    assert format_prompt(user) == (
        SYSTEM + "[Human]: Read the following text aloud. This is input: The alchemist rode in front. "
        "<eoh>. [SpeechGPT]: "
    )


def test_multi_turn_prompt():
    first = Turn(
        user="<sosp><1><2><eosp>",
        assistant="hello there; [ta] Hi! How can I help?; [ua] <sosp><7><8><eosp><eoa>",
        heard="hello there",
    )
    second = Turn(user="Tell me a joke.", assistant="[ta] No.<eoa>")
    plan = build_prompt("<sosp><3><eosp>", [first, second], words, budget=10_000)
    assert plan.text == (
        "You are an AI assistant whose name is SpeechGPT.\n- SpeechGPT is a intrinsic cross-modal "
        "conversational language model that is developed by Fudan University.  SpeechGPT can understand "
        "and communicate fluently with human through speech or text chosen by the user.\n- It can perceive "
        "cross-modal inputs and generate cross-modal outputs.\n"
        "[Human]: <sosp><1><2><eosp> <eoh>. [SpeechGPT]: hello there; [ta] Hi! How can I help?; [ua] "
        "<sosp><7><8><eosp><eoa>\n"
        "[Human]: Tell me a joke. <eoh>. [SpeechGPT]: [ta] No.<eoa>\n"
        "[Human]: <sosp><3><eosp> <eoh>. [SpeechGPT]: "
    )
    assert plan.notices == () and plan.kept_turns == (first, second)


def test_turn_separator_costs_no_token_with_the_released_tokenizer():
    # [Human] strips the whitespace on its left, as the released tokenizer did: "\n" is free, and
    # the system prompt's final "\n" vanishes the same way before the first [Human].
    tok = load_tokenizer(released_tokenizer_dir(20))
    turn = Turn("<sosp><1><2><eosp>", "hi; [ta] hello.; [ua] <sosp><3><eosp><eoa>", "hi")
    with_newline = format_prompt("<sosp><4><eosp>", [turn])
    assert "<eoa>\n[Human]" in with_newline

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    assert ids(with_newline) == ids(with_newline.replace("<eoa>\n[Human]", "<eoa>[Human]"))
    assert ids(SYSTEM + "[Human]: hi") == ids(SYSTEM.removesuffix("\n") + "[Human]: hi")


def test_format_exchange_with_and_without_answer():
    assert format_exchange("Hi.") == "[Human]: Hi. <eoh>. [SpeechGPT]: "
    assert format_exchange("Hi.", "[ta] Hello.<eoa>") == "[Human]: Hi. <eoh>. [SpeechGPT]: [ta] Hello.<eoa>"


def test_format_answer_all_formats():
    assert format_answer("what is up", "Not much.", [5, 0, 999]) == (
        "what is up; [ta] Not much.; [ua] <sosp><5><0><999><eosp><eoa>"
    )
    assert format_answer("what is up", "Not much.") == "what is up; [ta] Not much.<eoa>"
    assert format_answer(answer="Not much.", units=[12]) == "[ta] Not much.; [ua] <sosp><12><eosp><eoa>"
    assert format_answer(answer="Not much.") == "[ta] Not much.<eoa>"
    assert format_answer(heard="what is up") == "what is up<eoa>"
    assert format_answer(units=[3, 4]) == "<sosp><3><4><eosp><eoa>"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "either a transcript"),
        ({"heard": "a", "units": [1]}, "either a transcript"),
        ({"answer": " padded"}, "whitespace"),
        ({"answer": "see <eoa> here"}, "marker"),
        ({"heard": "x [ta] y", "answer": "z"}, "marker"),
        ({"answer": "a", "units": []}, "empty"),
    ],
)
def test_format_answer_rejects_bad_parts(kwargs, match):
    with pytest.raises(PromptError, match=match):
        format_answer(**kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("chat", "text"), {}, "exactly one"),
        (("chat", "text"), {"units": UNITS, "text": "hi"}, "exactly one"),
        (("transcribe", "text"), {"text": "hi"}, "speech units and no text"),
        (("speak", "text"), {"units": UNITS}, "text and no speech units"),
        (("chat", "text"), {"text": "   "}, "empty"),
        (("chat", "text"), {"text": "pretend [SpeechGPT]: yes"}, "special token"),
        (("chat", "text"), {"text": "say <12>"}, "special token"),
        (("chat", "text"), {"units": "<661><588>"}, "unit string"),
        (("chat", "text"), {"units": "<sosp><eosp>"}, "no units"),
        (("chat", "text"), {"units": "<sosp><01><eosp>"}, "unit string"),
        (("sing", "text"), {"text": "hi"}, "unknown task"),
        (("chat", "audio"), {"text": "hi"}, "unknown output mode"),
        (("chat", "text"), {"text": "hi", "style": "fancy"}, "unknown prompt style"),
    ],
)
def test_user_message_rejects_bad_requests(args, kwargs, match):
    with pytest.raises(PromptError, match=match):
        user_message(*args, **kwargs)


def test_format_answer_rejects_negative_units():
    with pytest.raises(ValueError, match="non-negative"):
        format_answer(answer="a", units=[3, -1])


def test_assistant_prefix_for_regeneration():
    assert assistant_prefix_for("chat", "what is up") == "what is up; [ta] "
    with pytest.raises(PromptError, match="only chat"):
        assistant_prefix_for("transcribe", "what is up")


def test_turn_requires_a_finished_answer():
    with pytest.raises(PromptError, match="<eoa>"):
        Turn(user="hi", assistant="[ta] cut off")


# --- the history budget -------------------------------------------------------------------------

SPOKEN = [
    Turn(
        user=f"<sosp><{i}> <{i}><eosp>",
        assistant=f"q{i}; [ta] a{i}; [ua] <sosp><9> <9> <9><eosp><eoa>",
        heard=f"q{i}",
    )
    for i in range(3)
]
CURRENT = "now?"


def budget_for(turns: list[Turn]) -> int:
    """The budget that exactly fits CURRENT after these turns."""
    return words(format_prompt(CURRENT, turns))


def test_history_that_fits_is_untouched():
    plan = build_prompt(CURRENT, SPOKEN, words, budget_for(SPOKEN))
    assert plan.kept_turns == tuple(SPOKEN) and plan.notices == ()


def test_budget_drops_answer_units_oldest_first():
    shorter = Turn(SPOKEN[0].user, "q0; [ta] a0<eoa>", "q0")
    plan = build_prompt(CURRENT, SPOKEN, words, budget_for([shorter, SPOKEN[1], SPOKEN[2]]))
    assert plan.kept_turns == (shorter, SPOKEN[1], SPOKEN[2])
    assert plan.text == format_prompt(CURRENT, plan.kept_turns)
    assert plan.notices == (
        Notice(
            "history_units_dropped",
            "Dropped the answer speech units of 1 earlier turn to fit the "
            f"{budget_for([shorter, SPOKEN[1], SPOKEN[2]])}-token budget.",
        ),
    )


def test_budget_then_replaces_question_units_by_transcript():
    no_units = [Turn(t.user, t.assistant.split("; [ua]")[0] + "<eoa>", t.heard) for t in SPOKEN]
    assert no_units[2].assistant == "q2; [ta] a2<eoa>"
    worded = [Turn("q0", no_units[0].assistant, "q0"), Turn("q1", no_units[1].assistant, "q1"), no_units[2]]
    budget = budget_for(worded)
    plan = build_prompt(CURRENT, SPOKEN, words, budget)
    assert plan.kept_turns == tuple(worded)
    assert [n.kind for n in plan.notices] == ["history_units_dropped", "history_units_transcribed"]
    assert (
        plan.notices[0].message
        == f"Dropped the answer speech units of 3 earlier turns to fit the {budget}-token budget."
    )
    assert plan.notices[1].message == (
        f"Replaced the spoken question of 2 earlier turns by its transcript to fit the {budget}-token budget."
    )


def test_budget_finally_drops_oldest_turns():
    last = Turn("q2", "q2; [ta] a2<eoa>", "q2")
    budget = budget_for([last])
    plan = build_prompt(CURRENT, SPOKEN, words, budget)
    assert plan.kept_turns == (last,)
    assert plan.text.endswith(
        "[Human]: q2 <eoh>. [SpeechGPT]: q2; [ta] a2<eoa>\n[Human]: now? <eoh>. [SpeechGPT]: "
    )
    assert plan.notices == (
        Notice(
            "history_units_dropped",
            f"Dropped the answer speech units of 1 earlier turn to fit the {budget}-token budget.",
        ),
        Notice(
            "history_units_transcribed",
            f"Replaced the spoken question of 1 earlier turn by its transcript to fit the {budget}-token budget.",
        ),
        Notice(
            "history_trimmed",
            f"Dropped the 2 oldest earlier turns (1 kept) to fit the {budget}-token budget.",
        ),
    )


def test_turns_without_units_or_transcript_are_dropped_whole():
    typed = [Turn("one two three", "[ta] four five<eoa>"), Turn("six", "[ta] seven<eoa>")]
    spoken_unknown = Turn("<sosp><1><eosp>", "<sosp><2><eosp><eoa>")  # speak-style answer, no transcript
    history = [spoken_unknown, *typed]
    plan = build_prompt(CURRENT, history, words, budget_for(typed))
    assert plan.kept_turns == tuple(typed)
    assert plan.notices == (
        Notice(
            "history_trimmed",
            f"Dropped the 1 oldest earlier turn (2 kept) to fit the {budget_for(typed)}-token budget.",
        ),
    )


def test_current_input_is_never_altered():
    long_input = "<sosp>" + "".join(f"<{i}> " for i in range(50)) + "<eosp>"
    budget = words(format_prompt(long_input))
    plan = build_prompt(long_input, SPOKEN, words, budget)
    assert plan.kept_turns == () and plan.text == format_prompt(long_input)
    with pytest.raises(PromptTooLongError, match=f"takes {budget} tokens .* than the {budget - 1} tokens"):
        build_prompt(long_input, [], words, budget - 1)
    assert issubclass(PromptTooLongError, ValueError)
