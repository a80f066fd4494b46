"""Our Flax models read Hugging Face checkpoints and give the same logits as transformers.

Each case is a tiny random model made and saved by transformers (the oracle), read back through
`resolve` + `build` + `load_params`, and compared on a batch with a right-padded and a
left-padded row.
"""
from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxpref.models.attention import MaskInfo
from safetensors.numpy import load_file, save_file

from jaxpref.errors import ModelSourceError
from jaxpref.models.source import resolve
from jaxpref.models.weights import build, load_params
from jaxpref.objectives.head import capped_logits

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
NEOX = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
            eos_token_id=2)
MOE = dict(TINY, intermediate_size=48, num_key_value_heads=2)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False),
    "llama_tied": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3_rope": lambda: transformers.LlamaConfig(
        **TINY, num_key_value_heads=4, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2),
    # Sliding attention windows shorter than the rows: each token sees only the last 3 positions.
    "mistral_window": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=3),
    "qwen2_window": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, use_sliding_window=True,
                                                     sliding_window=3, max_window_layers=0),
    # A window on only some layers: layer 1 (from max_window_layers on); layer 0 (layer_types).
    "qwen2_window_some_layers": lambda: transformers.Qwen2Config(
        **TINY, num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "qwen2_window_layer_types": lambda: transformers.Qwen2Config(
        **TINY, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"]),
    # Qwen3: per-head q/k RMSNorms, head_dim (32) apart from hidden_size / heads (16).
    "qwen3": lambda: transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32),
    "qwen3_tied_bias": lambda: transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32,
                                                        tie_word_embeddings=True, attention_bias=True),
    "qwen3_window_some_layers": lambda: transformers.Qwen3Config(
        **TINY, num_key_value_heads=2, head_dim=32, use_sliding_window=True, sliding_window=3,
        max_window_layers=1),
    # OLMo 2: norms after the sublayers, q/k RMSNorms over the full widths.
    "olmo2": lambda: transformers.Olmo2Config(**TINY, num_key_value_heads=2),
    "olmo2_tied_bias": lambda: transformers.Olmo2Config(**TINY, num_key_value_heads=2, attention_bias=True,
                                                        tie_word_embeddings=True),
    # Phi-3: fused qkv_proj and gate_up_proj; partial rotary with a window of 3 positions; LongRoPE
    # with the short factors (rows shorter than the original 16 positions) and the long ones
    # (longer than 4), its cos/sin factor sqrt(1 + ln(64 / original) / ln(original)).
    "phi3": lambda: transformers.Phi3Config(**TINY, num_key_value_heads=2),
    "phi3_partial_window": lambda: transformers.Phi3Config(**TINY, num_key_value_heads=2,
                                                           partial_rotary_factor=0.5, sliding_window=3),
    "phi3_longrope_short": lambda: _phi3_longrope(16),
    "phi3_longrope_long": lambda: _phi3_longrope(4),
    # Gemma: embeddings times sqrt(hidden), RMSNorms of (1 + weight), GeGLU, head_dim 32 (not
    # hidden / heads), tied embeddings (or not, with biases).
    "gemma": lambda: transformers.GemmaConfig(**TINY, num_key_value_heads=2, head_dim=32),
    "gemma_untied_bias": lambda: transformers.GemmaConfig(**TINY, num_key_value_heads=2, head_dim=32,
                                                          tie_word_embeddings=False, attention_bias=True),
    # Gemma 2: norms before and after both sublayers, scores scaled by 1/sqrt(24) (not head_dim),
    # a window of 3 positions on layer 0 (the default alternation), and soft-caps small enough to
    # change the logits (`test_gemma_softcaps_local_rope_matter`).
    "gemma2": lambda: transformers.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=32,
                                                query_pre_attn_scalar=24, sliding_window=3,
                                                attn_logit_softcapping=0.3, final_logit_softcapping=0.8),
    # Gemma 3: per-head q/k norms; layer 0 local (window of 3, RoPE base 10k), layer 1 global
    # (base 1M, linear scaling x4); and the soft-caps a Gemma 3 config can hold: the final one
    # applies, the attention one does not (transformers' Gemma 3 never passes it to attention).
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **TINY, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"], rope_parameters=_GEMMA3_ROPE),
    "gemma3_softcap": lambda: transformers.Gemma3TextConfig(
        **TINY, num_key_value_heads=2, head_dim=32, sliding_window=3,
        layer_types=["full_attention", "sliding_attention"], rope_parameters=_GEMMA3_ROPE, attn_logit_softcapping=0.3, final_logit_softcapping=0.8),
    # Mixtures of experts: top-2 of 4 (Mixtral, renormalised) or of 8 (Qwen3-MoE, renormalised only
    # with norm_topk_prob; head_dim from hidden / heads when the config has none); a window of 3.
    "mixtral": lambda: transformers.MixtralConfig(**MOE, num_local_experts=4, num_experts_per_tok=2),
    "mixtral_window_tied": lambda: transformers.MixtralConfig(**MOE, num_local_experts=4, num_experts_per_tok=2,
                                                              sliding_window=3, tie_word_embeddings=True),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**MOE, head_dim=32, moe_intermediate_size=32, num_experts=8,
                                                     num_experts_per_tok=2),
    "qwen3_moe_norm_topk_bias": lambda: transformers.Qwen3MoeConfig(
        **MOE, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
        attention_bias=True, use_sliding_window=True, sliding_window=3),
    "gpt_neox_parallel": lambda: transformers.GPTNeoXConfig(**NEOX, rotary_pct=0.25,
                                                            use_parallel_residual=True),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(**NEOX, rotary_pct=0.5,
                                                              use_parallel_residual=False),
    "gpt2": lambda: transformers.GPT2Config(**GPT2),
    "gpt2_inverse_layer_scale": lambda: transformers.GPT2Config(**GPT2, scale_attn_by_inverse_layer_idx=True),
}

_GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}


def _phi3_longrope(original: int):
    """Phi-4-mini's shape of RoPE: 3/4 of each head rotated (6 frequencies here), LongRoPE."""
    return transformers.Phi3Config(
        **TINY, num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
        original_max_position_embeddings=original,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                      "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]})


# Row 0 is right-padded (6 real tokens), row 1 left-padded (5 real tokens).
IDS = np.array([[5, 17, 33, 8, 99, 42, 0, 0], [0, 0, 0, 71, 12, 3, 64, 127]], np.int64)
VALID = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]], np.int64)
POS = np.maximum(np.cumsum(VALID, axis=1) - 1, 0)


def _mask(valid: np.ndarray) -> MaskInfo:
    """Causal rows whose keys are the real tokens (`valid`), at positions POS."""
    return MaskInfo.rows(valid, POS)


def _from_config(cfg, **kwargs):
    """transformers' fp32 model of `cfg` with eager attention: the reference implementation, which
    applies Gemma 2's attention soft-cap under every transformers version (5.17's sdpa path
    drops it)."""
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", **kwargs)


def _perturbed(cfg):
    """transformers' fp32 model of `cfg`, seed 0, every weight perturbed: HF zero-inits biases and
    sets norms to 1, so a weight read wrongly would not show otherwise."""
    torch.manual_seed(0)
    model = _from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _hf_model(name: str):
    return _perturbed(CONFIGS[name]())


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(VALID),
                    position_ids=torch.tensor(POS))
    return out.logits.numpy()


def _our_logits(path, **options) -> np.ndarray:
    bundle = build(resolve(str(path)), **options)
    params = bundle.runtime_params(load_params(bundle))
    hidden = bundle.hidden(params, None, jnp.asarray(IDS, jnp.int32), jnp.asarray(POS, jnp.int32),
                           _mask(VALID))
    logits = jnp.matmul(hidden, bundle.head(params), precision="highest")  # fp32 on GPUs too
    # Gemma 2's final soft-cap, as the LM head applies it (`head_logps`, tested below).
    return np.asarray(capped_logits(logits, bundle.args.spec().final_logit_softcap))


def _max_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    keep = VALID.astype(bool)
    return float(np.abs(ours[keep] - ref[keep]).max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory written by save_pretrained, HF logits), made once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (path, _hf_logits(model), model)
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, saved):
    path, ref, _ = saved(name)
    diff = _max_diff(_our_logits(path), ref)
    print(f"parity {name}: max|diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["llama", "gpt_neox_parallel"])
def test_sharded_safetensors_match(name, tmp_path):
    model = _hf_model(name)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert _max_diff(_our_logits(tmp_path), _hf_logits(model)) <= 1e-4


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_safetensors_match(param_dtype, tmp_path):
    """A bf16 checkpoint (the common hub dtype) read into fp32 or bf16 parameters: the weights
    are exactly bf16 numbers either way, so fp32 compute matches the bf16-rounded HF model."""
    model = _hf_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ref = _hf_logits(model.float())
    assert _max_diff(_our_logits(tmp_path, param_dtype=param_dtype), ref) <= 1e-4


def _write_flax_msgpack(model, path, bare: bool = False) -> None:
    """The torch weights in the old HF Flax layout: nested by module, `kernel` = weight.T,
    `embedding` for embeddings, `scale` for norms. `bare` drops the base-model prefix, as a
    checkpoint saved from the base model (e.g. FlaxGPT2Model) has it."""
    from flax.serialization import msgpack_serialize

    kinds = {}
    for mod_name, mod in model.named_modules():
        cls = type(mod).__name__
        if isinstance(mod, torch.nn.Embedding):
            kinds[mod_name] = "embedding"
        elif "Norm" in cls:
            kinds[mod_name] = "scale"
        elif isinstance(mod, torch.nn.Linear) or cls == "Conv1D":
            kinds[mod_name] = "kernel"
    tree: dict = {}
    for key, tensor in model.named_parameters():  # tied weights appear once, as in Flax
        mod_name, _, leaf = key.rpartition(".")
        arr = tensor.detach().numpy().copy()
        if leaf == "weight":
            leaf = kinds[mod_name]
            if leaf == "kernel":
                arr = np.ascontiguousarray(arr.T)
        parts = mod_name.split(".")
        if bare:
            assert parts[0] == model.base_model_prefix
            parts = parts[1:]
        node = tree
        for p in parts:
            node = node.setdefault(p, {})
        node[leaf] = arr
    (path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    model.config.save_pretrained(path)


@pytest.mark.parametrize("name,bare", [("llama", False), ("gpt_neox_parallel", False), ("gpt2", False),
                                       ("llama_tied", True), ("gpt2", True)])
def test_flax_msgpack_matches(name, bare, tmp_path, saved):
    _, ref, model = saved(name)
    _write_flax_msgpack(model, tmp_path, bare)
    assert not list(tmp_path.glob("*.safetensors"))
    assert _max_diff(_our_logits(tmp_path), ref) <= 1e-4


@pytest.mark.parametrize("name", ["llama", "gpt_neox_parallel", "gpt2_inverse_layer_scale", "olmo2",
                                  "phi3_longrope_long", "gemma3_softcap", "qwen3_moe"])
def test_layer_loop_matches_transformers(name, saved):
    """`scan_layers: false`: the same model run as a loop over per-layer weights."""
    path, ref, _ = saved(name)
    diff = _max_diff(_our_logits(path, scan_layers=False), ref)
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["llama", "gpt_neox_sequential", "gpt2_inverse_layer_scale"])
def test_gradient_checkpointing_keeps_gradients(name, saved):
    path, _, _ = saved(name)
    source = resolve(str(path))
    ids, pos, mask = jnp.asarray(IDS, jnp.int32), jnp.asarray(POS, jnp.int32), _mask(VALID)
    weight = jnp.asarray(VALID, jnp.float32)[..., None]

    def grads(bundle, params):
        loss = lambda p: jnp.sum(bundle.hidden(p, None, ids, pos, mask) * weight)
        return jax.jit(jax.grad(loss))(params)

    plain = build(source)
    params = load_params(plain)
    remat = build(source, gradient_checkpointing=True)
    assert remat.args.gradient_checkpointing
    g0, g1 = grads(plain, params), grads(remat, params)
    # The layer loop, fed the stacked tree: its gradients come back stacked, equal.
    g2 = grads(build(source, gradient_checkpointing=True, scan_layers=False), params)
    # Relative above 1: gradients here reach ~500, where one fp32 rounding step is 6e-5 (seen
    # with jax 0.11.2, whose fusions differ from 0.12's).
    for g in (g1, g2):
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / max(1.0, jnp.abs(a).max())),
                                             g0, g))
        assert max(diffs) <= 1e-5
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 0


