"""The decoder every architecture runs: embeddings -> `num_layers` x `DecoderBlock` -> final norm.

An architecture is data, not code: its args class says what its `config.json` means (`from_hf`)
and, in `spec()`, which choices this decoder makes for it (a `DecoderSpec`). The module names in
the spec are Hugging Face's, so the parameter paths (`layers/self_attn/q_proj/kernel`), the LoRA
targets and the PEFT exports follow from it with no other table.

Adding an architecture
----------------------
1. `jaxpref/models/<family>.py`: an `ArchArgs` subclass with `from_hf(hf, **common)` and
   `spec() -> DecoderSpec`, and `WEIGHTS` (HF tensor name -> our parameter path).
2. One row in `ARCHITECTURES` (`models/__init__.py`): model_cls `Decoder`, head_weight
   `head_weight`, the `all-linear` module names and their sharding roles.
3. A tiny config in `tests/test_model_parity.py` (logits against transformers) and in
   `tests/test_lora_peft.py` (adapters against PEFT).

A family this decoder cannot yet express gets one knob here, off by default, so that the
others' graphs stay as they are. The knobs so far, and where the next ones go:
- Qwen3 (RMSNorm over each head of q and k before RoPE), OLMo 2 (the same over the full
  q/k width): `AttnSpec.qk_norm` naming the two norms (`qk_norm_full_width`), applied in
  `Attention` right after `_project_qkv`.
- Gemma 1/2/3: `DecoderSpec.embed_scale` (sqrt(hidden)) in `Decoder`; a unit-offset form of
  `layers.Norm` (1 + weight); GeGLU is already `MLPSpec(up=(gate, up),
  activation="gelu_pytorch_tanh")`; query_pre_attn_scalar is `AttnSpec.q_scale`; the
  attention-logit soft-cap a tanh in `layers.attention`, the final-logit one where the LM head
  forms logits (`jaxpref/head.py`); pre+post norms: `DecoderSpec.post_norms` (done for OLMo 2,
  whose `norms` are None: no norm before the sublayers), applied to the sublayer outputs in
  `DecoderBlock`; their fp32 multiply by the weight is `DecoderSpec.norm_fp32_scale`.
- Per-layer choices: tuples with one entry per layer in the spec, read in the block at its
  `layer` index (a traced int32 under `nn.scan`, which still compiles one layer). Windows are
  `DecoderSpec.layer_windows` (a window on only some Qwen2 layers; Gemma 2/3's
  alternating local/global layers), which the block turns into this layer's `MaskInfo.window`.
  Gemma 3's per-layer RoPE bases would follow the same way.
- Phi-3's fused `qkv_proj` ([q | k | v], grouped-query widths) is a one-name
  `AttnSpec.qkv`; its fused `gate_up_proj` is `MLPSpec.fused_up`: one `up` projection of twice
  the width, split into gate and up before the activation; LongRoPE is a `RopeSpec.scaling`.
- Mixtral / Qwen3-MoE: a `MoESpec` (router + experts) in place of `MLPSpec`, and its module
  picked in `DecoderBlock`.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models.attention import NO_WINDOW, MaskInfo, attention, cache_attention
from jaxpref.models.kv_cache import KVCache
from jaxpref.models.layers import (ACTIVATIONS, Linear, Norm, apply_rope, rope_attention_factor, rope_cos_sin,
                                   rope_inv_freq)
from jaxpref.models.spec import ArchArgs, stacked


@dataclass(frozen=True)
class AttnSpec:
    """The attention sublayer. Names are Hugging Face's module names."""
    name: str                     # the sublayer ("self_attn", "attention", "attn")
    qkv: tuple[str, ...]          # three names: separate q, k, v projections; one: fused
    out: str                      # the output projection
    kv_heads: int                 # < num_heads: grouped-query attention
    qkv_bias: bool = False
    out_bias: bool = False
    # A fused projection's output is [q | k | v] (GPT-2), or per head [h0: q k v, h1: ...] (GPT-NeoX).
    fused_per_head: bool = False
    # Multiplies q on top of attention's 1/sqrt(head_dim): GPT-2 without `scale_attn_weights`
    # cancels it with sqrt(head_dim).
    q_scale: float = 1.0
    inverse_layer_scale: bool = False   # q / (layer + 1): GPT-2's `scale_attn_by_inverse_layer_idx`
    # RMSNorms of q and k before RoPE (names of the two): Qwen3's over each head ([head_dim]
    # weights), OLMo 2's over all heads at once with `qk_norm_full_width` ([N*H] and [K*H]).
    qk_norm: tuple[str, str] | None = None
    qk_norm_full_width: bool = False


