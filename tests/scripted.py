"""The scripted test model: a complete bundle in the real formats whose answers are fixed in advance.

SCRIPTED TEST MODEL — NOT A TRAINED MODEL. It lives with the tests: it lets them run a whole spoken
turn on a CPU in seconds with answers shaped as they need (an answer that stops after its text, one
that runs out of tokens) and know exactly what must come out. Real content comes from SpeechGPT-tiny.

Everything in the bundle is real and goes through the real loaders: a SentencePiece tokenizer trained
here and extended with SpeechGPT's tokens, a random `LlamaForCausalLM` saved with `save_pretrained`
(safetensors), a PEFT LoRA adapter, a log-mel speech tokenizer with random centres, a random unit
HiFi-GAN with a duration predictor (16 kHz, hop 320). Only one thing is scripted: `lm/script.json`
holds the answer, and `load_scripted` gives the pipeline a logits hook (its generic
`Pipeline.logits_hook` seam) that forces each next token so that the model writes that answer
(`prompt.format_answer`) for the task asked. Sampling, the KV cache, the detokeniser, the parser,
the vocoder and the timing all run for real.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from speechgpt_app.bundle import BundleInfo, write_bundle
from speechgpt_app.generate import LogitsHook, decode, encode_continuation
from speechgpt_app.pipeline import Pipeline
from speechgpt_app.prompt import (
    ANSWER_TAG,
    ASR_INSTRUCTION,
    EOA,
    SYSTEM_PROMPT,
    TTS_INSTRUCTION,
    UNITS_TAG,
    Task,
    format_answer,
)
from speechgpt_app.units import SpeechConfig, save_centres, units_to_text, write_speech_config

SCRIPT_FILE = "script.json"  # in the bundle's lm/ directory
LABEL = "scripted test model — not a trained model"
N_UNITS = 50  # default speech vocabulary of the scripted bundle
CONTEXT_LENGTH = 1024  # tokens (the tiny Llama's max_position_embeddings)

SP_VOCAB_SIZE = 400  # SentencePiece pieces: 259 byte/control pieces + characters + merges
TINY_LLAMA = dict(  # runs a token in about a millisecond on one CPU core
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])  # as released
N_MELS = 80  # log-mel bands of the speech tokenizer (units.LOGMEL_DEFAULTS)
TINY_VOCODER = {  # fairseq config.json fields; 8 * 8 * 5 = 320 samples per unit frame at 16 kHz
    "resblock": "1",
    "upsample_rates": [8, 8, 5],
    "upsample_kernel_sizes": [16, 16, 11],
    "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3, 5]],
    "embedding_dim": 16,
    "model_in_dim": 16,
    "dur_predictor_params": {
        "encoder_embed_dim": 16,
        "var_pred_hidden_dim": 16,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 16_000,
    "code_hop_size": 320,
}
DURATION_BIAS = 1.2  # log-duration bias: random units then last ~2-3 frames, so durations matter

_WORDS = (
    "the a of to and in is was for on that with as by at it from this be are you we what can do your ask "
    "country fellow americans system established frequent formal review activities regard speech answer "
    "question hello world please sentence speak read transcribe text good morning weather today tell me"
).split()


@dataclass(frozen=True)
class Script:
    """The fixed answer of a scripted bundle (`lm/script.json`).

    `stop_after_text`: the chat answer ends after its text (`heard; [ta] answer<eoa>`), as a real model
    sometimes does; the units then come only if the pipeline forces `; [ua] <sosp>`.
    """

    heard: str
    answer: str
    units: tuple[int, ...]
    stop_after_text: bool = False

    @classmethod
    def from_dir(cls, lm_dir: str | Path) -> Script | None:
        """The script of a scripted bundle's lm/ directory, or None for a real model."""
        path = Path(lm_dir) / SCRIPT_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(raw["heard"], raw["answer"], tuple(raw["units"]), bool(raw.get("stop_after_text", False)))

    def save(self, lm_dir: str | Path) -> Path:
        """Write `lm_dir/script.json`, labelled as a scripted test model."""
        path = Path(lm_dir) / SCRIPT_FILE
        raw = {"note": LABEL, "heard": self.heard, "answer": self.answer, "units": list(self.units),
               "stop_after_text": self.stop_after_text}
        path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def target(self, task: Task) -> str:
        """The whole answer text for `task` (chat answers ignore the output mode, as the released model does)."""
        if task == "transcribe":
            return format_answer(heard=self.heard)
        if task == "speak":
            return format_answer(units=self.units)
        return format_answer(self.heard, self.answer, None if self.stop_after_text else self.units)

    def logits_hook(self, tokenizer, task: Task) -> LogitsHook:
        """A hook that forces the next token of `target(task)`, then `</s>`.

        While the answer so far is the target's own tokens, it forces the next one. After forced text
        (an assistant prefix, or `; [ua] <sosp>`) it picks the script up again after the last tag the
        answer holds (`[ta]`: the answer text; `[ua]`: the units), comparing text up to whitespace.
        """
        target_ids = tokenizer.encode(self.target(task), add_special_tokens=False)
        answer_units = None if self.stop_after_text else self.units
        resume = {  # the script from each tag on, as the tokenizer renders it
            ANSWER_TAG: _render(tokenizer, format_answer(answer=self.answer, units=answer_units)),
            UNITS_TAG: _render(tokenizer, f"{UNITS_TAG} {units_to_text(self.units)}{EOA}"),
        }

        def next_id(ids: Sequence[int]) -> int:
            n = len(ids)
            if list(ids) == target_ids[:n]:
                return target_ids[n] if n < len(target_ids) else tokenizer.eos_token_id
            text = decode(tokenizer, ids)
            tag = max(resume, key=text.rfind)  # the tag written last
            at = text.rfind(tag)
            rest = _after(resume[tag], text[at:]) if at >= 0 else None
            if not rest:
                return tokenizer.eos_token_id
            return encode_continuation(tokenizer, rest, ids)[0]

        def hook(ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
            forced = torch.full_like(logits, float("-inf"))
            forced[next_id(ids)] = 0.0
            return forced

        return hook


def _render(tokenizer, text: str) -> str:
    """`text` as the tokenizer writes it back (its spacing around added tokens)."""
    return decode(tokenizer, tokenizer.encode(text, add_special_tokens=False))


def _after(target: str, done: str) -> str | None:
    """What of `target` remains once `done` is written, comparing up to whitespace; None if it diverged."""
    i = j = 0
    while i < len(done):
        if done[i].isspace():
            i += 1
        elif j < len(target) and target[j].isspace():
            j += 1
        elif j < len(target) and done[i] == target[j]:
            i, j = i + 1, j + 1
        else:
            return None
    if done[-1:].isspace():  # the space was written: do not write it again
        while j < len(target) and target[j].isspace():
            j += 1
    return target[j:]


# --- building the bundle ------------------------------------------------------------------------------


def _sentences(seed: int, extra: Sequence[str]) -> list[str]:
    rng = random.Random(seed)
    lines = [*SYSTEM_PROMPT.splitlines(), ASR_INSTRUCTION, TTS_INSTRUCTION, *extra]
    for _ in range(400):
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))).capitalize()
        lines.append(line + rng.choice(".?!,;:") + (f"; [ta] {rng.choice(_WORDS)}; [ua] <eoa>" if rng.random() < 0.2 else ""))
    return lines


