"""The language model's vocabulary: speech-unit tokens, stage-2 tags, and how tokenizers are loaded.

SpeechGPT appends, to LLaMA's 32,000 SentencePiece pieces, ordinary (non-special) added tokens in this
order: `<0>` ... `<{n-1}>`, `<sosp>`, `<eosp>` (stage 1), then `[Human]`, `[SpeechGPT]`, `<eoh>`, `<eos>`
(stage 2). The released model (n = 1000) therefore has 33,006 tokens. `[ta]`, `[ua]` and `<eoa>` are NOT
added tokens: they are spelled with ordinary pieces.

Tokenizer behaviour must match what the released model was trained with: transformers 4.33.1's slow
`LlamaTokenizer` with its default `legacy=True`. That tokenizer
  1. split the text on added tokens and stripped the whitespace on both sides of every non-special added
     token ("<eosp> <eoh>" and "<eosp><eoh>" give the same ids; "\\n[Human]" loses its newline), and
  2. ran SentencePiece on each remaining piece of text separately, so each piece got its own dummy-prefix
     "▁" (": " after "[Human]" becomes "▁:" and, at the end of the prompt, "▁:" "▁").
transformers 5 has no slow Llama class any more (`LlamaTokenizer` is the `tokenizers` backend, `use_fast`
is ignored, and its default `legacy=False` prepends "▁" only at the start of the text). `load_tokenizer`
therefore builds that fast tokenizer and sets it up to give the released ids: added tokens with
`lstrip=rstrip=True` and a normaliser that prepends "▁" to every piece of text between added tokens (the
Metaspace pre-tokeniser skips the prefix when a piece already starts with a space; SentencePiece does not).
tests/test_vocab.py checks this against SentencePiece itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import AddedToken, normalizers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RELEASED_N_UNITS = 1000  # k-means clusters of the released speech tokenizer
RELEASED_BASE_VOCAB = 32_000  # LLaMA-1's SentencePiece pieces
STAGE1_SPECIAL: tuple[str, ...] = ("<sosp>", "<eosp>")
STAGE2_TOKENS: tuple[str, ...] = ("[Human]", "[SpeechGPT]", "<eoh>", "<eos>")
PAD_ID = 0  # <unk>: the released code pads with 0 so padding never looks like </s>
SPIECE_SPACE = "▁"  # SentencePiece's visible space (U+2581)


class VocabularyError(ValueError):
    """A tokenizer whose added tokens are not SpeechGPT's, or not for this speech model."""


def unit_tokens(n: int) -> list[str]:
    """The unit tokens `<0>` ... `<n-1>`."""
    if n < 1:
        raise VocabularyError(f"the number of speech units must be at least 1, got {n}")
    return [f"<{i}>" for i in range(n)]


def added_tokens(n_units: int, stage2: bool = True) -> list[str]:
    """Every token SpeechGPT adds, in id order: units, `<sosp>`, `<eosp>`, then (stage 2) the tags."""
    tokens = unit_tokens(n_units) + list(STAGE1_SPECIAL)
    return tokens + list(STAGE2_TOKENS) if stage2 else tokens


def _as_added(content: str) -> AddedToken:
    # lstrip/rstrip reproduce the released tokenizer, which stripped spaces around every added token;
    # normalized=False so the token is found in the raw text, before the "▁" normaliser runs.
    return AddedToken(content, lstrip=True, rstrip=True, normalized=False, special=False)


def count_units(tok: PreTrainedTokenizerBase) -> int:
    """How many unit tokens `<0>`, `<1>`, ... the tokenizer has, counting up from `<0>` until one is missing."""
    vocab = tok.get_added_vocab()
    n = 0
    while f"<{n}>" in vocab:
        n += 1
    return n


def extend_tokenizer(tok: PreTrainedTokenizerBase, n_units: int, stage2: bool = True) -> int:
    """Add SpeechGPT's tokens to `tok` in order and return how many were new.

    Idempotent: tokens already present (with the right ids) are kept, so stage 2 can be added later to a
    stage-1 tokenizer. A tokenizer that holds units for another `n_units`, other added tokens, or ours
    out of order is refused with `VocabularyError` rather than extended into an inconsistent vocabulary.
    """
    known = count_units(tok)
    if known not in (0, n_units):
        raise _unit_mismatch(known, n_units)
    wanted = added_tokens(n_units, stage2)
    vocab = tok.get_added_vocab()
    foreign = sorted((i, t) for t, i in vocab.items() if i >= tok.vocab_size and t not in added_tokens(n_units))
    if foreign:
        raise VocabularyError(
            f"the tokenizer already has {len(foreign)} other added token(s) after its base vocabulary "
            f"(first: {foreign[0][1]!r} = id {foreign[0][0]}); SpeechGPT's tokens must come right after "
            "the base vocabulary, so start from the base LLaMA tokenizer"
        )
    have = 0
    while have < len(wanted) and wanted[have] in vocab:
        have += 1
    _check_order(tok, wanted[:have])
    early = [t for t in wanted[have:] if t in vocab]
    if early:  # refuse before changing anything
        raise VocabularyError(
            f"the tokenizer has SpeechGPT's token {early[0]!r} but not {wanted[have]!r} before it: "
            "the added tokens are not in SpeechGPT's order"
        )
    tok.add_tokens([_as_added(t) for t in wanted[have:]])
    _check_order(tok, wanted)
    return len(wanted) - have


def _unit_mismatch(known: int, n_units: int) -> VocabularyError:
    return VocabularyError(
        f"the language model knows {known} units but the speech model has {n_units}: "
        "they were not trained together"
    )