@dataclass(frozen=True)
class MLPSpec:
    """The MLP sublayer: down(act(gate(h)) * up(h)) with two `up` names, down(act(up(h))) with one."""
    name: str
    up: tuple[str, ...]           # (gate, up): gated (SwiGLU, GeGLU); (up,): plain
    down: str
    width: int                    # intermediate size
    activation: str               # a key of `layers.ACTIVATIONS`
    bias: bool = False
    # One `up` name projecting to 2 * width, [gate | up] (Phi-3's `gate_up_proj`): LoRA and PEFT
    # see the one fused module, as transformers has it.
    fused_up: bool = False


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embeddings on the first `dim` features of each q and k head."""
    dim: int
    theta: float = 10000.0
    scaling: tuple | None = None  # HF `rope_scaling` as sorted items (hashable)


@dataclass(frozen=True)
class DecoderSpec:
    """One architecture's choices. Names are Hugging Face's (parameter paths and LoRA targets)."""
    embed: str                    # token embedding [V, D] (also the LM head when tied)
    head: str                     # untied LM head [D, V]
    final_norm: str
    norms: tuple[str | None, str | None]  # the norms before attention and before the MLP (None: none)
    attn: AttnSpec
    mlp: MLPSpec
    layer_norm: bool = False      # True: LayerNorm with bias (GPT-2, GPT-NeoX); False: RMSNorm
    norm_eps: float = 1e-6
    rope: RopeSpec | None = None  # None: no rotary embeddings
    positions: str | None = None  # a learned absolute position table [max_positions, D] (GPT-2)
    max_positions: int = 0
    # True: x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX, GPT-J); False: one sublayer after the other.
    parallel_residual: bool = False
    # Norms of the attention and MLP outputs before the residual add: x + norm(attn(x)) (OLMo 2).
    post_norms: tuple[str, str] | None = None
    # RMSNorm's weight multiplies in fp32 before rounding to the compute dtype (OLMo 2); Llama
    # rounds first. The same numbers in fp32.
    norm_fp32_scale: bool = False
    sliding_window: int | None = None   # every layer: keys fewer than this many positions back
    # Per layer (one entry each, None: full attention) when only some layers have a window: Qwen2's
    # `max_window_layers`, Gemma 2/3's local/global layers. (): `sliding_window` for all. `windows`.
    layer_windows: tuple[int | None, ...] = ()


def windows(window: int | None, sliding: tuple[bool, ...] = ()) -> dict:
    """The DecoderSpec fields for `window` on the layers marked in `sliding` (() : every layer):
    one static window when all layers share it, else `layer_windows`."""
    if window is None or (sliding and not any(sliding)):
        return {}
    if all(sliding):
        return {"sliding_window": window}
    return {"layer_windows": tuple(window if on else None for on in sliding)}


def _layer_window(per_layer: tuple[int | None, ...], layer):
    """This layer's window: its entry (a constant) in the layer loop; an int32 scalar read from a
    table under `nn.scan` (NO_WINDOW where the layer has none)."""
    if isinstance(layer, (int, np.integer)):
        return per_layer[int(layer)]
    table = np.array([NO_WINDOW if w is None else w for w in per_layer], np.int32)
    return jnp.asarray(table)[layer]


def _linear(a: ArchArgs, features: int, bias: bool, name: str) -> Linear:
    """A LoRA-aware projection with the run's dtypes and LoRA options (called inside a module)."""
    return Linear(features, bias, name=name, dtype=a.dtype, param_dtype=a.param_dtype,
                  lora_scale=a.lora_scale, lora_dropout=a.lora_dropout, deterministic=a.deterministic,
                  precision=a.matmul_precision)


def _norm(a: ArchArgs, s: DecoderSpec, name: str) -> Norm:
    return Norm(s.norm_eps, s.layer_norm, a.dtype, a.param_dtype, name=name, fp32_scale=s.norm_fp32_scale)


def _maybe_norm(a: ArchArgs, s: DecoderSpec, name: str | None):
    """The norm `name`, or the identity where the spec names none."""
    return (lambda x: x) if name is None else _norm(a, s, name)


