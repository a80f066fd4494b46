"""config.json variants read as transformers reads them (the architectures' `from_hf`).

The oracle is transformers' own config classes: a config.json that leaves a key out means that
class's default, which is not always LlamaConfig's.
"""
from __future__ import annotations

import json

import pytest
import transformers

from jaxpref.models import get_architecture

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