@pytest.mark.parametrize("name", ["llama", "gpt_neox_parallel", "gpt2"])
def test_recompute_activations_keeps_gradients_in_less_memory(name, saved):
    """`training.recompute_activations` (default on): the attention core and the MLP activation are
    recomputed in the backward. Same logits as transformers either way, same gradients, and the
    compiled backward needs less temporary memory."""
    path, ref, _ = saved(name)
    source = resolve(str(path))
    ids, pos, mask = jnp.asarray(IDS, jnp.int32), jnp.asarray(POS, jnp.int32), _mask(VALID)
    weight = jnp.asarray(VALID, jnp.float32)[..., None]
    on, off = build(source), build(source, recompute_activations=False)
    assert on.args.recompute_activations and not off.args.recompute_activations
    params = load_params(on)

    def compiled(bundle):
        loss = lambda p: jnp.sum(jnp.sin(bundle.hidden(p, None, ids, pos, mask)) * weight)
        return jax.jit(jax.grad(loss)).lower(params).compile()

    c_on, c_off = compiled(on), compiled(off)
    g_on, g_off = c_on(params), c_off(params)
    # Relative above 1 (gradients here reach ~50): the two compiled programs fuse the attention
    # core differently, so equal math can differ by a few ulps (2.8e-7 relative seen on gpt2).
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / max(1.0, jnp.abs(a).max())),
                                         g_on, g_off))
    assert max(diffs) <= 1e-5
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_on)) > 0
    assert _max_diff(_our_logits(path, recompute_activations=False), ref) <= 1e-4
    temp = lambda c: c.memory_analysis().temp_size_in_bytes
    assert temp(c_on) < temp(c_off)


@pytest.mark.parametrize("name,sliding", [("qwen2_window_some_layers", (False, True)),
                                          ("qwen2_window_layer_types", (True, False)),
                                          ("gemma2", (True, False)), ("gemma3", (True, False))])
def test_window_on_some_layers_matches_transformers(name, sliding, saved):
    """A window of 3 positions (rows of 5-6 tokens) on only some layers, read per layer as a traced
    window under the scan and as a constant in the layer loop (each also under gradient
    checkpointing's remat, where the loop's layer index is traced too): transformers' logits. The
    same weights with the window on every layer, or on none, give other logits: the test can fail.
    Gemma 3's local layers also read their own RoPE, picked the same way."""
    path, ref, model = saved(name)
    bundle = build(resolve(str(path)))
    assert (bundle.args.sliding_window, bundle.args.sliding_layers) == (3, sliding)
    assert bundle.args.spec().layer_windows == tuple(3 if on else None for on in sliding)
    for scan in (True, False):
        for remat in (False, True):
            diff = _max_diff(_our_logits(path, scan_layers=scan, gradient_checkpointing=remat), ref)
            print(f"parity {name} scan_layers={scan} gradient_checkpointing={remat}: max|diff| = {diff:.2e}")
            assert diff <= 1e-4
    for kinds in (["sliding_attention"] * 2, ["full_attention"] * 2):
        other = _from_config(
            type(model.config)(**{**model.config.to_dict(), "layer_types": kinds}), dtype=torch.float32).eval()
        other.load_state_dict(model.state_dict())
        assert _max_diff(_hf_logits(other), ref) > 1e-3, kinds


@pytest.mark.parametrize("name", ["phi3_longrope_short", "phi3_longrope_long"])
def test_longrope_factors_matter(name, saved):
    """The LongRoPE cases pin which factors apply: with short and long factors swapped,
    transformers' logits move, so matching them above means the same choice was made."""
    _, ref, model = saved(name)
    rope = dict(model.config.rope_parameters)
    rope["short_factor"], rope["long_factor"] = rope["long_factor"], rope["short_factor"]
    other = _from_config(
        type(model.config)(**{**model.config.to_dict(), "rope_parameters": rope}), dtype=torch.float32).eval()
    other.load_state_dict(model.state_dict())
    assert _max_diff(_hf_logits(other), ref) > 1e-3