class Attention(nn.Module):
    """Projections, rotary embeddings, the attention core, the output projection."""
    args: ArchArgs
    spec: AttnSpec

    @nn.compact
    def __call__(self, h: jax.Array, rope, mask: MaskInfo, layer: jax.Array, cache: KVCache | None = None):
        """h [B, T, D] compute dtype; rope (cos, sin) [B, T, rotary_dim] fp32, or None; mask: who
        attends to whom (`attention.MaskInfo`); layer: this layer's index, int32 scalar; cache:
        generation's keys and values (`kv_cache.KVCache`), or None -> ([B, T, D], this call's
        (k, v) [B, T, K, H] each for the cache, or None)."""
        a, s = self.args, self.spec
        b, t, _ = h.shape
        q, k, v = _project_qkv(a, s, h)                 # [B, T, N, H], [B, T, K, H] x 2
        if s.qk_norm is not None:
            q, k = (_qk_norm(a, s, x, name) for x, name in zip((q, k), s.qk_norm))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # `attention` scales by 1/sqrt(head_dim); any other scale HF asks for is folded into q.
        if s.q_scale != 1.0:
            q = q * jnp.asarray(s.q_scale, q.dtype)
        if s.inverse_layer_scale:
            q = q / (layer + 1).astype(q.dtype)
        # The one place every architecture attends. Generation writes this call's keys and values
        # into its cache and attends over the whole cache; `mask` then describes the cache slots.
        new = None
        if cache is not None:
            new = (k, v)
            k, v = cache.layer(layer, k, v)
            o = cache_attention(q, k, v, mask, cache.index, a.matmul_precision)
        else:
            attend = _attention(a.attention, a.matmul_precision, a.mesh)
            attend = jax.checkpoint(attend) if a.recompute_activations else attend
            o = attend(q, k, v, mask)
        o = o.reshape(b, t, a.num_heads * a.head_dim)
        return _linear(a, a.hidden_size, s.out_bias, s.out)(o), new


@functools.lru_cache(maxsize=None)
def _attention(backend: str, precision: str | None, mesh):
    """The attention core with the run's backend, one function object per setting (so that
    `jax.checkpoint` reuses its trace across layers)."""
    return functools.partial(attention, backend=backend, precision=precision, mesh=mesh)


def _project_qkv(a: ArchArgs, s: AttnSpec, h: jax.Array):
    """h [B, T, D] -> q [B, T, N, H], k and v [B, T, K, H] (N query heads, K key/value heads)."""
    b, t, _ = h.shape
    n, kv, d = a.num_heads, s.kv_heads, a.head_dim
    if len(s.qkv) == 3:
        q, k, v = (_linear(a, heads * d, s.qkv_bias, name)(h).reshape(b, t, heads, d)
                   for heads, name in zip((n, kv, kv), s.qkv))
        return q, k, v
    qkv = _linear(a, (n + 2 * kv) * d, s.qkv_bias, s.qkv[0])(h)
    if s.fused_per_head:  # GPT-NeoX: as many key/value heads as query heads
        return jnp.split(qkv.reshape(b, t, n, 3 * d), 3, axis=-1)
    q, k, v = jnp.split(qkv, [n * d, (n + kv) * d], axis=-1)
    return q.reshape(b, t, n, d), k.reshape(b, t, kv, d), v.reshape(b, t, kv, d)


def _qk_norm(a: ArchArgs, s: AttnSpec, x: jax.Array, name: str) -> jax.Array:
    """x [B, T, heads, H] -> RMSNorm over each head's H features, or over all heads' together."""
    norm = _norm(a, a.spec(), name)
    return norm(x.reshape(*x.shape[:2], -1)).reshape(x.shape) if s.qk_norm_full_width else norm(x)


class MLP(nn.Module):
    """Up projection(s), the activation (gated or not), the down projection."""
    args: ArchArgs
    spec: MLPSpec

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """h [B, T, D] compute dtype -> [B, T, D]."""
        a, s = self.args, self.spec
        if s.fused_up:  # [gate | up] from one projection
            ups = jnp.split(_linear(a, 2 * s.width, s.bias, s.up[0])(h), 2, axis=-1)
        else:
            ups = [_linear(a, s.width, s.bias, name)(h) for name in s.up]   # [B, T, I] each
        core = _gated(s.activation) if len(ups) == 2 else ACTIVATIONS[s.activation]
        core = jax.checkpoint(core) if a.recompute_activations else core
        return _linear(a, a.hidden_size, s.bias, s.down)(core(*ups))


