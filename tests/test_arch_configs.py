"""config.json variants read as transformers reads them (the architectures' `from_hf`).

The oracle is transformers' own config classes: a config.json that leaves a key out means that
class's default, which is not always LlamaConfig's.
"""
from __future__ import annotations

import json

import pytest
import transformers

from jaxpref.models import get_architecture
from test_model_parity import MOE, NEOX, TINY, _hf_logits, _max_diff, _our_logits, _perturbed

# Sizes only: every other key is left to the config class's default.
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=32,
             max_position_embeddings=64, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=32)


@pytest.mark.parametrize("model_type,extra", [
    ("mistral", {}), ("mixtral", {}), ("qwen3_moe", {}), ("olmo2", {}), ("phi3", {}),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 0}),
    ("qwen3", {"use_sliding_window": True, "max_window_layers": 0}),
    ("qwen3_moe", {"use_sliding_window": True})])
def test_keys_left_out_take_transformers_defaults(model_type, extra, tmp_path):
    hf = {"model_type": model_type, **SIZES, **extra}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    ref = transformers.AutoConfig.from_pretrained(tmp_path)
    args = get_architecture(model_type).args_cls.from_hf(hf)
    theta = ref.rope_parameters["rope_theta"]
    assert (args.num_key_value_heads, args.rms_norm_eps, args.rope_theta, args.sliding_window) == \
        (ref.num_key_value_heads, ref.rms_norm_eps, theta, getattr(ref, "sliding_window", None))


