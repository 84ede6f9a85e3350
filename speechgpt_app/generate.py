"""The token stream: our own sampling loop over a causal LM with a key/value cache.

We do not call `model.generate`: the pipeline needs to see every token as it is made, to cancel
between any two steps, to force text into the answer (an edited transcript, or `; [ua] <sosp>` when
a speech answer stops after its text), and to let a hook rewrite the logits (the scripted test model).

The stream's text is `decode(tokenizer, ids)` of the answer's ids, delivered as deltas by an
`IncrementalDetokenizer`; stop strings such as `<eoa>` are found in that text because SpeechGPT
spells them with ordinary pieces, not as single tokens.

Where the next token comes from is a `TokenSource`: `LocalTokens` (the model in this process, its
key/value cache and our sampler) or `lm_server.ServerTokens` (a vLLM server streaming token ids).
Everything else (forcing, stops, retracting a stop string, the detokeniser) is the same for both.
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from speechgpt_app import llama_step
from speechgpt_app.prompt import EOA  # end of answer, spelled with ordinary pieces

# The released inference settings (REFERENCE.md section 4; the paper used 0.8 / 0.8 / 60).
DO_SAMPLE = True
TEMPERATURE = 0.7
TOP_P = 0.8
TOP_K = 50
MAX_NEW_TOKENS = 2048  # tokens; also capped so that prompt + answer fit the context
MIN_NEW_TOKENS = 10  # tokens before `</s>` may end the answer
# Ended answers whose key/value caches are kept for the next turn (PrefixCache): a few conversations'
# worth (SpeechGPT-tiny: 8 MB each; the 7B in fp16: about 0.5 MB per cached token).
PREFIX_CACHE_ANSWERS = 4
RETOKENISED_TAIL = 1  # prompt tokens at the end of a turn's prompt that its history may spell otherwise

DETOKENIZER_CONTEXT = 5  # tokens of left context re-decoded after a truncation (spaces, bytes)
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback pieces

FinishReason = Literal["eoa", "eos", "max_tokens", "cancelled"]

LogitsHook = Callable[[Sequence[int], torch.Tensor], torch.Tensor]
"""`hook(answer_ids, logits) -> logits`: sees the answer so far (forced tokens included) and the next
token's float32 logits (1-D, vocabulary size) after the `min_new_tokens` mask; it has the last word."""

OnStop = Callable[[str, str], "str | None"]
"""`on_stop(reason, text) -> continuation or None`: called when the model ends the answer ("eoa" or
"eos"), with the answer's text up to the stop. Returning text forces it in place of the stop and
generation goes on; None lets the answer end."""


# The seeds torch.Generator.manual_seed takes (a signed or unsigned 64-bit integer).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick each next token. Defaults are the released inference settings."""

    do_sample: bool = DO_SAMPLE
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    top_k: int = TOP_K  # 0 keeps every token
    max_new_tokens: int = MAX_NEW_TOKENS
    min_new_tokens: int = MIN_NEW_TOKENS
    seed: int | None = None  # None: a fresh random seed per answer

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            # Checked here: torch.Generator.manual_seed would fail only once the answer had started.
            raise ValueError(f"seed must be from {SEED_MIN} to {SEED_MAX}, got {self.seed}")

    @property
    def greedy(self) -> bool:
        """Sampling at temperature 0 is taking the most likely token."""
        return not self.do_sample or self.temperature == 0


@dataclass(frozen=True)
class GenerationStats:
    """Counts and wall times of one answer."""

    prompt_tokens: int
    sampled_tokens: int  # chosen by the model (or its logits hook)
    forced_tokens: int  # fed from forced text
    prefill_s: float  # reading the prompt (and any forced prefix) up to the first logits
    total_s: float
    cached_tokens: int = 0  # of prompt_tokens, taken from an earlier answer's cache (not prefilled)

    @property
    def tokens_per_s(self) -> float:
        """Sampled tokens per second of decoding, after the prompt was read."""
        decode_s = self.total_s - self.prefill_s
        return self.sampled_tokens / decode_s if decode_s > 0 else 0.0


