"""vocab.py: SpeechGPT's added tokens, their order and ids, and tokenizers that match the released ids."""

from __future__ import annotations

import re
import shutil

import pytest
import sentencepiece as spm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lm_fixtures import (
    SYSTEM_PROMPT,
    base_tokenizer_dir,
    build_tiny_lm,
    released_tokenizer_dir,
    sentencepiece_model,
    tiny_llama_config,
    tiny_lm_dir,
)
from transformers import LlamaForCausalLM
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from speechgpt_app.vocab import (
    PAD_ID,
    RELEASED_BASE_VOCAB,
    RELEASED_N_UNITS,
    STAGE1_SPECIAL,
    STAGE2_TOKENS,
    VocabularyError,
    added_tokens,
    check_vocabulary,
    count_units,
    extend_tokenizer,
    load_tokenizer,
    resize_model,
    unit_token_ids,
    unit_tokens,
)

N_UNITS = 20
HUMAN_TURN = "[Human]: <sosp><1><2><eosp> <eoh>. [SpeechGPT]: "
PROMPTS = [
    HUMAN_TURN,
    SYSTEM_PROMPT + HUMAN_TURN,
    SYSTEM_PROMPT + HUMAN_TURN + "Ask not what your country can do; [ta] Hello there.; [ua] <sosp><3><17><3><eosp><eoa>",
    SYSTEM_PROMPT + "[Human]: Try to speak out this sentence, please. This is input: The review.<eoh> "
    "[SpeechGPT]: <sosp><19><0><11><eosp><eoa></s>",
    "<sosp><10><1><19><eosp>",
    " leading space <sosp> inner  spaces\n\nnew lines <eosp>\n",
    "no tags at all, 1234 digits and é 中 bytes",
    "[ta] [ua] <eoa> are spelled with ordinary pieces",
    "<5> <6>\t<7>",
]


def released_slow_ids(text: str, n_units: int = N_UNITS) -> list[int]:
    """Ids from transformers 4.33.1's slow LlamaTokenizer (legacy=True), rebuilt on SentencePiece alone.

    That tokenizer split the text on added and special tokens, stripped the whitespace on both sides of
    each added (non-special) token, ran SentencePiece (dummy prefix included) on every remaining piece,
    and put BOS first. This is the behaviour the released model was trained with.
    """
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model())
    tokens = added_tokens(n_units)
    ids = {t: sp.get_piece_size() + i for i, t in enumerate(tokens)}
    special = {"<unk>": sp.unk_id(), "<s>": sp.bos_id(), "</s>": sp.eos_id()}  # LLaMA's: never stripped
    pattern = "|".join(re.escape(t) for t in sorted([*tokens, *special], key=len, reverse=True))
    parts = re.split(f"({pattern})", text)  # odd positions are added or special tokens
    for i in range(1, len(parts), 2):
        if parts[i] in ids:
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
    out = [sp.bos_id()]
    for i, part in enumerate(parts):
        if i % 2:
            out.append(ids.get(part, special.get(part)))
        elif part:
            out.extend(sp.encode(part))
    return out


@pytest.fixture(scope="module")
def released_tok():
    return load_tokenizer(released_tokenizer_dir(N_UNITS), N_UNITS)


@pytest.fixture(scope="module")
def saved_tok():
    return load_tokenizer(tiny_lm_dir(N_UNITS), N_UNITS)


@pytest.fixture(scope="module")
def slow_tok():
    """transformers 5's SentencePiece (slow, Python) backend, extended by us."""
    tok = SentencePieceBackend.from_pretrained(str(base_tokenizer_dir()), legacy=True)
    extend_tokenizer(tok, N_UNITS)
    return tok


def test_token_lists_and_release_size():
    assert unit_tokens(3) == ["<0>", "<1>", "<2>"]
    assert added_tokens(2) == ["<0>", "<1>", "<sosp>", "<eosp>", "[Human]", "[SpeechGPT]", "<eoh>", "<eos>"]
    assert added_tokens(2, stage2=False) == ["<0>", "<1>", "<sosp>", "<eosp>"]
    assert RELEASED_BASE_VOCAB + len(added_tokens(RELEASED_N_UNITS)) == 33_006
    for tag in ("[ta]", "[ua]", "<eoa>"):
        assert tag not in added_tokens(RELEASED_N_UNITS)
    with pytest.raises(VocabularyError, match="at least 1"):
        unit_tokens(0)