def _write_lm(lm_dir: Path, n_units: int, seed: int, lines: list[str]):
    """Tokenizer (trained, extended) + tiny random Llama, both with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechgpt_app.vocab import extend_tokenizer, load_tokenizer, train_sentencepiece

    lm_dir.mkdir(parents=True)
    (lm_dir / "tokenizer.model").write_bytes(train_sentencepiece(lines, SP_VOCAB_SIZE))
    tokenizer = load_tokenizer(lm_dir)
    extend_tokenizer(tokenizer, n_units)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT_LENGTH,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **TINY_LLAMA)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    return model


def _write_adapter(adapter_dir: Path, model, seed: int) -> None:
    """A LoRA with random (non-zero) B, so that merged and unmerged really differ from the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **LORA))
    peft_model.save_pretrained(adapter_dir)


def _write_speech(speech_dir: Path, n_units: int, seed: int) -> None:
    """Log-mel speech tokenizer with random centres + a random unit HiFi-GAN, in the released formats."""
    from speechgpt_app.vocoder import CodeHiFiGAN, VocoderConfig, save_vocoder_dir

    gen = torch.Generator().manual_seed(seed)
    write_speech_config(speech_dir, SpeechConfig(n_units=n_units, features={"type": "logmel", "n_mels": N_MELS}))
    # Spread around typical speech log-mel values (about -10 .. 2) so real recordings use many units.
    save_centres(speech_dir, torch.randn(n_units, N_MELS, generator=gen) * 3.0 - 4.0)
    config = {**TINY_VOCODER, "num_embeddings": n_units}
    torch.manual_seed(seed)
    vocoder = CodeHiFiGAN(VocoderConfig.from_dict(config))
    with torch.no_grad():
        vocoder.dur_predictor.proj.bias.fill_(DURATION_BIAS)
    save_vocoder_dir(speech_dir / "vocoder", config, vocoder.legacy_state_dict())


