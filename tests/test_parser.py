"""parser.py: every answer form of REFERENCE.md §3, malformed output, and streaming == one-shot."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lm_fixtures import released_tokenizer_dir

from speechgpt_app.events import Answer, End, Heard, Notice, Units
from speechgpt_app.parser import ChainParser, coalesce, parse
from speechgpt_app.prompt import format_answer
from speechgpt_app.vocab import load_tokenizer

N = 1000  # the released unit vocabulary


def ok(*events) -> list:
    """The expected events of a well-formed answer: the given deltas, then End("eoa") with no problems."""
    return [*events, End("eoa", ())]


# --- the forms of REFERENCE.md §3 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "what is up; [ta] Not much.; [ua] <sosp><661><588><604><eosp><eoa>",
        "[tq] what is up; [ta] Not much.; [ua] <sosp><661><588><604><eosp><eoa>",
        "[tq]what is up;[ta]Not much.;[ua]<sosp><661><588><604><eosp><eoa>",
        "  what is up ; [ta]  Not much.  ;  [ua]  <sosp> <661> <588> <604> <eosp> <eoa>",
        "what is up [ta] Not much. [ua] <sosp>\n<661><588>\n<604><eosp>\n<eoa>",
        "what is up; [ta] Not much.; [ua] <sosp> <661> <588> <604> <eosp><eoa>",
    ],
)
def test_chain_of_modality_and_spacing_variants(text):
    assert parse(text, N) == ok(Heard("what is up"), Answer("Not much."), Units((661, 588, 604)))


def test_speech_in_text_out():
    assert parse("what is up; [ta] Not much, you?<eoa>", N) == ok(
        Heard("what is up"), Answer("Not much, you?")
    )


def test_text_only_answer():
    assert parse("[ta] Paris is the capital.<eoa>", N) == ok(Answer("Paris is the capital."))


def test_text_in_speech_out():
    assert parse("[ta] Paris.; [ua] <sosp><1><2><eosp><eoa>", N) == ok(Answer("Paris."), Units((1, 2)))


def test_speech_only_answers():
    assert parse("[ua] <sosp><7><8><eosp><eoa>", N) == ok(Units((7, 8)))
    assert parse("<sosp><7><8><eosp><eoa>", N) == ok(Units((7, 8)))  # TTS-style, bare


def test_plain_text_is_a_transcript():
    assert parse("and so my fellow americans<eoa>", N) == ok(Heard("and so my fellow americans"))


def test_semicolons_and_brackets_inside_text_are_kept():
    text = "a; b ;c [x] <b> x<5; [ta] 1 [ 2 ];  3 <eoa"
    assert parse(text, N, reason="eos") == [
        Heard("a; b ;c [x] <b> x<5"),
        Answer("1 [ 2 ];  3 <eoa"),
        End("eos", ("the answer ended without <eoa> (reason: eos)",)),
    ]


def test_multibyte_text():
    assert parse("qué tal 你好; [ta] très bien 很好<eoa>", N) == ok(
        Heard("qué tal 你好"), Answer("très bien 很好")
    )


ROUND_TRIPS = [
    ("what is up", "Not much.", [5, 0, 999]),
    ("what is up", "Not much.", None),
    (None, "Not much; you? é 你", [12]),
    (None, "Not much.", None),
    ("what is up", None, None),
    (None, None, [3, 4]),
]


@pytest.mark.parametrize(("heard", "answer", "units"), ROUND_TRIPS)
def test_round_trip_with_format_answer(heard, answer, units):
    assert parse(format_answer(heard, answer, units), N) == ok(*expected_events(heard, answer, units))


@pytest.mark.parametrize(("heard", "answer", "units"), ROUND_TRIPS)
def test_answers_as_the_released_tokenizer_decodes_them(heard, answer, units):
    # Its added tokens strip the spaces around them when encoding, and decoding writes
    # "[ua]<sosp>" and "<eosp> <eoa>": the variants the parser must read.
    tok = load_tokenizer(released_tokenizer_dir(1000))
    decoded = tok.decode(tok(format_answer(heard, answer, units), add_special_tokens=False).input_ids)
    assert parse(decoded, N) == ok(*expected_events(heard, answer, units))


def expected_events(heard, answer, units) -> list:
    expected = []
    if heard is not None:
        expected.append(Heard(heard))
    if answer is not None:
        expected.append(Answer(answer))
    if units is not None:
        expected.append(Units(tuple(units)))
    return expected


# --- malformed output: keep what is usable, count what is dropped ---------------------------------


def test_units_outside_the_vocabulary_are_dropped_and_counted():
    events = parse("hi; [ta] yo; [ua] <sosp><5><1000><20><12345><99><eosp><eoa>", 100)
    assert events == [
        Heard("hi"),
        Answer("yo"),
        Units((5, 20, 99)),
        Notice("units_dropped", "dropped 2 units outside the vocabulary (0-99)"),
        End("eoa", ("dropped 2 units outside the vocabulary (0-99)",)),
    ]


def test_unknown_tokens_and_text_inside_the_unit_span():
    events = parse("<sosp><1><eoh>ab c<2></s>;<3><eosp><eoa>", N)
    assert events == [
        Units((1, 2, 3)),
        Notice("units_dropped", "dropped 2 unknown tokens inside the unit span"),
        Notice("text_dropped", "dropped 4 characters of text among the answer units"),
        End(
            "eoa",
            (
                "dropped 2 unknown tokens inside the unit span",
                "dropped 4 characters of text among the answer units",
            ),
        ),
    ]


def test_tags_out_of_order():
    text = "hi [tq] there; [ta] a; [ua] <sosp><1>[ta] b<eosp> [ta] c<eoa>"
    assert parse(text, N) == [
        Heard("hi there"),
        Answer("a"),
        Units((1,)),
        Notice("text_dropped", "dropped 1 character of text among the answer units"),
        Notice("text_dropped", "ignored 1 character of text between <eosp> and <eoa>"),
        Notice("tags_ignored", "ignored 3 misplaced tags: [tq], [ta]"),
        End(
            "eoa",
            (
                "dropped 1 character of text among the answer units",
                "ignored 1 character of text between <eosp> and <eoa>",
                "ignored 3 misplaced tags: [tq], [ta]",
            ),
        ),
    ]


def test_second_unit_block_is_dropped():
    events = parse("[ua] <sosp><1><2><eosp> [ua] <sosp><3><4><5><eosp><sosp><6><eosp><eoa>", N)
    assert events == [
        Units((1, 2)),
        Notice("units_dropped", "dropped 4 units of a second unit block"),
        End("eoa", ("dropped 4 units of a second unit block",)),
    ]


def test_missing_eosp_and_missing_sosp():
    assert parse("x; [ua] <1><2><eoa>", N) == [
        Heard("x"),
        Units((1, 2)),
        End("eoa", ("the answer units began without <sosp>", "the unit span was not closed with <eosp>")),
    ]


@pytest.mark.parametrize(
    ("reason", "problems"),
    [
        ("max_tokens", ("the answer ended without <eoa> (reason: max_tokens)",)),
        ("eos", ("the answer ended without <eoa> (reason: eos)",)),
        ("cancelled", ()),  # the user stopped it: not a fault of the model's output
    ],
)
def test_no_eoa(reason, problems):
    assert parse("heard; [ta] half an ans", N, reason=reason) == [
        Heard("heard"),
        Answer("half an ans"),
        End(reason, problems),
    ]


def test_text_after_eoa_is_ignored_and_counted():
    assert parse("[ta] yes<eoa>  \n", N) == ok(Answer("yes"))  # blank: not a problem
    assert parse("[ta] yes<eoa> [ta] and more", N) == [
        Answer("yes"),
        Notice("text_dropped", "ignored 14 characters after <eoa>"),
        End("eoa", ("ignored 14 characters after <eoa>",)),
    ]


# --- the streaming parser -------------------------------------------------------------------------


def test_streaming_holds_back_only_possible_tags():
    p = ChainParser(N)
    assert p.feed("hel") == [Heard("hel")]
    assert p.feed("lo wor") == [Heard("lo wor")]  # one feed's deltas come coalesced
    assert p.feed("ld ; [t") == [Heard("ld")]  # " ; [t" may be the separator
    assert p.state == "heard"
    assert p.feed("a") == []
    assert p.feed("] Su") == [Answer("Su")]
    assert p.state == "answer"
    assert p.feed("re.; [ua] <sosp><66") == [Answer("re.")]
    assert p.state == "units"
    assert p.feed("1><5") == [Units((661,))]  # never half a unit token
    assert p.feed("88><eosp><eo") == [Units((588,))]
    assert not p.done
    assert p.feed("a> tail") == [] and p.done and p.state == "done"
    assert p.finish("eoa") == [
        Notice("text_dropped", "ignored 5 characters after <eoa>"),
        End("eoa", ("ignored 5 characters after <eoa>",)),
    ]


def test_finish_flushes_held_text():
    p = ChainParser(N)
    assert p.feed("costs < 5 [t") == [Heard("costs < 5")]
    assert p.finish("max_tokens") == [
        Heard(" [t"),
        End("max_tokens", ("the answer ended without <eoa> (reason: max_tokens)",)),
    ]


def test_misuse_raises():
    p = ChainParser(N)
    p.finish("eoa")
    with pytest.raises(RuntimeError):
        p.feed("x")
    with pytest.raises(RuntimeError):
        p.finish("eoa")
    with pytest.raises(ValueError, match="unknown end reason"):
        ChainParser(N).finish("timeout")
    with pytest.raises(ValueError, match="at least 1"):
        ChainParser(0)


def test_coalesce_merges_only_adjacent_deltas_of_one_kind():
    events = [Heard("a"), Heard("b"), Answer("c"), Units((1,)), Units((2, 3)), Notice("k", "m"), Units((4,))]
    assert coalesce(events) == [Heard("ab"), Answer("c"), Units((1, 2, 3)), Notice("k", "m"), Units((4,))]


# --- properties: streaming == one-shot, never raises ----------------------------------------------

FRAGMENTS = [
    "[tq]", "[ta]", "[ua]", "[t", "q]", "a]", "[", "]", "[ ta ]", "<sosp>", "<eosp>", "<eoa>", "<sos", "p>",
    "<eo", "<", ">", "<0>", "<5>", "<99>", "<100>", "<1000>", "<12", "3>", "<007>", "<x>", "<eoh>", "</s>",
    "<12345678>", ";", "; ", " ;", " ", "  ", "\n", "\t", "a", "hello", "Not much.", "é", "你", "0", "9",
    "; [ta] ", "; [ua] ", "<eosp><eoa>",
]  # fmt: skip
answers = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.text(alphabet=st.sampled_from("[]<>;tqaueosp0123456789 é你\n"), max_size=60),
)
reasons = st.sampled_from(["eoa", "eos", "max_tokens", "cancelled", "error"])
N_SMALL = 100  # so that "<100>" and "<1000>" are out of range


def streamed(pieces: list[str], reason: str) -> list:
    p = ChainParser(N_SMALL)
    events = [e for piece in pieces for e in p.feed(piece)]
    return coalesce(events + p.finish(reason))


def check_well_formed(events: list) -> None:
    """Deltas only move forward through the chain, units are in range, one End closes the list."""
    order = {Heard: 0, Answer: 1, Units: 2, Notice: 3, End: 4}
    ranks = [order[type(e)] for e in events]
    assert ranks == sorted(ranks) and ranks.count(4) == 1 and ranks[-1] == 4
    assert all(0 <= i < N_SMALL for e in events if isinstance(e, Units) for i in e.ids)
    assert all(e.text for e in events if isinstance(e, (Heard, Answer)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=answers, reason=reasons)
def test_every_split_point_gives_the_same_events(text, reason):
    whole = parse(text, N_SMALL, reason)
    check_well_formed(whole)
    for i in range(len(text) + 1):
        assert streamed([text[:i], text[i:]], reason) == whole, f"split at {i}"


@settings(max_examples=200, deadline=None)
@given(text=answers, reason=reasons, data=st.data())
def test_random_multiway_splits_give_the_same_events(text, reason, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert streamed(pieces, reason) == parse(text, N_SMALL, reason)
    assert streamed(list(text), reason) == parse(text, N_SMALL, reason)  # one character at a time


@settings(max_examples=200, deadline=None)
@given(
    heard=st.one_of(st.none(), st.text(alphabet="abc é你;,.?", min_size=1, max_size=20)),
    answer=st.one_of(st.none(), st.text(alphabet="xyz é你;,.?<[", min_size=1, max_size=20)),
    units=st.one_of(st.none(), st.lists(st.integers(0, N_SMALL - 1), min_size=1, max_size=20)),
)
def test_format_answer_round_trips_through_the_parser(heard, answer, units):
    heard = heard.strip(" ;") if heard else None
    answer = answer.strip(" ;") if answer else None
    heard, answer = heard or None, answer or None
    if answer is None and (heard is None) == (units is None):
        return  # not one of the answer formats
    expected = [Heard(heard)] if heard else []
    expected += [Answer(answer)] if answer else []
    expected += [Units(tuple(units))] if units else []
    assert parse(format_answer(heard, answer, units), N_SMALL) == [*expected, End("eoa", ())]