def _check_order(tok: PreTrainedTokenizerBase, tokens: list[str]) -> None:
    """Each of `tokens` must exist with id base + its position."""
    vocab = tok.get_added_vocab()
    base = tok.vocab_size
    for offset, token in enumerate(tokens):
        want = base + offset
        got = vocab.get(token)
        if got is None:
            stage = 2 if token in STAGE2_TOKENS else 1
            raise VocabularyError(
                f"the tokenizer lacks SpeechGPT's stage-{stage} token {token!r} (expected id {want})"
            )
        if got != want:
            raise VocabularyError(
                f"SpeechGPT's token {token!r} has id {got} but should have id {want} (base vocabulary "
                f"{base} + {offset}): the added tokens are not in SpeechGPT's order"
            )


def check_vocabulary(tok: PreTrainedTokenizerBase, n_units: int, stage2: bool = True) -> None:
    """Raise `VocabularyError` unless `tok` has SpeechGPT's added tokens for `n_units` units.

    They must be present, with consecutive ids in the order of `added_tokens`, starting right after the
    base vocabulary. With `stage2=False` only the stage-1 tokens are checked (stage-2 tags may follow).
    The unit count is checked first, so a language model paired with the wrong speech model fails with
    "the language model knows 1000 units but the speech model has 50".
    """
    known = count_units(tok)
    if known == 0:
        raise VocabularyError(
            f"the tokenizer has no speech-unit tokens (<0>, <1>, ...) but the speech model has {n_units} "
            "units: load a SpeechGPT tokenizer, or extend this one with extend_tokenizer()"
        )
    if known != n_units:
        raise _unit_mismatch(known, n_units)
    _check_order(tok, added_tokens(n_units, stage2))


def unit_token_ids(tok: PreTrainedTokenizerBase, n_units: int) -> list[int]:
    """The ids of `<0>` ... `<n_units-1>` (checked: they must exist)."""
    vocab = tok.get_added_vocab()
    missing = [t for t in unit_tokens(n_units) if t not in vocab]
    if missing:
        raise VocabularyError(f"the tokenizer lacks {len(missing)} unit token(s), first {missing[0]!r}")
    return [vocab[t] for t in unit_tokens(n_units)]


def resize_model(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> int:
    """Grow the model's embeddings (and output layer) to `len(tok)` rows; return how many were added.

    New rows are the mean of the existing ones. A row far from the others (random init) starts with
    an arbitrary logit and can dominate the softmax; the mean row gives every new token the average
    logit, so the extended model's predictions on old text barely move and training starts from the
    base model's loss (Hewitt, "Initializing new word embeddings for pretrained language models").
    A model that already has at least `len(tok)` rows is left as it is.
    """
    old = model.get_input_embeddings().weight.shape[0]
    new = len(tok)
    if new <= old:
        return 0
    # mean_resizing=False: we set the rows ourselves, deterministically, below.
    model.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        inp = model.get_input_embeddings().weight
        inp[old:] = inp[:old].float().mean(dim=0).to(inp.dtype)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != inp.data_ptr():
            out.weight[old:] = out.weight[:old].float().mean(dim=0).to(out.weight.dtype)
    return new - old


def load_tokenizer(
    directory: str | Path, n_units: int | None = None, stage2: bool = True, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """Load a LLaMA/SpeechGPT tokenizer from a local directory so that ids match the released model.

    Reads `tokenizer.json` or `tokenizer.model` (+ `added_tokens.json`, as released). If `n_units` is
    given, the vocabulary is checked with `check_vocabulary`. Pad id 0, left padding, BOS added, no EOS.
    """
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(
        str(directory), legacy=True, add_bos_token=True, add_eos_token=False, **kwargs
    )
    _match_released_spacing(tok)
    tok.pad_token = tok.unk_token
    if tok.pad_token_id != PAD_ID:
        raise VocabularyError(f"expected <unk> at id {PAD_ID} (the pad id), found it at {tok.pad_token_id}")
    tok.padding_side = "left"
    if n_units is not None:
        check_vocabulary(tok, n_units, stage2)
    return tok


def train_sentencepiece(lines: list[str], vocab_size: int, hard_vocab_limit: bool = True) -> bytes:
    """A serialized SentencePiece BPE model trained on `lines` with LLaMA's settings.

    Byte fallback, split digits, identity normaliser, dummy prefix, unk/bos/eos = 0/1/2, no pad; one
    thread, so the same lines give the same model. `hard_vocab_limit=False` lets a small corpus stop
    short of `vocab_size` instead of failing.
    """
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=hard_vocab_limit,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def _match_released_spacing(tok: PreTrainedTokenizerBase) -> None:
    """Give a fast Llama tokenizer the released slow tokenizer's spacing (see the module docstring)."""
    backend = tok.backend_tokenizer
    # Files saved by transformers 4.x (added_tokens.json) carry no strip flags: set them on every
    # non-special added token, keeping its id, as the released tokenizer treated them all alike.
    # Every added token becomes `normalized=False` (matched in the raw text) BEFORE the normaliser
    # changes: tokenizers stores a normalized token's content through the normaliser ("▁<unk>").
    tokens = list(backend.get_added_tokens_decoder().values())
    backend.add_special_tokens(
        [AddedToken(t.content, lstrip=False, rstrip=False, normalized=False, special=True) for t in tokens if t.special]
    )
    backend.add_tokens([_as_added(t.content) for t in tokens if not t.special])
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)]
    )
    backend.pre_tokenizer = None