@dataclass(frozen=True)
class Step:
    """One item of the stream: a token and the text it completed, or (last) the finish.

    `text` may be empty (an unfinished character, or text that may start a stop string), and the
    final step carries any text held until then. Joining every `text` gives the answer's text up to,
    not including, the stop string.
    """

    token_id: int | None
    text: str
    forced: bool = False
    finish: FinishReason | None = None
    stop: str | None = None  # the stop string that ended the answer, if one did
    stats: GenerationStats | None = None


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The one way answer ids become text here (special tokens dropped, no space clean-up)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """Token ids in, text deltas out, such that the deltas join to `decode(tokenizer, ids)`.

    SentencePiece text is not a concatenation of per-token strings: a word's leading space depends on
    what precedes it, and a run of byte-fallback tokens (`<0xE4>`) decodes only as a whole (an invalid
    run turns every one of its bytes into U+FFFD, even bytes that were valid on their own). So each
    delta is the difference between decoding a short window of recent ids with and without the new
    ones, and nothing is emitted while the ids end in a byte token or the text in U+FFFD.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: the decoded text from here gives context to new ids
        self._read = 0  # ids before this are emitted
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        if self._is_byte(token_id):
            return ""
        prefix_text = decode(self.tokenizer, self.ids[self._prefix : self._read])
        window_text = decode(self.tokenizer, self.ids[self._prefix :])
        if len(window_text) <= len(prefix_text) or window_text.endswith("\ufffd"):
            return ""
        delta = window_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is left, unfinished characters included."""
        prefix_text = decode(self.tokenizer, self.ids[self._prefix : self._read])
        delta = decode(self.tokenizer, self.ids[self._prefix :])[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def truncate(self, n: int) -> None:
        """Forget every id from index `n` on (all of `ids[:n]` counts as emitted).

        Cut where the text is final: ids pushed later must not continue a byte-fallback run that
        `ids[:n]` ends with, since that could change the characters already emitted.
        """
        del self.ids[n:]
        self.text = decode(self.tokenizer, self.ids)
        self._read = n
        # Some context for spaces, starting after a complete byte run so it decodes as in the whole.
        self._prefix = max(0, n - DETOKENIZER_CONTEXT)
        while self._prefix > 0 and self._is_byte(self.ids[self._prefix - 1]):
            self._prefix -= 1

    def _is_byte(self, token_id: int) -> bool:
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        return isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece) is not None


# Per tokenizer: a copy of its backend that adds no dummy-prefix "▁" to the text it encodes.
_NO_PREFIX_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _no_prefix_backend(tokenizer):
    """The tokenizer's `tokenizers` backend without its dummy prefix, or None if it has no backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    cached = _NO_PREFIX_BACKENDS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    copy = Tokenizer.from_str(backend.to_str())
    norm = copy.normalizer
    if isinstance(norm, normalizers.Sequence):  # vocab.load_tokenizer's Prepend("▁") + Replace(" ", "▁")
        kept = [n for n in norm if not isinstance(n, normalizers.Prepend)]
        copy.normalizer = normalizers.Sequence(kept)
    elif isinstance(norm, normalizers.Prepend):
        copy.normalizer = None
    pre = copy.pre_tokenizer
    if isinstance(pre, pre_tokenizers.Metaspace):
        copy.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="never", split=pre.split)
    _NO_PREFIX_BACKENDS[tokenizer] = (len(tokenizer), copy)
    return copy


def encode_continuation(tokenizer, text: str, previous_ids: Sequence[int] = ()) -> list[int]:
    """The ids of `text` written right after `previous_ids`, tokenised as training text was.

    Training encoded each answer in one piece, so text that continues an answer gets no dummy-prefix
    "▁" of its own (`answer` + `; [ua]` is `answer;▁[ua]`, not `answer▁;▁[ua]`), while text after an
    added token inside it keeps the tokenizer's usual handling. The decoded result is the tokenizer's
    rendering of `text`: spaces next to added tokens (`[ua] <sosp>`) follow the tokenizer's rules.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    backend = _no_prefix_backend(tokenizer)
    if not previous_ids or backend is None:
        return list(ids)
    added = set(tokenizer.get_added_vocab().values())
    bare = backend.encode(text, add_special_tokens=False).ids
    # Both encodings split the text at the same added tokens: take the bare one up to the first.
    head = next((i for i, t in enumerate(bare) if t in added), len(bare))
    tail = next((i for i, t in enumerate(ids) if t in added), len(ids))
    return list(bare[:head]) + list(ids[tail:])