@functools.lru_cache(maxsize=None)
def _gated(activation: str):
    """act(g) * u, one function object per activation: `jax.checkpoint` reuses its trace across
    layers (a new lambda per layer would be traced again in every layer of the loop)."""
    act = ACTIVATIONS[activation]
    return lambda g, u: act(g) * u


class DecoderBlock(nn.Module):
    """One pre-norm residual layer; `stacked` repeats it `num_layers` times."""
    args: ArchArgs

    @nn.compact
    def __call__(self, x: jax.Array, shared, layer: jax.Array, cache: KVCache | None = None):
        """x [B, T, D] compute dtype; shared = (rope, mask), the same for every layer; layer: this
        layer's index, int32 scalar; cache: generation's KV cache (all layers) or None -> (x [B, T, D],
        this layer's new (k, v) for the cache or None), the `nn.scan` carry and output."""
        a = self.args
        s = a.spec()
        rope, mask = shared
        if s.layer_windows:
            mask = dataclasses.replace(mask, window=_layer_window(s.layer_windows, layer))
        norm_attn, norm_mlp = (_maybe_norm(a, s, name) for name in s.norms)
        post_attn, post_mlp = (_maybe_norm(a, s, name) for name in s.post_norms or (None, None))
        attn = Attention(a, s.attn, name=s.attn.name)
        mlp = MLP(a, s.mlp, name=s.mlp.name)
        h, kv = attn(norm_attn(x), rope, mask, layer, cache)
        if s.parallel_residual:
            return x + h + mlp(norm_mlp(x)), kv
        x = x + post_attn(h)
        return x + post_mlp(mlp(norm_mlp(x))), kv


class Decoder(nn.Module):
    """The decoder of any architecture (`args.spec()`); returns the final hidden states, and
    `head_weight` gives the LM head."""
    args: ArchArgs

    @nn.compact
    def __call__(self, input_ids: jax.Array, positions: jax.Array, mask: MaskInfo,
                 cache: KVCache | None = None):
        """input_ids, positions [B, T] int32; mask: who attends to whom (`attention.MaskInfo`) ->
        hidden [B, T, D] compute dtype. Learned positions index their table by `positions`, so
        left-padded rows keep their real positions. With a `cache` (generation) the tokens go into
        cache slots [cache.index, cache.index + T), `mask` describes the cache's slots [B, S], and
        the result is (hidden, the cache with them written)."""
        a = self.args
        s = a.spec()
        init = nn.initializers.normal(0.02)
        emb = self.param(s.embed, init, (a.vocab_size, a.hidden_size), a.param_dtype)
        x = jnp.take(emb, input_ids, axis=0)
        if s.positions is not None:
            wpe = self.param(s.positions, nn.initializers.normal(0.01), (s.max_positions, a.hidden_size),
                             a.param_dtype)
            x = x + jnp.take(wpe, positions, axis=0)
        x = x.astype(a.dtype)
        rope = None
        if s.rope is not None:
            scaling = dict(s.rope.scaling) if s.rope.scaling else None
            rope = rope_cos_sin(positions, rope_inv_freq(s.rope.dim, s.rope.theta, scaling, positions),
                                rope_attention_factor(scaling))
        if s.sliding_window is not None:
            mask = dataclasses.replace(mask, window=s.sliding_window)
        layers = stacked(DecoderBlock, a, in_axes=(nn.broadcast, 0, nn.broadcast))(a, name="layers")
        # The layer index as a host array: the layer loop (`scan_layers` off) reads a constant per
        # layer rather than tracing a slice.
        x, new_kv = layers(x, (rope, mask), np.arange(a.num_layers, dtype=np.int32), cache)
        if not a.tie_word_embeddings:
            self.param(s.head, init, (a.hidden_size, a.vocab_size), a.param_dtype)
        x = _norm(a, s, s.final_norm)(x)
        return x if cache is None else (x, cache.advance(*new_kv))


def head_weight(params: dict, args: ArchArgs) -> jax.Array:
    """The LM head [D, V]: the transposed token embedding when tied."""
    s = args.spec()
    return params[s.embed].T if args.tie_word_embeddings else params[s.head]