@pytest.mark.parametrize("text", PROMPTS)
def test_fast_and_slow_give_the_released_ids(text, released_tok, saved_tok, slow_tok):
    want = released_slow_ids(text)
    assert released_tok(text)["input_ids"] == want
    assert saved_tok(text)["input_ids"] == want
    assert [slow_tok.bos_token_id] + slow_tok(text, add_special_tokens=False)["input_ids"] == want


def test_prompt_spacing_is_the_released_one(released_tok):
    ids = released_tok(HUMAN_TURN)["input_ids"]
    pieces = released_tok.convert_ids_to_tokens(ids)
    # Spaces around added tokens vanish; every text piece gets its own dummy prefix "▁".
    assert pieces[:4] == ["<s>", "[Human]", *released_tok.convert_ids_to_tokens(
        released_tok(":", add_special_tokens=False)["input_ids"])]
    assert pieces[-1] == "▁"  # the prompt's final space survives, as in the released inference
    assert released_tok("<eosp> <eoh>")["input_ids"] == released_tok("<eosp><eoh>")["input_ids"]


_PIECES = st.sampled_from(
    added_tokens(N_UNITS)
    + [" ", "  ", "\n", "\t", ".", ",", ";", ":", "?", "[ta]", "[ua]", "<eoa>", "<", ">", "[", "]", "7", "42",
       "the", "The", "speech", "country", "é", "中", "▁", "hello world", "ask not", "</s>", "<s>", "<unk>"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_PIECES, max_size=14).map("".join))
def test_any_text_matches_the_released_slow_tokenizer(released_tok, saved_tok, slow_tok, text):
    want = released_slow_ids(text)
    assert released_tok(text)["input_ids"] == want
    assert saved_tok(text)["input_ids"] == want
    assert [slow_tok.bos_token_id] + slow_tok(text, add_special_tokens=False)["input_ids"] == want


@pytest.mark.parametrize("units", [[0], [1, 2], [19, 0, 11, 11, 5], list(range(N_UNITS))])
def test_unit_strings_round_trip(units, released_tok, saved_tok, slow_tok):
    text = "<sosp>" + "".join(f"<{u}>" for u in units) + "<eosp>"
    for tok in (released_tok, saved_tok, slow_tok):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
    ids = released_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [released_tok.convert_tokens_to_ids(t) for t in re.findall(r"<[^>]+>", text)]


def test_ids_are_consecutive_after_the_base(released_tok):
    base = released_tok.vocab_size
    assert base == spm.SentencePieceProcessor(model_proto=sentencepiece_model()).get_piece_size()
    assert len(released_tok) == base + N_UNITS + 6
    for offset, token in enumerate(added_tokens(N_UNITS)):
        assert released_tok.convert_tokens_to_ids(token) == base + offset
        assert released_tok.convert_ids_to_tokens(base + offset) == token
    assert unit_token_ids(released_tok, N_UNITS) == list(range(base, base + N_UNITS))
    assert count_units(released_tok) == N_UNITS