@pytest.mark.parametrize("name,change", [
    ("gemma2", {"attn_logit_softcapping": None}), ("gemma2", {"final_logit_softcapping": None}),
    ("gemma3_softcap", {"final_logit_softcapping": None}),
    ("gemma3", {"rope_parameters": {**_GEMMA3_ROPE, "sliding_attention": _GEMMA3_ROPE["full_attention"]}}),
    ("gemma3", {"rope_parameters": {**_GEMMA3_ROPE, "full_attention": _GEMMA3_ROPE["sliding_attention"]}})])
def test_gemma_softcaps_local_rope_matter(name, change, saved):
    """The Gemma cases pin the soft-caps and the two RoPEs: without a cap, or with the local layers
    reading the global RoPE (or the reverse), transformers' logits move, so matching them above
    means each was applied where transformers applies it."""
    _, ref, model = saved(name)
    other = _from_config(
        type(model.config)(**{**model.config.to_dict(), **change}), dtype=torch.float32).eval()
    other.load_state_dict(model.state_dict())
    assert _max_diff(_hf_logits(other), ref) > 1e-3


@pytest.mark.parametrize("chunk", [0, 48])
def test_final_logit_softcap_reaches_the_log_probs(chunk, saved):
    """Gemma 2's final-logit soft-cap in the LM head the loss reads (`head_logps`), over the whole
    vocabulary and in chunks of 48 of its 128 columns (the last chunk overlapping): the log-probs
    of each next token are transformers' log-softmax of its capped logits, and the mean logit
    theirs."""
    from jaxpref.objectives.head import head_logps

    path, ref, _ = saved("gemma2")
    bundle = build(resolve(str(path)))
    params = load_params(bundle)
    hidden = bundle.hidden(params, None, jnp.asarray(IDS, jnp.int32), jnp.asarray(POS, jnp.int32), _mask(VALID))
    tgt = np.roll(IDS, -1, axis=1)
    logp, mean_logit, _ = head_logps(hidden, bundle.head(params), jnp.asarray(tgt, jnp.int32), chunk,
                                     softcap=bundle.args.spec().final_logit_softcap)
    want = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1).numpy()
    want = np.take_along_axis(want, tgt[..., None], -1)[..., 0]
    keep = VALID.astype(bool)
    assert np.abs(np.asarray(logp)[keep] - want[keep]).max() <= 1e-5
    assert np.abs(np.asarray(mean_logit)[keep] - ref.mean(-1)[keep]).max() <= 1e-5


def test_gemma_rmsnorm_matches_transformers_in_bf16():
    """Gemma's RMSNorm multiplies by (1 + weight) in fp32, then rounds: `Norm(unit_offset=True)`
    gives its bf16 outputs bit for bit."""
    from jaxpref.models.layers import Norm

    rng = np.random.default_rng(0)
    x = torch.tensor(3 * rng.standard_normal((64, 256)), dtype=torch.bfloat16)
    norm = transformers.models.gemma.modeling_gemma.GemmaRMSNorm(256, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(0.3 * rng.standard_normal(256)))
        ref = norm(x).float().numpy()
    scale, xj = (jnp.asarray(t.detach().float().numpy(), jnp.bfloat16) for t in (norm.weight, x))
    ours = Norm(1e-6, False, jnp.bfloat16, jnp.bfloat16, unit_offset=True).apply({"params": {"scale": scale}}, xj)
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), ref)


@pytest.mark.parametrize("family,fp32_scale", [("olmo2", True), ("llama", False)])
def test_rmsnorm_rounding_matches_transformers_in_bf16(family, fp32_scale):
    """In bf16, OLMo 2's RMSNorm multiplies by its weight in fp32 and then rounds; Llama's rounds
    first. `Norm(fp32_scale=...)` gives each one's outputs bit for bit (and not the other's)."""
    from jaxpref.models.layers import Norm

    cls = {"olmo2": transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm,
           "llama": transformers.models.llama.modeling_llama.LlamaRMSNorm}[family]
    rng = np.random.default_rng(0)
    x = torch.tensor(3 * rng.standard_normal((64, 256)), dtype=torch.bfloat16)
    norm = cls(256, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(1 + 0.3 * rng.standard_normal(256)))
        ref = norm(x).float().numpy()
    scale, xj = (jnp.asarray(t.detach().float().numpy(), jnp.bfloat16) for t in (norm.weight, x))
    ours = {f: np.asarray(Norm(1e-6, False, jnp.bfloat16, jnp.bfloat16, fp32_scale=f).apply(
        {"params": {"scale": scale}}, xj).astype(jnp.float32)) for f in (True, False)}
    np.testing.assert_array_equal(ours[fp32_scale], ref)
    assert (ours[not fp32_scale] != ref).any()


def test_llama_hidden_act_matches_transformers(tmp_path):
    """Llama-family MLPs use config.json's `hidden_act` (transformers' ACT2FN); it was always SiLU."""
    model = _perturbed(transformers.LlamaConfig(**TINY, num_key_value_heads=2, hidden_act="gelu_pytorch_tanh"))
    model.save_pretrained(tmp_path)
    ref = _hf_logits(model)
    diff = _max_diff(_our_logits(tmp_path), ref)
    assert diff <= 1e-4, diff
    silu = _perturbed(transformers.LlamaConfig(**TINY, num_key_value_heads=2))   # same weights (seed 0)
    assert _max_diff(_hf_logits(silu), ref) > 1e-2   # the activation shows in the logits


def test_layer_types_of_another_length_is_named(tmp_path):
    cfg = json.loads(transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=3).to_json_string())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "layer_types": ["sliding_attention"] * 3}))
    with pytest.raises(ModelSourceError, match=r"`layer_types` has 3 entries for 2 layers"):
        build(resolve(str(tmp_path)))


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelSourceError, match=r"`bert`.*supported: .*gpt2.*gpt_neox.*llama"):
        build(resolve(str(tmp_path)))