L = dict(TINY, num_key_value_heads=2)
_LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 4,
             "short_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0],
             "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 32.0, 32.0]}
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4}
# Config values transformers reads in a way of its own: Gemma 2/3's `hidden_activation: gelu` is the
# exact GELU (only Gemma 1's legacy `hidden_act: gelu` means the tanh form); `attention_bias` /
# `mlp_bias` where the modeling code has fixed biases (Qwen2: q/k/v only; Mistral, Phi-3, Qwen3's
# MLP: none) change nothing.
VARIANTS = {
    "gemma2_gelu": lambda: transformers.Gemma2Config(**L, head_dim=32, hidden_activation="gelu"),
    "gemma3_gelu": lambda: transformers.Gemma3TextConfig(**L, head_dim=32, hidden_activation="gelu"),
    "qwen2_attention_bias": lambda: transformers.Qwen2Config(**L, attention_bias=True, mlp_bias=True),
    "mistral_biases": lambda: transformers.MistralConfig(**L, attention_bias=True, mlp_bias=True),
    "qwen3_mlp_bias": lambda: transformers.Qwen3Config(**L, head_dim=32, attention_bias=True, mlp_bias=True),
    "phi3_biases": lambda: transformers.Phi3Config(**L, attention_bias=True, mlp_bias=True),
    # LongRoPE outside Phi-3 (transformers computes it for any of these families): its cos/sin
    # factor from max_position_embeddings / original when the config gives none. (A copy each:
# transformers writes into the dict it is given.)
    "llama_longrope": lambda: transformers.LlamaConfig(**L, rope_scaling=dict(_LONGROPE)),
    "qwen3_longrope": lambda: transformers.Qwen3Config(**L, head_dim=16, rope_scaling=dict(_LONGROPE)),
    # YaRN (was refused): its ramp between interpolated and original frequencies, and its cos/sin
    # factor (given, from mscale / mscale_all_dim, or from the factor alone; the factor itself from
    # max_position_embeddings / original when null).
    "qwen2_yarn_mscale": lambda: transformers.Qwen2Config(**L, rope_scaling=dict(
        _YARN, factor=8.0, mscale=0.7, mscale_all_dim=1.0, beta_fast=16, beta_slow=2, truncate=False)),
    "llama_yarn": lambda: transformers.LlamaConfig(**L, rope_scaling=dict(_YARN)),
    "qwen3_yarn_no_factor": lambda: transformers.Qwen3Config(**L, head_dim=32, rope_scaling=dict(
        _YARN, factor=None, original_max_position_embeddings=8)),
    "olmo2_yarn_attention_factor": lambda: transformers.Olmo2Config(**L, rope_scaling=dict(_YARN, attention_factor=1.5)),
    "gpt_neox_yarn": lambda: transformers.GPTNeoXConfig(**NEOX, rope_scaling=dict(_YARN)),
    # Gemma's global RoPE takes the same scalings (its local layers keep their own plain RoPE).
    "gemma_yarn": lambda: transformers.GemmaConfig(**L, head_dim=16, rope_scaling=dict(_YARN)),
    "gemma3_yarn": lambda: transformers.Gemma3TextConfig(**L, head_dim=16, rope_scaling=dict(_YARN),
                                                         layer_types=["full_attention", "sliding_attention"]),
    "gemma2_longrope": lambda: transformers.Gemma2Config(**L, head_dim=16, rope_scaling=dict(_LONGROPE)),
    "mixtral_yarn": lambda: transformers.MixtralConfig(**MOE, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                                      rope_scaling=dict(_YARN)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_variants_match_transformers(name, tmp_path):
    model = _perturbed(VARIANTS[name]())
    model.save_pretrained(tmp_path)
    diff = _max_diff(_our_logits(tmp_path), _hf_logits(model))
    print(f"parity {name}: max|diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_longrope_original_length_is_the_one_transformers_reads(family, tmp_path):
    """A config.json whose LongRoPE dict holds `original_max_position_embeddings` and no top-level
    one: Phi-3's config class fills the top-level key (4096), which transformers puts over the
    dict's; Llama reads the dict's. (Rows past 4 positions take the long factors only with 4.)"""
    cfg = (transformers.Phi3Config if family == "phi3" else transformers.LlamaConfig)(
        **L, rope_scaling=dict(_LONGROPE), original_max_position_embeddings=4)
    _perturbed(cfg).save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c.pop("original_max_position_embeddings", None)
    for key in ("attention_factor", "factor"):
        c["rope_parameters"].pop(key, None)
    c["rope_parameters"]["original_max_position_embeddings"] = 4
    (tmp_path / "config.json").write_text(json.dumps(c))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert _max_diff(_our_logits(tmp_path), _hf_logits(model)) <= 1e-4



@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_llama3_rope_without_its_original_length_is_transformers(family, tmp_path):
    """Llama 3 scaling whose dict leaves out `original_max_position_embeddings`: transformers takes
    max_position_embeddings (64 here); this was a KeyError in the forward."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    cfg = {"llama": lambda: transformers.LlamaConfig(**L, rope_scaling=rope),
           "gemma2": lambda: transformers.Gemma2Config(**L, head_dim=32, rope_scaling=rope),
           "gpt_neox": lambda: transformers.GPTNeoXConfig(**NEOX, rope_scaling=rope)}[family]()
    _perturbed(cfg).save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    del c["rope_parameters"]["original_max_position_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(c))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert model.config.rope_parameters["original_max_position_embeddings"] == 64
    assert _max_diff(_our_logits(tmp_path), _hf_logits(model)) <= 1e-4


@pytest.mark.parametrize("same", [False, True], ids=["differs", "equal"])
def test_head_stored_next_to_tied_embeddings_is_what_transformers_runs(same, tmp_path):
    """config.json ties the LM head, and the checkpoint holds one too: transformers (>= 5) runs the
    stored head when it differs from the embedding (we ran the embedding: other logits, silently;
    now refused naming the key), and ties the two when equal."""
    import torch

    from jaxpref.errors import ModelSourceError

    model = _perturbed(transformers.LlamaConfig(**L, tie_word_embeddings=False))
    if same:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**c, "tie_word_embeddings": True}))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    if same:
        assert _max_diff(_our_logits(tmp_path), _hf_logits(ref)) <= 1e-4
    else:
        with pytest.raises(ModelSourceError, match=r"`tie_word_embeddings: true`.*`lm_head\.weight`, which differs"):
            _our_logits(tmp_path)