def make_scripted_bundle(
    out_dir: str | Path,
    heard: str,
    answer: str,
    units: Sequence[int],
    n_units: int = N_UNITS,
    seed: int = 0,
    with_adapter: bool = True,
    stop_after_text: bool = False,
) -> Path:
    """Build a scripted test bundle in `out_dir` (which must not exist or be empty); returns `out_dir`.

    The model answers a chat question with `format_answer(heard, answer, units)`, a transcribe request
    with `heard` and a speak request with `units`. Deterministic for the same arguments.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new directory for the scripted bundle")
    units = tuple(int(u) for u in units)
    if any(not 0 <= u < n_units for u in units):
        raise ValueError(f"script units must be in [0, {n_units}), got {list(units)}")
    script = Script(heard, answer, units, stop_after_text)
    for task in ("chat", "transcribe", "speak"):
        script.target(task)  # type: ignore[arg-type]  # refuse an answer the format cannot hold, now
    model = _write_lm(out / "lm", n_units, seed, _sentences(seed, [heard, answer]))
    script.save(out / "lm")
    if with_adapter:
        _write_adapter(out / "adapter", model, seed)
    _write_speech(out / "speech", n_units, seed)
    import transformers

    info = BundleInfo(
        name="scripted-test-model",
        n_units=n_units,
        sample_rate=TINY_VOCODER["sampling_rate"],
        prompt_style="released",
        speech="speech",
        lm="lm",
        adapter="adapter" if with_adapter else None,
        context_length=CONTEXT_LENGTH,
        provenance={"recipe": "scripted", "note": LABEL, "seed": seed,
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__}},  # fmt: skip
        description=LABEL,
        notice=LABEL,
    )
    write_bundle(out, info)
    return out


def load_scripted(bundle_dir: str | Path, **load: object) -> Pipeline:
    """`Pipeline.load` a scripted bundle (`load` as it takes) with its script forcing every answer."""
    pipeline = Pipeline.load(str(bundle_dir), **load)  # type: ignore[arg-type]
    script = Script.from_dir(Path(bundle_dir) / "lm")
    if script is None:
        raise FileNotFoundError(f"{bundle_dir} is not a scripted bundle: lm/{SCRIPT_FILE} is missing")
    tokenizer = pipeline.lm.tokenizer
    pipeline.logits_hook = lambda task: script.logits_hook(tokenizer, task)
    return pipeline