def _rewrite(path, change) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    _hf_model("llama").save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelSourceError, match=r"lacks tensor `model\.layers\.1\.mlp\.up_proj\.weight`"):
        load_params(build(resolve(str(tmp_path))))


def test_wrong_shape_is_named(tmp_path):
    _hf_model("gpt2").save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"transformer.h.0.attn.c_attn.weight": np.zeros((64, 96), np.float32)}))
    with pytest.raises(ModelSourceError, match=r"`transformer\.h\.0\.attn\.c_attn\.weight` has shape \(64, 96\), "
                                               r"expected \(64, 192\)"):
        load_params(build(resolve(str(tmp_path))))


def test_pytorch_bin_only_says_convert(tmp_path):
    model = _hf_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match=r"pytorch_model\.bin.*convert"):
        load_params(build(resolve(str(tmp_path))))


_GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp"}


def _gguf_llama_permute(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation for `llama` files (its converter's `permute`)."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _add_spm_vocab(w, size: int, specials: list[str]) -> None:
    """A SentencePiece-style vocabulary of `size` tokens: `specials` (pad/unk/bos/eos), `\u2581`, the
    letters, `\u2581` + letter, letter pairs."""
    letters = [chr(x) for x in range(ord("a"), ord("z") + 1)]
    tokens = specials + ["\u2581"] + letters + ["\u2581" + x for x in letters]
    tokens += [x + y for x in letters for y in letters][: size - len(tokens)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3 if x != "<unk>" else 2 for x in specials] + [1] * (len(tokens) - len(specials)))
    for i, x in enumerate(specials):
        {"<pad>": w.add_pad_token_id, "<eos>": w.add_eos_token_id, "</s>": w.add_eos_token_id,
         "<bos>": w.add_bos_token_id, "<s>": w.add_bos_token_id, "<unk>": w.add_unk_token_id}[x](i)


def _write_gguf(model, path, arch: str = "qwen3", vocab: str = "bpe", experts: str = "stacked",
                window: bool = False) -> None:
    """A tiny model as llama.cpp writes one: F32 tensors under GGUF names (q/k rows permuted for
    `llama` only), a mixture's experts stacked [E, out, in] (`ffn_gate_exps`, `ffn_up_exps`,
    `ffn_down_exps`; with `experts="split"` one tensor per expert, `ffn_gate.3`, as older Mixtral
    files) with its router `ffn_gate_inp`, the shape in metadata (the sliding window with
    `window`), a vocabulary: byte-level ("bpe": the 256 byte symbols, two merges, EOS, two:
    transformers before 5.2x reads a one-element GGUF array as its element, a string), or
    Llama's SentencePiece-style ("spm", `<unk> <s> </s>` first)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    w.add_value_length(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if getattr(c, "num_experts_per_tok", None):
        w.add_expert_count(getattr(c, "num_experts", None) or c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(getattr(c, "moe_intermediate_size", c.intermediate_size))
    if window:
        w.add_sliding_window(c.sliding_window)
    if vocab == "spm":
        _add_spm_vocab(w, c.vocab_size, ["<unk>", "<s>", "</s>"])
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(list(bytes_to_unicode().values()) + ["\u0120t", "th", "<|endoftext|>"])
        w.add_token_types([1] * 258 + [3])
        w.add_token_merges(["\u0120 t", "t h"])
        w.add_eos_token_id(258)
    for key, t in model.state_dict().items():
        x, mod = t.detach().numpy().astype(np.float32), key.removesuffix(".weight")
        if not mod.startswith("model.layers."):
            w.add_tensor(f"{_GGUF_NAMES[mod]}.weight", x)
            continue
        i, rest = mod.split(".", 3)[2:]
        if rest.startswith("mlp.experts."):  # gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I]
            parts = ("gate", "up") if rest.endswith("gate_up_proj") else ("down",)
            for part, y in zip(parts, np.split(x, len(parts), axis=1)):
                each = [("_exps", y)] if experts == "stacked" else [(f".{e}", y[e]) for e in range(len(y))]
                for suffix, ys in each:
                    w.add_tensor(f"blk.{i}.ffn_{part}{suffix}.weight", np.ascontiguousarray(ys))
            continue
        if arch == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
            x = _gguf_llama_permute(x, c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads)
        w.add_tensor(f"blk.{i}.{_GGUF_NAMES[rest]}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3_gguf_matches_transformers(tmp_path):
    """A Qwen3 GGUF (q/k norms included) converted and read by jaxpref: transformers' logits of
    the model it was written from. head_dim is 128: transformers' Qwen3 GGUF config reads no
    head width and takes Qwen3Config's default, which every released Qwen3 uses."""
    cfg = transformers.Qwen3Config(**{**TINY, "vocab_size": 259}, num_key_value_heads=2, head_dim=128)
    model = _perturbed(cfg)
    _write_gguf(model, tmp_path / "tiny-qwen3.gguf")
    source = resolve(str(tmp_path / "tiny-qwen3.gguf"), cache_root=tmp_path / "cache")
    assert source.model_type == "qwen3"
    diff = _max_diff(_our_logits(source.path), _hf_logits(model))
    print(f"parity qwen3 gguf: max|diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("width", [768, 32])
def test_qwen3_moe_gguf_matches_transformers(width, tmp_path):
    """A Qwen3-MoE GGUF (`qwen3moe`: q/k norms, head_dim 32 from `key_length`, the experts
    stacked as llama.cpp stores them, top 2 of 4 renormalised) converted and read by jaxpref: the
    logits of the model it was written from, and at expert width 768 those transformers gives
    reading the same file (and at width 32 where transformers reads it: 5.17 does; 5.23's config
    keeps Qwen3MoeConfig's expert width, 768, whatever the file says). jaxpref reads the width from
    `expert_feed_forward_length`."""
    cfg = transformers.Qwen3MoeConfig(**{**MOE, "vocab_size": 259}, head_dim=32, moe_intermediate_size=width,
                                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    model = _perturbed(cfg)
    _write_gguf(model, tmp_path / "tiny-qwen3moe.gguf", "qwen3moe")
    source = resolve(str(tmp_path / "tiny-qwen3moe.gguf"), cache_root=tmp_path / "cache")
    assert source.model_type == "qwen3_moe"
    ours = _our_logits(source.path)
    written = _max_diff(ours, _hf_logits(model))
    try:   # transformers 5.23 cannot load the width-32 file (see above); 5.17 can
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file="tiny-qwen3moe.gguf", dtype=torch.float32).eval()
    except RuntimeError as e:
        assert width != 768 and "mismatched" in str(e), e
        theirs = None
    if theirs is not None:
        diff = _max_diff(ours, _hf_logits(theirs))
        print(f"parity qwen3_moe gguf, expert width {width}: max|diff| = {diff:.2e} (transformers on the GGUF)")
        assert diff <= 1e-4
    print(f"parity qwen3_moe gguf, expert width {width}: max|diff| = {written:.2e} (the model)")
    assert written <= 1e-4


@pytest.mark.parametrize("experts,window,top_k", [("stacked", True, 2), ("split", False, 3)])
def test_mixtral_gguf_matches_the_model_written(experts, window, top_k, tmp_path):
    """A Mixtral GGUF as llama.cpp writes it (`llama`: q/k rows permuted, the router
    `ffn_gate_inp`, the experts stacked [E, out, in] or, as older files, one tensor each, a
    SentencePiece vocabulary), whose config transformers reads as a dense Llama: jaxpref makes a
    Mixtral config of the metadata (for the conversion and for --dry-run's metadata alike), equal
    to the model's; the logits equal those of the model the file was written from (top 2 or 3
    of 4, untied, head_dim 32 apart from hidden / heads, a window of 3 where the file has one),
    and the tokenizer encodes as transformers' tokenizer of the file."""
    cfg = transformers.MixtralConfig(**MOE, head_dim=32, num_local_experts=4, num_experts_per_tok=top_k,
                                     tie_word_embeddings=False, sliding_window=3 if window else None, rms_norm_eps=1e-5,
                                     rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    model = _perturbed(cfg)
    _write_gguf(model, tmp_path / "tiny-mixtral.gguf", "llama", vocab="spm", experts=experts, window=window)
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file="tiny-mixtral.gguf")
    assert theirs.model_type == "llama" and not hasattr(theirs, "num_local_experts")  # were it to, compare with it
    source = resolve(str(tmp_path / "tiny-mixtral.gguf"), cache_root=tmp_path / "cache")
    meta = resolve(str(tmp_path / "tiny-mixtral.gguf"), cache_root=tmp_path / "meta", weights=False)
    assert source.model_type == "mixtral" and meta.hf_config == source.hf_config
    ours_cfg = transformers.AutoConfig.from_pretrained(str(source.path))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "num_local_experts", "num_experts_per_tok", "sliding_window", "bos_token_id", "eos_token_id"):
        assert getattr(ours_cfg, key) == getattr(cfg, key), key
    assert ours_cfg.rope_parameters["rope_theta"] == 100.0
    assert ours_cfg.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)   # stored as float32
    diff = _max_diff(_our_logits(source.path), _hf_logits(model))
    print(f"parity mixtral gguf ({experts} experts, window {window}): max|diff| = {diff:.2e} (the model)")
    assert diff <= 1e-4

    tok = transformers.AutoTokenizer.from_pretrained(str(source.path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny-mixtral.gguf")
    assert type(tok) is type(theirs)
    for text in ("hello world", " ab  cd z", "<s>thequickbrownfox</s>", "zz top"):
        assert tok(text)["input_ids"] == theirs(text)["input_ids"], text
    assert tok.convert_ids_to_tokens(tok("ab cd", add_special_tokens=False)["input_ids"]) == ["\u2581a", "b", "\u2581c", "d"]
    # The file's ids (transformers 5.17's own tokenizer of a `llama` file takes its BOS as EOS too).
    assert (tok.bos_token_id, tok.eos_token_id) == (ours_cfg.bos_token_id, ours_cfg.eos_token_id) == (1, 2)


@pytest.mark.parametrize("arch,missing", [("llama", "expert_count"), ("llama", "expert_used_count"), ("qwen2", "")])
def test_mixtral_gguf_without_its_expert_counts_is_refused_in_one_line(arch, missing, tmp_path):
    """A `llama` file with expert tensors but no `llama.expert_count` (or `expert_used_count`) is
    refused in one line naming the file and the key, and expert tensors under another dense
    architecture in one line naming it, by the conversion and by --dry-run's metadata, leaving
    nothing in the cache."""
    def fill(w):
        if missing != "expert_count":
            w.add_expert_count(4)
        if missing != "expert_used_count":
            w.add_expert_used_count(2)
        w.add_token_list(["<unk>", "<s>", "</s>"])
        w.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
        w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 8, 4), np.float32))

    named = f"`llama.{missing}`" if missing else "blk.0.ffn_gate_exps.weight`) under architecture `qwen2`"
    _refused_gguf(tmp_path, "no-counts.gguf", arch, fill, [named])