def mask_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest logits (all when k is 0 or at least the vocabulary), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def mask_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities first reach `p` (at least one), -inf elsewhere."""
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def choose_token(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """Pick the next token from 1-D float logits: argmax, or temperature -> top-k -> top-p -> sample."""
    if options.greedy:
        return int(torch.argmax(logits))
    logits = mask_top_p(mask_top_k(logits / options.temperature, options.top_k), options.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: the same seed gives the same answer on any device."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _find_stop(text: str, start: int, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string in text[start:], as (index, string)."""
    hits = [(i, s) for s in stop_strings if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _held_back(text: str, start: int, stop_strings: Sequence[str]) -> int:
    """How many trailing characters might begin a stop string (so must wait for the next token)."""
    longest = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text) - start), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class _Decoder:
    """The model, its cache and what went through it: feed ids, read the next token's logits.

    Small Llamas on the CPU run `llama_step`'s lean forward over a static cache; every other model
    runs transformers' forward over a `DynamicCache`. `reused` is an earlier answer's cache whose ids
    start like `prompt_ids`: the shared positions are kept, only the rest is prefilled.
    """

    def __init__(self, model, prompt_ids: Sequence[int], reused: _Cached | None = None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.device = _model_device(model)
        self.lean = llama_step.for_model(model)
        self.n_prompt = len(prompt_ids)
        self.ids: list[int] = []  # the ids the cache holds, in order
        self.pending: list[int] = list(prompt_ids)  # ids not yet run through the model
        if reused is not None:
            # Keep at least one prompt id to run: the first logits come from it.
            keep = min(_common_prefix(reused.ids, prompt_ids), len(prompt_ids) - 1)
            self.cache = reused.cache
            self._crop_to(keep)
            self.ids, self.pending = list(prompt_ids[:keep]), list(prompt_ids[keep:])
        elif self.lean is not None:
            self.cache = self.lean.new_cache()
        else:
            self.cache = DynamicCache(config=model.config)
        self.reused = len(self.ids)  # prompt ids taken from an earlier answer's cache

    def logits(self) -> torch.Tensor:
        """Run the pending ids; the float32 logits of the next token, on the CPU."""
        ids, self.pending = self.pending, []
        logits = self.step(ids[0]) if len(ids) == 1 else self.prefill(ids)
        self.ids += ids
        return logits.float().cpu()

    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Many ids in one forward pass (the prompt, a forced continuation); the last one's logits."""
        if self.lean is not None:
            return self.lean.forward(ids, self.cache)
        return self._forward(torch.tensor([list(ids)], dtype=torch.long, device=self.device))

    def step(self, token_id: int) -> torch.Tensor:
        """One generated token: the per-token decode step, the part a static cache and a CUDA graph
        would speed up (its input always has shape [1, 1])."""
        if self.lean is not None:
            return self.lean.forward((token_id,), self.cache)
        return self._forward(torch.tensor([[token_id]], dtype=torch.long, device=self.device))

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def crop(self, n_answer: int) -> None:
        """Forget everything after the first `n_answer` answer ids."""
        keep = self.n_prompt + n_answer
        if len(self.ids) > keep:
            self._crop_to(keep)
            del self.ids[keep:]

    def _crop_to(self, keep: int) -> None:
        if self.lean is not None:
            self.cache.crop(keep)
        elif (extra := self.cache.get_seq_length() - keep) > 0:
            self.cache.crop(-extra)  # transformers 5: a negative count of positions to drop


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Cached:
    """An ended answer's cache: the ids it holds, of which the first `n_prompt` were its prompt."""

    ids: list[int]
    n_prompt: int
    cache: object


class PrefixCache:
    """The caches of the last few answers, so that a conversation's next turn prefills only its new
    tokens (the pipeline's second turn repeats the first turn's prompt and answer).

    An answer's cache is offered to a new prompt that repeats that answer's prompt (the same
    conversation, its history not trimmed), all but its last RETOKENISED_TAIL tokens: the history
    is tokenised as one text, as training tokenised it, so the prompt's final `: ` may merge with the
    answer's first piece. The cache is kept as far as the new prompt's ids repeat it exactly, and
    the rest (the first answer as the history spells it, the new question) is prefilled. Taking a
    cache removes it (the new answer writes into it and puts it back when it ends). At most
    `capacity` caches are kept, the least recently used going first, so memory stays flat however
    many conversations there are.
    """

    def __init__(self, capacity: int = PREFIX_CACHE_ANSWERS) -> None:
        self.capacity = capacity
        self._entries: list[_Cached] = []  # oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every kept cache."""
        with self._lock:
            self._entries.clear()

    def take(self, prompt_ids: Sequence[int]) -> _Cached | None:
        """The kept cache that `prompt_ids` continues furthest, removed from the store; None if none does."""
        with self._lock:
            best, best_len = None, 0
            for entry in self._entries:
                shared = _common_prefix(entry.ids, prompt_ids)
                if shared >= entry.n_prompt - RETOKENISED_TAIL and shared > best_len:
                    best, best_len = entry, shared
            if best is not None:
                self._entries.remove(best)
            return best

    def put(self, entry: _Cached) -> None:
        """Keep an ended answer's cache (dropping the least recently used beyond capacity)."""
        if self.capacity <= 0 or not entry.ids:
            return
        with self._lock:
            self._entries.append(entry)
            del self._entries[: max(0, len(self._entries) - self.capacity)]


_PREFIX_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> PrefixCache


def prefix_cache(model) -> PrefixCache | None:
    """The model's store of recent answers' caches (one per model object); None for an object that
    cannot be weakly referenced."""
    try:
        return _PREFIX_CACHES.setdefault(model, PrefixCache())
    except TypeError:
        return None


class TokenSource(Protocol):
    """Where an answer's next tokens come from. The answer so far is what was fed after the prompt."""

    def feed(self, ids: Sequence[int]) -> None:
        """The answer goes on with `ids`: the token `next_token` just gave, or forced text."""

    def crop(self, n_answer: int) -> None:
        """The answer is cut back to its first `n_answer` ids (a retracted stop string)."""

    def next_token(self, answer_ids: Sequence[int]) -> int:
        """The next token after the answer so far (`answer_ids`, everything fed)."""

    def close(self) -> None:
        """The answer is over: free what it holds (a server request is aborted)."""


class LocalTokens:
    """The model in this process: its cache, the `min_new_tokens` mask, the logits hook, our sampler.

    The cache comes from the model's `PrefixCache` when an earlier answer's prompt starts this one,
    and goes back to it when the answer ends.
    """

    def __init__(self, model, prompt_ids: Sequence[int], options: SamplingOptions, eos_id: int | None,
                 logits_hook: LogitsHook | None = None) -> None:  # fmt: skip
        self.store = prefix_cache(model)
        self.decoder = _Decoder(model, prompt_ids, self.store.take(prompt_ids) if self.store else None)
        self.options = options
        self.eos_id = eos_id
        self.logits_hook = logits_hook
        self.generator = make_generator(options.seed)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens whose keys and values came from an earlier answer's cache."""
        return self.decoder.reused

    def feed(self, ids: Sequence[int]) -> None:
        """Queue `ids` for the next forward pass."""
        self.decoder.pending.extend(ids)

    def crop(self, n_answer: int) -> None:
        """Drop the cache past `n_answer` answer ids, and anything queued."""
        self.decoder.crop(n_answer)
        self.decoder.pending = []

    def next_token(self, answer_ids: Sequence[int]) -> int:
        """Run what is queued (the prompt first: the prefill) and pick the next token."""
        logits = self.decoder.logits()
        if self.eos_id is not None and len(answer_ids) < self.options.min_new_tokens:
            logits[self.eos_id] = float("-inf")
        if self.logits_hook is not None:
            logits = self.logits_hook(list(answer_ids), logits)
        return choose_token(logits, self.options, self.generator)

    def close(self) -> None:
        """Offer the cache to the next turn (only what went through the model: queued ids are not in it)."""
        if self.store is not None and self.decoder.ids:
            d = self.decoder
            self.store.put(_Cached(d.ids, min(d.n_prompt, len(d.ids)), d.cache))
            self.store = None  # closing twice keeps one copy


SourceFactory = Callable[[Sequence[int], SamplingOptions, int], TokenSource]
"""`factory(prompt_ids, options, limit) -> TokenSource`: opens a source for one answer of at most
`limit` tokens (lm_server.LMServer.open is one)."""


def stream_tokens(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    options: SamplingOptions = SamplingOptions(),
    *,
    prefix: str = "",
    stop_strings: Sequence[str] = (EOA,),
    on_stop: OnStop | None = None,
    logits_hook: LogitsHook | None = None,
    cancel: threading.Event | None = None,
    context_length: int | None = None,
    source: SourceFactory | None = None,
) -> Iterator[Step]:
    """Generate an answer after `prompt_ids`, one `Step` per token, then a final `Step` with `finish`.

    `prefix` is forced as the start of the answer (and streamed like generated text). Generation
    ends at the tokenizer's EOS token ("eos", not before `min_new_tokens`), at the first of
    `stop_strings` in the text ("eoa"; the stop string itself is not streamed), after
    `max_new_tokens` or when the context is full ("max_tokens"), or when `cancel` is set
    ("cancelled", checked before every model step). `context_length` defaults to the model's
    `max_position_embeddings`. `source` opens where the tokens come from (default: `model` in this
    process, `LocalTokens`); a server source takes no `logits_hook`. Raises ValueError when the
    prompt leaves no room for an answer.
    """
    if source is not None and logits_hook is not None:
        raise ValueError("a logits hook needs the model in this process, not a token server")
    answer = _Answer(model, tokenizer, prompt_ids, options, stop_strings, context_length)
    if source is None:
        answer.source = LocalTokens(model, prompt_ids, options, tokenizer.eos_token_id, logits_hook)
    else:
        answer.source = source(prompt_ids, options, answer.limit)
    try:
        yield from _steps(answer, tokenizer, prefix, on_stop, cancel)
    finally:  # however it ended (a reader that stopped reading too): a server request is aborted
        answer.source.close()


def _steps(answer: _Answer, tokenizer, prefix: str, on_stop: OnStop | None,
           cancel: threading.Event | None) -> Iterator[Step]:  # fmt: skip
    """stream_tokens' loop over an opened answer."""
    prefix_ids = encode_continuation(tokenizer, prefix) if prefix else []
    if len(prefix_ids) > answer.limit:
        raise ValueError(f"the forced prefix has {len(prefix_ids)} tokens, more than the {answer.limit} allowed")
    yield from answer.force(prefix_ids)
    while True:
        if cancel is not None and cancel.is_set():
            yield answer.finish("cancelled")
            return
        if len(answer.detok.ids) >= answer.limit:
            yield answer.finish("max_tokens")
            return
        token_id = answer.choose()
        if token_id == tokenizer.eos_token_id:
            answer.detok.flush()
            continuation = on_stop("eos", answer.detok.text) if on_stop is not None else None
            if continuation:
                yield from answer.force(encode_continuation(tokenizer, continuation, answer.detok.ids))
                continue
            yield answer.finish("eos")
            return
        hit = answer.push(token_id)
        if hit is None:
            yield Step(token_id, answer.release())
            continue
        at, stop = hit
        before_stop = answer.detok.text[answer.emitted : at]
        answer.emitted = at
        continuation = on_stop("eoa", answer.detok.text[:at]) if on_stop is not None else None
        yield Step(token_id, before_stop)
        if not continuation:
            yield Step(None, "", finish="eoa", stop=stop, stats=answer.stats())
            return
        yield from answer.force(_retract(answer.source, answer.detok, at, continuation))


class _Answer:
    """One answer being generated: the model's cache, the text so far, what was streamed, the counts."""

    source: TokenSource  # set by stream_tokens once the limit is known

    def __init__(self, model, tokenizer, prompt_ids: Sequence[int], options: SamplingOptions,
                 stop_strings: Sequence[str], context_length: int | None) -> None:  # fmt: skip
        self.started = time.perf_counter()
        self.limit = _answer_limit(model, prompt_ids, options.max_new_tokens, context_length)
        self.n_prompt = len(prompt_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.emitted = 0  # characters of detok.text already streamed
        self.sampled = self.forced = 0
        self.prefill_s: float | None = None

    def release(self, final: bool = False) -> str:
        """The streamable text: up to any possible stop-string start (all of it when final)."""
        text = self.detok.text
        end = len(text) if final else len(text) - _held_back(text, self.emitted, self.stop_strings)
        out = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def stats(self) -> GenerationStats:
        """The counts and times so far."""
        now = time.perf_counter()
        return GenerationStats(
            prompt_tokens=self.n_prompt,
            sampled_tokens=self.sampled,
            forced_tokens=self.forced,
            prefill_s=self.prefill_s if self.prefill_s is not None else now - self.started,
            total_s=now - self.started,
            cached_tokens=getattr(self.source, "reused_tokens", 0),
        )

    def finish(self, reason: FinishReason) -> Step:
        """The final step of an answer that ends here: the held-back text goes out with it."""
        self.detok.flush()
        return Step(None, self.release(final=True), finish=reason, stats=self.stats())

    def force(self, ids: Sequence[int]) -> Iterator[Step]:
        """Feed `ids` as the answer's next tokens (the context ends here in any case)."""
        ids = list(ids[: self.limit - len(self.detok.ids)])
        self.source.feed(ids)
        for token_id in ids:
            self.detok.push(token_id)
            self.forced += 1
            yield Step(token_id, self.release(), forced=True)

    def choose(self) -> int:
        """The source's next token (the first one comes after the prefill)."""
        token_id = self.source.next_token(self.detok.ids)
        if self.prefill_s is None:
            self.prefill_s = time.perf_counter() - self.started
        return token_id

    def push(self, token_id: int) -> tuple[int, str] | None:
        """Add a sampled token to the answer; the first stop string it completed, if any."""
        self.source.feed([token_id])
        self.detok.push(token_id)
        self.sampled += 1
        return _find_stop(self.detok.text, self.emitted, self.stop_strings)


def _answer_limit(model, prompt_ids: Sequence[int], max_new_tokens: int, context_length: int | None) -> int:
    """How many answer tokens fit: `max_new_tokens`, or less when the context ends first."""
    if context_length is None:
        context_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context_length is None:
        return max_new_tokens
    room = context_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens: no room left in the context of {context_length}")
    return min(max_new_tokens, room)


def _retract(source: TokenSource, detok: IncrementalDetokenizer, at: int, continuation: str) -> list[int]:
    """Take back the tokens that spelled a stop string at text index `at`; ids to force instead.

    The answer is cut back to the last token boundary before `at`; the forced ids re-spell the text
    between that boundary and `at`, then `continuation`, so the text streamed so far stays true.
    """
    tokenizer = detok.tokenizer
    full = detok.text
    keep = len(detok.ids)
    while keep > 0 and len(decode(tokenizer, detok.ids[:keep])) > at:
        keep -= 1
    kept = decode(tokenizer, detok.ids[:keep])
    detok.truncate(keep)
    source.crop(keep)
    return encode_continuation(tokenizer, full[len(kept) : at] + continuation, detok.ids)
