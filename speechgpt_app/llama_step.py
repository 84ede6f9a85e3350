"""A lean forward pass for small Llama models on the CPU: the decode step without transformers' overhead.

On the CPU a small model's decode step is mostly framework overhead, not arithmetic: transformers'
Llama forward builds masks, position ids and cache objects, and dispatches about a dozen small
kernels per layer. For SpeechGPT-tiny (4 layers of 256) that is 4.3-6.4 ms per token on 2 threads,
of which the matrix products are about 0.4 ms. This module runs the same mathematics with the query,
key and value projections fused into one matrix (gate and up into another), the rotary tables
precomputed, one RMSNorm kernel, and keys and values written into a preallocated `StaticCache`:
2.5-3.8 ms per token, and a spoken answer's first audio comes that much sooner (README, Benchmarks).

It is used only where it is exact (`supports`): a plain `LlamaForCausalLM` on the CPU in float32 or
bfloat16, no quantizer or adapter, a static rotary type, SiLU, no biases, and a model small enough
(MAX_PARAMETERS) that the fused copies of its weights cost little memory. Everything else (a GPU,
the 7B, NF4, LoRA) runs transformers' own forward. Its logits equal transformers' to float rounding
(tests/test_llama_step.py). The fused matrices are copies: weights changed after `for_model` are not
seen (the app loads a model and never trains it).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_PARAMETERS = 200_000_000  # larger models are bandwidth-bound: fusing gains little, the copy costs much
STATIC_ROPE_TYPES = ("default", "linear", "llama3")  # fixed inverse frequencies (no dynamic rescaling)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def supports(model) -> bool:
    """Whether `model` can run on the lean path (see the module doc)."""
    cfg = getattr(model, "config", None)
    if cfg is None or type(model).__name__ != "LlamaForCausalLM" or getattr(cfg, "model_type", "") != "llama":
        return False
    if getattr(model, "hf_quantizer", None) is not None or hasattr(model, "peft_config"):
        return False
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" or p.dtype not in SUPPORTED_DTYPES for p in params):
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    return (
        rope.get("rope_type", "default") in STATIC_ROPE_TYPES
        and cfg.hidden_act == "silu"
        and not getattr(cfg, "attention_bias", False)
        and not getattr(cfg, "mlp_bias", False)
        and sum(p.numel() for p in params) <= MAX_PARAMETERS
    )


class StaticCache:
    """Keys and values of every layer in preallocated buffers, [layers, kv_heads, positions, head_dim].

    `length` positions are filled; `crop` forgets the rest (the buffers stay).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, max_positions: int, head_dim: int, dtype: torch.dtype):
        shape = (n_layers, n_kv_heads, max_positions, head_dim)
        self.keys = torch.empty(shape, dtype=dtype)  # only filled positions are ever read
        self.values = torch.empty(shape, dtype=dtype)
        self.length = 0

    @property
    def max_positions(self) -> int:
        """How many positions the buffers hold."""
        return self.keys.shape[2]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` ([kv_heads, n, head_dim]) after the filled positions; the layer's keys and
        values up to and including them. `advance` moves `length` once every layer has written."""
        end = self.length + k.shape[1]
        self.keys[layer, :, self.length : end] = k
        self.values[layer, :, self.length : end] = v
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def advance(self, n: int) -> None:
        """`n` more positions are filled (called after every layer wrote them)."""
        self.length += n

    def crop(self, keep: int) -> None:
        """Keep only the first `keep` positions."""
        self.length = min(self.length, max(0, keep))


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights, fused for the lean forward."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor  # [q_heads*head_dim + 2*kv_heads*head_dim, hidden]
    out: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor  # [2*intermediate, hidden]
    down: torch.Tensor


class LeanLlama:
    """The forward pass of one `LlamaForCausalLM` over a `StaticCache` (its weights fused, not copied
    where they need no fusing)."""

    def __init__(self, model) -> None:
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.max_positions = cfg.max_position_embeddings
        inner = model.model
        self.dtype = inner.embed_tokens.weight.dtype
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach()
            self.layers = [
                _Layer(
                    attn_norm=layer.input_layernorm.weight.detach(),
                    qkv=torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                   layer.self_attn.v_proj.weight]).detach(),  # fmt: skip
                    out=layer.self_attn.o_proj.weight.detach(),
                    mlp_norm=layer.post_attention_layernorm.weight.detach(),
                    gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach(),
                    down=layer.mlp.down_proj.weight.detach(),
                )
                for layer in inner.layers
            ]
            self.norm = inner.norm.weight.detach()
            self.lm_head = model.lm_head.weight.detach()
            # The model's own rotary tables (its rope type's frequencies and scaling), for every position.
            rotary = inner.rotary_emb
            freqs = torch.arange(self.max_positions, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None]
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos = (emb.cos() * rotary.attention_scaling).to(self.dtype)
            self.sin = (emb.sin() * rotary.attention_scaling).to(self.dtype)

    def new_cache(self) -> StaticCache:
        """An empty cache for one sequence of up to the model's context length."""
        return StaticCache(len(self.layers), self.n_kv, self.max_positions, self.head_dim, self.dtype)

    @torch.no_grad()  # not inference_mode: callers edit the returned logits in place
    def forward(self, ids: Sequence[int], cache: StaticCache) -> torch.Tensor:
        """Run `ids` after the cache's positions; the last one's float32 logits (1-D)."""
        n, start = len(ids), cache.length
        if n == 0:
            raise ValueError("nothing to run")
        if start + n > cache.max_positions:
            raise ValueError(f"the cache holds {cache.max_positions} positions, {start + n} were asked for")
        x = self.embed[torch.tensor(list(ids), dtype=torch.long)]  # [n, hidden]
        cos, sin = self.cos[start : start + n], self.sin[start : start + n]
        mask = None
        if n > 1:  # a prefill after `start` cached positions: each new position sees those and itself
            mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, self._rms(x, layer.attn_norm), layer, cos, sin, mask, cache)
            h = self._rms(x, layer.mlp_norm) @ layer.gate_up.T
            gate, up = h.chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down.T
        cache.advance(n)
        return (self._rms(x[-1:], self.norm) @ self.lm_head.T)[0].float()

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as transformers computes it: in float32, scaled in the model's dtype."""
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _attention(self, i: int, x: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None, cache: StaticCache) -> torch.Tensor:  # fmt: skip
        n, d, heads = x.shape[0], self.head_dim, self.n_heads
        qk, v = (x @ layer.qkv.T).split([(heads + self.n_kv) * d, self.n_kv * d], dim=-1)
        # Queries and keys rotate together: one set of kernels for both.
        q, k = _rotate(qk.view(n, heads + self.n_kv, d).transpose(0, 1), cos, sin).split([heads, self.n_kv])
        keys, values = cache.write(i, k, v.view(n, self.n_kv, d).transpose(0, 1))
        attn = F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, scale=1.0 / math.sqrt(d),
            enable_gqa=self.n_kv != heads,
        )  # fmt: skip
        return attn[0].transpose(0, 1).reshape(n, heads * d) @ layer.out.T


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of [heads, n, head_dim] (transformers' rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


_LEAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> LeanLlama | None


def for_model(model) -> LeanLlama | None:
    """The lean forward of `model`, built once per model object; None where it does not apply."""
    try:
        return _LEAN[model]
    except KeyError:
        lean = LeanLlama(model) if supports(model) else None
        _LEAN[model] = lean
        return lean
    except TypeError:  # an object that cannot be weakly referenced (a test double): never lean
        return None