def _refused_gguf(tmp_path, name: str, arch: str, fill, needles) -> None:
    """A GGUF `name` of `arch` with what `fill(writer)` adds: refused in one line naming the file and
    each of `needles`, by the conversion and by --dry-run's metadata, leaving nothing in the cache."""
    import gguf

    path = tmp_path / name
    w = gguf.GGUFWriter(str(path), arch)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for weights in (False, True):
        with pytest.raises(ModelSourceError) as e:
            resolve(str(path), cache_root=tmp_path / "cache", weights=weights)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and all(n in msg for n in needles), msg
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
    print(msg)


def _write_gemma_gguf(model, path, arch: str) -> None:
    """A tiny Gemma as llama.cpp writes one: F32 tensors under the GGUF names the `gguf` package
    gives that architecture (llama.cpp's converter's table: Gemma 1's `post_attention_layernorm`
    is `ffn_norm`, Gemma 2's `post_attention_norm`), the RMSNorm weights
    plus one (llama.cpp's norm multiplies by the weight), q/k not permuted, tied embeddings (no
    `output`), the soft-caps and window in metadata, a SentencePiece-style vocabulary."""
    import gguf

    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "gemma2":
        w.add_sliding_window(c.sliding_window)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    _add_spm_vocab(w, c.vocab_size, ["<pad>", "<eos>", "<bos>", "<unk>"])
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue   # tied
        name = names.get_name(key, try_suffixes=(".weight",))
        x = t.detach().numpy().astype(np.float32)
        w.add_tensor(name, x + 1.0 if "norm" in name else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gemma2_gguf_matches_transformers(tmp_path):
    """A Gemma 2 GGUF (window of 3, pre/post norms stored plus one, tied embeddings) converted and
    read by jaxpref: the logits transformers gives reading the same file, and those of the model
    it was written from. transformers' Gemma 2 GGUF config reads neither the soft-caps nor
    `query_pre_attn_scalar`; the model keeps their defaults (50, 30, 256) so that it can read it."""
    cfg = transformers.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=32, sliding_window=3,
                                    tie_word_embeddings=True)
    model = _perturbed(cfg)
    _write_gemma_gguf(model, tmp_path / "tiny-gemma2.gguf", "gemma2")
    source = resolve(str(tmp_path / "tiny-gemma2.gguf"), cache_root=tmp_path / "cache")
    assert source.model_type == "gemma2"
    ours = _our_logits(source.path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny-gemma2.gguf", dtype=torch.float32, attn_implementation="eager").eval()
    assert theirs.config.sliding_window == 3
    diff, written = _max_diff(ours, _hf_logits(theirs)), _max_diff(ours, _hf_logits(model))
    print(f"parity gemma2 gguf: max|diff| = {diff:.2e} (transformers on the GGUF), {written:.2e} (the model)")
    assert diff <= 1e-4 and written <= 1e-4


def test_gemma1_gguf_matches_transformers(tmp_path):
    """A Gemma 1 GGUF (`gemma`: two norms a layer stored plus one, q/k not permuted, tied
    embeddings), whose config transformers does not read: jaxpref makes it from the metadata (for
    the conversion and for --dry-run's metadata alike), its logits equal those of the model the
    file was written from, and its tokenizer encodes as transformers' tokenizer of a Gemma 2 GGUF
    with the same vocabulary."""
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(**TINY, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    model = _perturbed(cfg)
    _write_gemma_gguf(model, tmp_path / "tiny-gemma.gguf", "gemma")
    with pytest.raises(ValueError):   # were it to read one, the test should compare with it
        transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file="tiny-gemma.gguf")
    try:
        transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny-gemma.gguf", tokenizer_type="gemma")
    except ValueError as e:   # transformers 5.17 (the GPU image's) builds no `gemma` GGUF tokenizer
        with pytest.raises(ModelSourceError, match=r"tiny-gemma\.gguf: transformers .* cannot build the tokenizer"):
            resolve(str(tmp_path / "tiny-gemma.gguf"), cache_root=tmp_path / "cache")
        pytest.skip(f"transformers {transformers.__version__} builds no Gemma 1 GGUF tokenizer ({e})")
    source = resolve(str(tmp_path / "tiny-gemma.gguf"), cache_root=tmp_path / "cache")
    meta = resolve(str(tmp_path / "tiny-gemma.gguf"), cache_root=tmp_path / "meta", weights=False)
    assert source.model_type == "gemma" and meta.hf_config == source.hf_config
    ours_cfg = transformers.AutoConfig.from_pretrained(str(source.path))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(ours_cfg, key) == getattr(cfg, key), key
    assert ours_cfg.rope_parameters["rope_theta"] == 100.0
    assert ours_cfg.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)   # stored as float32
    ours = _our_logits(source.path)
    diff = _max_diff(ours, _hf_logits(model))
    print(f"parity gemma gguf: max|diff| = {diff:.2e} (the model)")
    assert diff <= 1e-4

    gemma2 = _from_config(transformers.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=32, sliding_window=3))
    _write_gemma_gguf(gemma2, tmp_path / "tiny-gemma2.gguf", "gemma2")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny-gemma2.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(str(source.path))
    assert type(tok) is type(theirs)
    for text in ("hello world", " ab  cd z", "<bos>thequickbrownfox<eos>", "zz top"):
        assert tok(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ((tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (theirs.bos_token_id, theirs.eos_token_id,
            theirs.pad_token_id) == (ours_cfg.bos_token_id, ours_cfg.eos_token_id, ours_cfg.pad_token_id) == (2, 1, 0))
    assert "<start_of_turn>" in tok.chat_template   # Gemma's, the file having none


def test_gemma1_gguf_with_two_head_widths_is_refused_in_one_line(tmp_path):
    """Gemma's config has one head width: a file whose key and value widths differ is refused in
    one line naming the file and both keys."""
    def fill(w):
        w.add_key_length(32)
        w.add_value_length(16)
        w.add_token_list(["<pad>", "<eos>"])
        w.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))

    _refused_gguf(tmp_path, "two-widths.gguf", "gemma", fill, ["value_length", "head_dim"])