def test_loaded_tokenizer_pads_left_with_zero(released_tok):
    assert released_tok.pad_token_id == PAD_ID == 0
    assert released_tok.padding_side == "left"
    batch = released_tok(["<sosp><1><eosp>", "<sosp><1><2><3><eosp>"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0][:2] == [0, 0]
    assert released_tok("a")["input_ids"][-1] != released_tok.eos_token_id  # no EOS appended


def test_extend_is_idempotent_and_stage2_can_come_later():
    tok = load_tokenizer(base_tokenizer_dir())
    assert count_units(tok) == 0
    assert extend_tokenizer(tok, N_UNITS, stage2=False) == N_UNITS + len(STAGE1_SPECIAL)
    check_vocabulary(tok, N_UNITS, stage2=False)
    with pytest.raises(VocabularyError, match=r"stage-2 token '\[Human\]'"):
        check_vocabulary(tok, N_UNITS)
    assert extend_tokenizer(tok, N_UNITS, stage2=False) == 0
    assert extend_tokenizer(tok, N_UNITS) == len(STAGE2_TOKENS)
    assert extend_tokenizer(tok, N_UNITS) == 0
    check_vocabulary(tok, N_UNITS)
    assert tok(HUMAN_TURN)["input_ids"] == released_slow_ids(HUMAN_TURN)


def test_extend_refuses_another_unit_count():
    tok = load_tokenizer(released_tokenizer_dir(N_UNITS))
    with pytest.raises(VocabularyError, match=f"knows {N_UNITS} units but the speech model has 50"):
        extend_tokenizer(tok, 50)


def test_extend_refuses_foreign_tokens():
    tok = load_tokenizer(base_tokenizer_dir())
    tok.add_tokens(["<image>"])
    with pytest.raises(VocabularyError, match="other added token.*'<image>'"):
        extend_tokenizer(tok, N_UNITS)


def test_extend_refuses_tokens_out_of_order_without_changing_the_tokenizer():
    tok = load_tokenizer(base_tokenizer_dir())
    tok.add_tokens(unit_tokens(N_UNITS) + ["<eosp>"])
    size = len(tok)
    with pytest.raises(VocabularyError, match="has SpeechGPT's token '<eosp>' but not '<sosp>' before it"):
        extend_tokenizer(tok, N_UNITS)
    assert len(tok) == size


def test_check_reports_unit_mismatch_with_the_speech_model(released_tok):
    with pytest.raises(VocabularyError, match=f"language model knows {N_UNITS} units but the speech model has 50"):
        check_vocabulary(released_tok, 50)
    with pytest.raises(VocabularyError, match="no speech-unit tokens"):
        check_vocabulary(load_tokenizer(base_tokenizer_dir()), N_UNITS)
    with pytest.raises(VocabularyError, match="knows 20 units but the speech model has 1000"):
        load_tokenizer(released_tokenizer_dir(N_UNITS), n_units=1000)


def test_check_reports_wrong_order():
    tok = load_tokenizer(base_tokenizer_dir())
    tokens = added_tokens(N_UNITS)
    tok.add_tokens(tokens[:N_UNITS] + ["<eosp>", "<sosp>"] + tokens[N_UNITS + 2 :])
    with pytest.raises(VocabularyError, match=r"'<sosp>' has id 421 but should have id 420.*not in SpeechGPT's order"):
        check_vocabulary(tok, N_UNITS)


def test_check_reports_missing_stage1_token(tmp_path):
    import json

    shutil.copytree(released_tokenizer_dir(N_UNITS), tmp_path / "tok")
    path = tmp_path / "tok" / "added_tokens.json"
    ids = json.loads(path.read_text())
    del ids["<eosp>"], ids["[Human]"], ids["[SpeechGPT]"], ids["<eoh>"], ids["<eos>"]
    path.write_text(json.dumps(ids))
    with pytest.raises(VocabularyError, match="lacks SpeechGPT's stage-1 token '<eosp>'"):
        load_tokenizer(tmp_path / "tok", N_UNITS)


def test_unit_token_ids_requires_the_units(released_tok):
    with pytest.raises(VocabularyError, match="lacks 5 unit token"):
        unit_token_ids(released_tok, N_UNITS + 5)


def test_resize_model_uses_the_mean_row_and_keeps_old_logits():
    tok, model = build_tiny_lm(N_UNITS)  # already sized for len(tok)
    assert resize_model(model, tok) == 0
    base = load_tokenizer(base_tokenizer_dir())
    torch.manual_seed(0)
    small = LlamaForCausalLM(tiny_llama_config(len(base))).eval()
    ids = torch.tensor([base("ask not what your country")["input_ids"]])
    with torch.no_grad():
        before = small(ids).logits
    old_in = small.get_input_embeddings().weight.detach().clone()
    old_out = small.get_output_embeddings().weight.detach().clone()
    extend_tokenizer(base, N_UNITS)
    assert resize_model(small, base) == N_UNITS + 6
    assert small.config.vocab_size == len(base)
    new_in = small.get_input_embeddings().weight
    new_out = small.get_output_embeddings().weight
    torch.testing.assert_close(new_in[: len(old_in)], old_in)
    torch.testing.assert_close(new_in[len(old_in) :], old_in.mean(0).expand(N_UNITS + 6, -1))
    torch.testing.assert_close(new_out[len(old_out) :], old_out.mean(0).expand(N_UNITS + 6, -1))
    with torch.no_grad():
        after = small(ids).logits
    torch.testing.assert_close(after[..., : before.shape[-1]], before)
    # every new token scores the mean of the old logits, so none of them dominates the softmax
    torch.testing.assert_close(after[..., -1], before.mean(-1), rtol=1e-4, atol=1e-5)
