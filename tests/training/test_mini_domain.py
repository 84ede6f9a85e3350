"""SpeechInstruct-mini: the domain's size and kinds, and a held-out split whose answers follow from training."""

from __future__ import annotations

from collections import Counter

from training.mini import domain, phonemes


def test_number_words() -> None:
    assert [domain.number_words(n) for n in (0, 13, 20, 42, 100, 305)] == [
        "zero", "thirteen", "twenty", "forty two", "one hundred", "three hundred five",
    ]  # fmt: skip


def test_at_least_3000_distinct_questions_of_seven_kinds() -> None:
    qs = domain.questions()
    assert len({q.text for q in qs}) >= 3000
    kinds = {q.kind for q in qs} | {c.follow.kind for c in domain.conversations()}
    assert kinds == set(domain.KINDS)
    for q in qs:  # answers restate the question and end with the key fact
        assert q.answer.endswith(q.key), q


def test_heldout_arithmetic_pairs_are_never_trained_and_other_facts_are() -> None:
    train, held = domain.split()
    assert held and len(held) < len(train) / 4
    trained_facts = Counter(q.fact for q in train)
    trained_texts = {q.text for q in train}
    for q in held:
        assert q.text not in trained_texts
        if q.kind == "arithmetic":
            assert q.fact not in trained_facts, q  # the model must compute it
        else:
            assert trained_facts[q.fact] >= 1, q  # the fact is taught in another phrasing


def test_follow_ups_need_the_previous_turn() -> None:
    convs = domain.conversations()
    assert len(convs) >= 200
    doubles = [c for c in convs if c.follow.text == "and what is that times two"]
    assert doubles and all(int(c.follow.value) == 2 * int(c.first.value) for c in doubles)
    capitals = [c for c in convs if c.follow.text.startswith("and of") and c.first.kind == "capital"]
    assert all(c.follow.key == domain.CAPITALS[c.follow.value] for c in capitals)
    train, held = domain.split_conversations()
    assert held and not set(map(id, train)) & set(map(id, held))


def test_phonemes_are_espeak_symbols_without_stress() -> None:
    assert phonemes.phonemes("seven") == ("s", "E", "v", "@", "n")
    phonemes.phonemise_all(["what is two plus two", "the capital of france is paris"])
    assert phonemes.phonemes("what is two plus two")[:2] == ("w", "V")
    assert not any("'" in p or "," in p for p in phonemes.inventory(["the capital of france is paris"]))


def test_background_arithmetic_asks_no_domain_pair_and_no_heldout_doubling() -> None:
    background = domain.background_arithmetic()
    domain_facts = {q.fact for q in domain.questions()}
    assert background and not {q.fact for q in background} & domain_facts
    ops = Counter(q.fact.split(":")[0] for q in background)
    assert ops["plus"] > 1000 and ops["minus"] > 500 and ops["times"] > 0
    held_doubles = {int(c.follow.value) // 2 for c in domain.conversations()
                    if c.follow.fact.startswith("double:") and domain.is_heldout(c.follow)}  # fmt: skip
    assert held_doubles
    for q in background:
        op, a, b = q.fact.split(":")
        a, b = int(a), int(b)
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        assert q.key == domain.number_words(value) and q.answer.endswith(q.key)
        said = [p.format(a=domain.number_words(a), b=domain.number_words(b)) for p in domain._ARITH[op]]
        assert q.text in said
        doubles = (op == "plus" and a == b) or (op == "times" and 2 in (a, b))
        assert not (doubles and value // 2 in held_doubles), q  # a held-out follow-up's doubling