def _tie_routing(model, layer_rows: dict[int, list[int]]) -> None:
    """Give the experts in `layer_rows[layer]` the same router row in that layer: equal logits,
    so the router ties between them for every token."""
    with torch.no_grad():
        for layer, experts in layer_rows.items():
            w = model.model.layers[layer].mlp.gate.weight
            w[experts] = w[experts[0]].clone()


@pytest.mark.parametrize("name,tied", [("mixtral", {0: [0, 1, 2, 3], 1: [1, 2]}),
                                       ("qwen3_moe", {0: [0, 1, 2, 3, 4, 5, 6, 7], 1: [0, 5, 6]})])
def test_routing_ties_broken_as_transformers(name, tied, tmp_path):
    """Experts with equal router rows tie for every token (layer 0: all of them). torch.topk on a
    CPU picks the tied experts libstdc++'s nth_element leaves in front (top-2 of 4 equal: experts
    2 and 3), which `moe_ties: torch_cpu` (the default on a CPU) replays: transformers' logits on
    the CPU, whatever device jaxpref runs on. The lower index first (`lowest`, CUDA's topk and
    jax.lax.top_k; the default on a GPU) routes to other experts there and gives other logits, so
    the test can fail; on a GPU the default is checked against transformers on CUDA."""
    from jaxpref.models.moe import _ties
    model = _hf_model(name)
    _tie_routing(model, tied)
    model.save_pretrained(tmp_path)
    ref = _hf_logits(model)
    layer0 = model.model.layers[0].mlp.gate
    with torch.no_grad():
        chosen = layer0(torch.randn(3, model.config.hidden_size))[2]
    assert chosen.tolist() != [[0, 1]] * 3 and len({tuple(sorted(c)) for c in chosen.tolist()}) == 1, chosen
    diff = _max_diff(_our_logits(tmp_path, moe_ties="torch_cpu"), ref)
    print(f"parity {name} with routing ties: max|diff| = {diff:.2e}")
    assert diff <= 1e-4
    assert _max_diff(_our_logits(tmp_path, moe_ties="lowest"), ref) > 1e-3
    default = _ties(types.SimpleNamespace(moe_ties="auto"))
    assert default == ("torch_cpu" if jax.default_backend() == "cpu" else "lowest")
    if jax.default_backend() == "gpu" and torch.cuda.is_available():   # transformers on CUDA: lowest first
        with torch.no_grad():
            on_cuda = model.to("cuda")(**{k: torch.tensor(a, device="cuda") for k, a in
                                          (("input_ids", IDS), ("attention_mask", VALID), ("position_ids", POS))})
        assert _max_diff(_our_logits(tmp_path), on_cuda.logits.cpu().numpy()) <= 1e-4


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe_norm_topk_bias"])
def test_moe_ragged_dot_dispatch_matches_transformers(name, saved):
    """`jax.lax.ragged_dot` (the TPU path) gives the tiled dispatch's logits."""
    path, ref, _ = saved(name)
    diff = _max_diff(_our_logits(path, moe_dispatch="ragged_dot"), ref)
    print(f"parity {name} ragged_dot: max|diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_qwen3_moe_with_dense_layers_is_refused(tmp_path):
    cfg = transformers.Qwen3MoeConfig(**MOE, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                      mlp_only_layers=[1])
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match=r"layers \[1\] have a dense MLP"):
        build(resolve(str(tmp_path)))


def test_missing_expert_tensor_is_named(tmp_path):
    _hf_model("mixtral").save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ModelSourceError, match=r"lacks tensor `model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        load_params(build(resolve(str(tmp_path))))


@pytest.mark.parametrize("name,scan", [("mixtral", True), ("qwen3_moe_norm_topk_bias", False)])
def test_router_load_balancing_loss_matches_transformers(name, scan, saved):
    """The load-balancing loss (`hidden(..., router_aux=True)`) equals transformers' `aux_loss`
    (its `load_balancing_loss_func` over every layer's router logits, padding left out by the
    attention mask), under the layer scan and the layer loop."""
    path, _, model = saved(name)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(VALID),
                    position_ids=torch.tensor(POS), output_router_logits=True)
    bundle = build(resolve(str(path)), scan_layers=scan)
    params = bundle.runtime_params(load_params(bundle))
    _, aux = bundle.hidden(params, None, jnp.asarray(IDS, jnp.int32), jnp.asarray(POS, jnp.int32), _mask(VALID),
                           router_aux=True)
    ref = float(out.aux_loss)
    print(f"{name} load-balancing loss: ours {float(aux):.7f}, transformers {ref:.7f}")
    assert abs(float(aux) - ref) <= 1e-6 and ref > 0.5
    # padding counted as tokens would move it
    _, padded = bundle.hidden(params, None, jnp.asarray(IDS, jnp.int32), jnp.asarray(POS, jnp.int32),
                              _mask(np.ones_like(VALID)), router_aux=True)
    assert abs(float(padded) - ref) > 1e-4
