"""LoRA adapters cross the PEFT boundary both ways, and merged exports load in transformers alone.

The oracles are PEFT and transformers: a tiny random model is made and saved by transformers, read
by jaxpref, given a non-zero LoRA, and our logits with the adapter applied must equal
`peft.PeftModel`'s on the exported adapter (and transformers' on the merged export) to 1e-4 fp32.
Every architecture registered in `jaxpref.models.ARCHITECTURES` that has a tiny config below runs.
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file

from jaxpref.data.iterator import BatchIterator
from jaxpref.data.layouts import Layout
from jaxpref.config import TrainingConfig
from jaxpref.data.tokenize import Tokenized
from jaxpref.errors import ConfigError
from jaxpref.lora.peft import load_adapter, save_adapter
from jaxpref.lora.merged import save_merged
from jaxpref.models.attention import MaskInfo
from jaxpref.lora.tree import LoraSpec, count, init_lora, resolve_targets, target_shapes
from jaxpref.objectives.head import capped_logits
from jaxpref.objectives.losses import LossSpec
from jaxpref.models import ARCHITECTURES
from jaxpref.models.source import resolve
from jaxpref.models.weights import build, load_params
from jaxpref.training.step import StepOptions, TrainState, make_train_step, micro_loss
from jaxpref.training.optim import make_optimizer

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]

_DECODER = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
_NEOX = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
             rotary_pct=0.25)
_GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
             eos_token_id=2)

# model_type -> tiny transformers config; the attention projections that "attention" targets.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_DECODER),
    "mistral": lambda: transformers.MistralConfig(**_DECODER),
    "qwen2": lambda: transformers.Qwen2Config(**_DECODER),
    "qwen3": lambda: transformers.Qwen3Config(**{**_DECODER, "head_dim": 32}),
    "olmo2": lambda: transformers.Olmo2Config(**_DECODER),
    "phi3": lambda: transformers.Phi3Config(**_DECODER, partial_rotary_factor=0.5),
    # Gemma 2 with soft-caps that bite and a window of 4 on layer 0; Gemma 3 with q/k norms and a
    # local layer (window 4, its own RoPE base) before a global one.
    "gemma": lambda: transformers.GemmaConfig(**_DECODER, head_dim=32),
    "gemma2": lambda: transformers.Gemma2Config(**_DECODER, head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
                                                attn_logit_softcapping=0.3, final_logit_softcapping=0.8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **_DECODER, head_dim=32, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # Mixtures of experts: LoRA on the attention; the router and experts frozen.
    "mixtral": lambda: transformers.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_DECODER, head_dim=32, moe_intermediate_size=32,
                                                     num_experts=8, num_experts_per_tok=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_NEOX),
    "gpt2": lambda: transformers.GPT2Config(**_GPT2),
    # Same family as llama, other widths: an adapter for it does not fit the tiny llama.
    "llama_wide": lambda: transformers.LlamaConfig(**{**_DECODER, "hidden_size": 96,
                                                     "intermediate_size": 160}),
}
ATTENTION = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "olmo2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("qkv_proj", "o_proj"),   # the fused modules, as PEFT names them
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt_neox": ("query_key_value", "dense"),
    "gpt2": ("c_attn", "c_proj"),   # c_proj also names GPT-2's MLP output, as in PEFT
}
# Mixtures of experts: the sweeps here put LoRA on the attention (all-linear is refused: PEFT's covers
# the router); LoRA on the experts is tests/test_lora_experts.py's.
MOE = ("mixtral", "qwen3_moe")


def _arch_params():
    names = [n for n in CONFIGS if n != "llama_wide"]
    out = [pytest.param(n, marks=pytest.mark.skipif(n not in ARCHITECTURES, reason=f"{n} not registered"))
           for n in names]
    out += [pytest.param(n, marks=pytest.mark.skip(reason=f"no tiny config for {n}"))
            for n in ARCHITECTURES if n not in CONFIGS]
    return out


ARCHS = _arch_params()

# Ids below 64 fit every tiny vocabulary here and conftest's tokenizer.
IDS = np.random.default_rng(0).integers(3, 64, size=(2, 10)).astype(np.int64)
POS = np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape).copy()
MASK = MaskInfo.rows(np.ones((2, 10), np.int32))

@dataclass
class Base:
    path: Path
    bundle: object
    params: dict
    logits: np.ndarray   # transformers' logits of the base model


def _save_hf(name: str, path: Path) -> np.ndarray:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():  # HF zero-inits biases and sets norms to 1: perturb everything
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return _torch_logits(model)


def _random_lora_b(model, seed: int) -> None:
    """PEFT initialises B = 0 (a no-op adapter); draw B ~ N(0, 0.1) so the adapter changes logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.1)


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float().numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cache: dict[str, Base] = {}

    def get(name: str) -> Base:
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            ref = _save_hf(name, path)
            bundle = build(resolve(str(path)))
            b = cache[name] = Base(path, bundle, load_params(bundle), ref)
            # The base model itself must match before any adapter is judged.
            assert _diff(_our_logits(b), ref) <= TOL, f"{name}: base logits differ from transformers"
        return cache[name]
    return get


def _spec(b: Base, arch: str, targets: str, rslora: bool, r: int = 4) -> LoraSpec:
    want = "all-linear" if targets == "all-linear" and arch not in MOE else list(ATTENTION[arch])
    names = resolve_targets(want, b.bundle.arch, b.params)
    return LoraSpec(r=r, alpha=8.0, targets=names, use_rslora=rslora)


def _random_lora(params, spec: LoraSpec, seed: int = 0) -> dict:
    """init_lora's A, and B drawn at random so that the adapter changes the logits."""
    flat = traverse_util.flatten_dict(init_lora(params, spec, jax.random.PRNGKey(seed)))
    key = jax.random.PRNGKey(seed + 1)
    for i, k in enumerate(sorted(flat)):
        if k[-1] == "b":
            flat[k] = 0.1 * jax.random.normal(jax.random.fold_in(key, i), flat[k].shape, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def _our_logits(b: Base, lora=None, spec: LoraSpec | None = None) -> np.ndarray:
    """Logits [2, T, V] float32; with `lora`, the adapter applied at `spec.scale`."""
    bundle = b.bundle if spec is None else b.bundle.with_args(lora_scale=spec.scale)
    h = bundle.hidden(b.params, lora, jnp.asarray(IDS, jnp.int32), jnp.asarray(POS, jnp.int32), MASK)
    logits = jnp.matmul(h, bundle.head(b.params), precision="highest")  # fp32 on GPUs too
    return np.asarray(capped_logits(logits, bundle.args.spec().final_logit_softcap))   # Gemma 2's LM head


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def _record(key: str, diff: float) -> None:
    print(f"{key}: max|diff| = {diff:.2e}")   # shown with `pytest -s`


def _peft_on_base(base_path: Path, adapter: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, attn_implementation="eager")
    return peft.PeftModel.from_pretrained(model, str(adapter)).eval()


def _peft_lora_names(model) -> set[str]:
    """PEFT's LoRA tensor names as they are saved (without the adapter name)."""
    return {n.replace(".default.", ".") for n, _ in model.named_parameters()
            if ".lora_A." in n or ".lora_B." in n}


# ---------------------------------------------------------------------------------------------
# a) our adapter in PEFT


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_adapter_matches_peft_logits(arch, targets, rslora, base, tmp_path):
    b = base(arch)
    spec = _spec(b, arch, targets, rslora)
    lora = _random_lora(b.params, spec)
    ours = _our_logits(b, lora, spec)
    assert _diff(ours, b.logits) > 1e-2, "the adapter should change the logits"

    out = save_adapter(tmp_path / "adapter", b.bundle, lora, spec, str(b.path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(spec.targets) and cfg["use_rslora"] == rslora
    model = _peft_on_base(b.path, out)
    assert _peft_lora_names(model) == set(load_file(str(out / "adapter_model.safetensors")))
    diff = _diff(ours, _torch_logits(model))
    _record(f"a {arch} {targets} rslora={rslora}", diff)
    assert diff <= TOL


# ---------------------------------------------------------------------------------------------
# b) merged export in transformers alone


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_matches_in_transformers(arch, rslora, base, tmp_path):
    b = base(arch)
    spec = _spec(b, arch, "all-linear", rslora)
    lora = _random_lora(b.params, spec, seed=3)
    ours = _our_logits(b, lora, spec)
    out = save_merged(tmp_path / "merged", b.bundle, b.params, lora, spec)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    diff = _diff(ours, _torch_logits(model.eval()))
    _record(f"b {arch} merged rslora={rslora}", diff)
    assert diff <= TOL


# ---------------------------------------------------------------------------------------------
# c) export -> import is the identity


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_roundtrip_is_identity(arch, base, tmp_path):
    b = base(arch)
    spec = _spec(b, arch, "all-linear", True)
    lora = _random_lora(b.params, spec, seed=5)
    out = save_adapter(tmp_path / "adapter", b.bundle, lora, spec, str(b.path))
    back, spec2 = load_adapter(out, b.bundle, b.bundle.abstract_params())
    assert (spec2.r, spec2.alpha, set(spec2.targets), spec2.use_rslora) == \
        (spec.r, spec.alpha, set(spec.targets), spec.use_rslora)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(lora)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lora)):
        assert x.dtype == jnp.float32 and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    diff = _diff(_our_logits(b, back, spec2), _our_logits(b, lora, spec))
    _record(f"c {arch} roundtrip", diff)
    assert diff == 0.0


# ---------------------------------------------------------------------------------------------
# d) PEFT's adapter in jaxpref


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_made_adapter_loads_with_peft_logits(arch, targets, rslora, base, tmp_path):
    b = base(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(b.path, dtype=torch.float32, attn_implementation="eager")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules="all-linear" if targets == "all-linear" else list(ATTENTION[arch]),
                          use_rslora=rslora, fan_in_fan_out=b.bundle.arch.fan_in_fan_out)
    model = peft.get_peft_model(hf, cfg)
    _random_lora_b(model, seed=1)
    model.eval()
    theirs = _torch_logits(model)
    assert _diff(theirs, b.logits) > 1e-2
    model.save_pretrained(tmp_path / "peft")
    if arch in MOE and targets == "all-linear":   # the router and experts too: refused in one line
        with pytest.raises(ConfigError, match=r"is not supported by jaxpref$"):
            load_adapter(tmp_path / "peft", b.bundle, b.bundle.abstract_params())
        return

    lora, spec = load_adapter(tmp_path / "peft", b.bundle, b.bundle.abstract_params())
    assert spec.r == 4 and spec.alpha == 8 and spec.use_rslora == rslora
    assert count(lora) == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    diff = _diff(_our_logits(b, lora, spec), theirs)
    _record(f"d {arch} {targets} rslora={rslora}", diff)
    assert diff <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_on_some_layers_loads_as_zeros_elsewhere(arch, base, tmp_path):
    """`layers_to_transform` (and PEFT's full-name targets) cover only some modules: the rest get
    A = B = 0, the same model, and the tree keeps init_lora's structure."""
    b = base(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(b.path, dtype=torch.float32, attn_implementation="eager")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ATTENTION[arch]), layers_to_transform=[1],
                          fan_in_fan_out=b.bundle.arch.fan_in_fan_out, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf, cfg)
    _random_lora_b(model, seed=2)
    theirs = _torch_logits(model.eval())
    model.save_pretrained(tmp_path / "peft")
    lora, spec = load_adapter(tmp_path / "peft", b.bundle, b.bundle.abstract_params())
    want = init_lora(b.bundle.abstract_params(), spec, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(lora) == jax.tree_util.tree_structure(want)
    for x in jax.tree_util.tree_leaves(lora):
        assert not np.any(np.asarray(x[0]))   # layer 0 untouched
    diff = _diff(_our_logits(b, lora, spec), theirs)
    _record(f"d {arch} layers_to_transform=[1]", diff)
    assert diff <= TOL


# ---------------------------------------------------------------------------------------------
# e) errors name what is wrong


def _other_arch(arch: str) -> str | None:
    """A registered architecture whose module names differ from `arch`'s."""
    for other in ("gpt2", "gpt_neox", "llama"):
        if other in ARCHITECTURES and ATTENTION[other] != ATTENTION[arch]:
            return other
    return None


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_for_another_architecture_is_refused(arch, base, tmp_path):
    b = base(arch)
    other = _other_arch(arch)
    if other is None:
        pytest.skip("no registered architecture with other module names")
    o = base(other)
    spec = _spec(o, other, "attention", False)
    out = save_adapter(tmp_path / "adapter", o.bundle, _random_lora(o.params, spec), spec, str(o.path))
    with pytest.raises(ConfigError, match=r"tensor `base_model\.model\.[^`]+\.lora_[AB]\.weight`"):
        load_adapter(out, b.bundle, b.bundle.abstract_params())


def test_adapter_for_another_shape_is_refused(base, tmp_path):
    if "llama" not in ARCHITECTURES:
        pytest.skip("llama not registered")
    wide, small = base("llama_wide"), base("llama")
    spec = _spec(wide, "llama", "attention", False)
    out = save_adapter(tmp_path / "adapter", wide.bundle, _random_lora(wide.params, spec), spec, str(wide.path))
    with pytest.raises(ConfigError, match=r"tensor `base_model\.model\.model\.layers\.\d+\.self_attn\.\w+"
                                          r"\.lora_[AB]\.weight` has shape"):
        load_adapter(out, small.bundle, small.bundle.abstract_params())


def test_adapter_missing_a_tensor_names_it(base, tmp_path):
    if "llama" not in ARCHITECTURES:
        pytest.skip("llama not registered")
    from safetensors.numpy import save_file

    b = base("llama")
    spec = _spec(b, "llama", "attention", False)
    out = save_adapter(tmp_path / "adapter", b.bundle, _random_lora(b.params, spec), spec, str(b.path))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, str(out / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=re.escape(f"lacks tensor `{gone}`")):
        load_adapter(out, b.bundle, b.bundle.abstract_params())


@pytest.mark.parametrize("text,needle", [
    ("[1]", "holds a JSON list"),
    ('"adapter"', "holds a JSON str"),
    ('{"r": 4, "lora_alpha": 8, "target_modules": 5}', "`target_modules` must be a list of names, got 5"),
    ('{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", 2]}', "`target_modules` must be a list"),
    ('{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "target_parameters": 3}', "`target_parameters`"),
])
def test_adapter_config_of_the_wrong_shape_is_one_error(text, needle, tmp_path):
    """An adapter_config.json that is not an object, or whose target lists are not lists of names,
    raised AttributeError / TypeError."""
    from jaxpref.lora.peft import spec_from_adapter

    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        spec_from_adapter(tmp_path)


@pytest.mark.parametrize("key,value", [("r", 8), ("lora_alpha", 16.0), ("use_rslora", True),
                                       ("target_modules", ["q_proj", "v_proj"])])
def test_init_from_conflicting_lora_settings_are_refused(key, value, base, tmp_path):
    if "llama" not in ARCHITECTURES:
        pytest.skip("llama not registered")
    from jaxpref.config import config_from_dict
    from jaxpref.training.setup import lora_spec_for

    b = base("llama")
    spec = _spec(b, "llama", "attention", False)
    out = save_adapter(tmp_path / "adapter", b.bundle, _random_lora(b.params, spec), spec, str(b.path))
    lora_cfg = {"r": 4, "lora_alpha": 8.0, "target_modules": list(ATTENTION["llama"]),
                "init_from": str(out)}
    data = {"models": [{"huggingface_id": str(b.path)}], "dataset": {"name": "x.jsonl"}}
    same = lora_spec_for(config_from_dict({**data, "lora": lora_cfg}, "ok.yaml"), b.bundle.arch, b.params)
    assert (same.r, same.alpha, set(same.targets), same.use_rslora) == (4, 8.0, set(spec.targets), False)
    cfg = config_from_dict({**data, "lora": {**lora_cfg, key: value}}, "bad.yaml")
    with pytest.raises(ConfigError, match=rf"bad.yaml: `lora.{key}` .* `lora.init_from`"):
        lora_spec_for(cfg, b.bundle.arch, b.params)


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_target_module_lists_module_names(arch, base):
    b = base(arch)
    with pytest.raises(ConfigError) as e:
        resolve_targets(["not_a_module"], b.bundle.arch, b.params, "cfg.yaml")
    msg = str(e.value)
    assert "not_a_module" in msg and "cfg.yaml" in msg
    for name in b.bundle.arch.linear_modules:
        assert name in msg


@pytest.mark.parametrize("arch", ARCHS)
def test_rank_above_a_target_dimension_is_refused(arch, base):
    b = base(arch)
    spec = _spec(b, arch, "all-linear", False)
    shapes = target_shapes(b.params, spec)
    path, shape = min(shapes.items(), key=lambda kv: min(kv[1][-2:]))
    big = LoraSpec(r=min(shape[-2:]) + 1, alpha=8.0, targets=spec.targets)
    with pytest.raises(ConfigError, match=rf"`lora.r` = {big.r} .*`{path[-1]}`"):
        target_shapes(b.params, big, "cfg.yaml")
    with pytest.raises(ConfigError):
        init_lora(b.params, big, jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# f) only LoRA-sized state; the reference is the base tree itself


def _one_batch(pairs: int = 2) -> dict:
    rng = np.random.default_rng(7)
    tok = lambda n: [int(x) for x in rng.integers(3, 128, size=n)]
    data = Tokenized(prompt=[tok(4) for _ in range(pairs)], chosen=[tok(3) for _ in range(pairs)],
                     rejected=[tok(5) for _ in range(pairs)])
    it = BatchIterator(data, pairs, 1, 0, Layout(max_length=64), shuffle=False)
    batch, _ = next(it)
    return batch


def _base_size_arrays(params, spec: LoraSpec) -> int:
    """Live device arrays with the shape of a base weight (and of no LoRA factor)."""
    lora = jax.eval_shape(lambda: init_lora(params, spec, jax.random.PRNGKey(0)))
    lora_shapes = {x.shape for x in jax.tree_util.tree_leaves(lora)}
    shapes = {x.shape for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2} - lora_shapes
    gc.collect()
    return sum(1 for x in jax.live_arrays() if x.shape in shapes)


@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_state_holds_only_lora_shaped_arrays(arch, base):
    b = base(arch)
    spec = _spec(b, arch, "all-linear", False)
    lora = init_lora(b.bundle.abstract_params(), spec, jax.random.PRNGKey(0))
    tcfg = TrainingConfig(learning_rate=1e-3, weight_decay=0.01)
    opt, _ = make_optimizer(tcfg, 10)
    opt_state = opt.init(lora)
    lora_shapes = {x.shape for x in jax.tree_util.tree_leaves(lora)}
    arrays = [x for x in jax.tree_util.tree_leaves(opt_state) if x.ndim > 0]
    assert arrays and all(x.shape in lora_shapes for x in arrays), \
        sorted({x.shape for x in arrays} - lora_shapes)
    assert sum(x.size for x in arrays) == 2 * count(lora)   # Adam's mu and nu, nothing else


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_is_base_with_adapter_off_no_copy(arch, base):
    b = base(arch)
    spec = _spec(b, arch, "all-linear", False)
    bundle = b.bundle.with_args(lora_scale=spec.scale)
    ids = [id(x) for x in jax.tree_util.tree_leaves(b.params)]
    before = _base_size_arrays(b.params, spec)

    lora = init_lora(b.params, spec, jax.random.PRNGKey(0))   # B = 0: policy == reference
    opt, _ = make_optimizer(TrainingConfig(learning_rate=1e-2), 10)
    state = TrainState(lora, opt.init(lora), jnp.zeros((), jnp.int32), jax.random.PRNGKey(1))
    opts = StepOptions(LossSpec(), num_seqs=4, ref_mode="lora_off")
    mb = _one_batch().micro(0)
    loss, m = jax.jit(lambda lora, params, mb: micro_loss(lora, params, mb, None, bundle, None, None, opts))(
        state.lora, b.params, mb)
    # a mixture of experts adds its router's load-balancing term, as TRL (0.001 x about 2 here)
    aux = float(m["aux_loss"][0]) if arch in MOE else 0.0
    assert (arch in MOE) == (bundle.router_aux_coef == 0.001) and (aux > 1.0 or arch not in MOE)
    assert abs(float(loss) - math.log(2) - bundle.router_aux_coef * aux) < 1e-6
    np.testing.assert_array_equal(np.asarray(m["rewards/chosen"]), 0.0)
    np.testing.assert_array_equal(np.asarray(m["rewards/rejected"]), 0.0)
    # Policy and reference forwards ran on the one base tree: no base-size array was added.
    assert before > 0 and _base_size_arrays(b.params, spec) == before
    assert [id(x) for x in jax.tree_util.tree_leaves(b.params)] == ids


def test_train_step_allocates_no_base_size_array(base):
    """The whole compiled step (policy + reference forward, grads, Adam) keeps only LoRA-size state;
    the step is architecture-independent, so one architecture suffices."""
    if "llama" not in ARCHITECTURES:
        pytest.skip("llama not registered")
    b = base("llama")
    spec = _spec(b, "llama", "all-linear", False)
    bundle = b.bundle.with_args(lora_scale=spec.scale)
    before = _base_size_arrays(b.params, spec)
    lora = init_lora(b.params, spec, jax.random.PRNGKey(0))
    opt, schedule = make_optimizer(TrainingConfig(learning_rate=1e-2), 10)
    state = TrainState(lora, opt.init(lora), jnp.zeros((), jnp.int32), jax.random.PRNGKey(1))
    step = make_train_step(bundle, StepOptions(LossSpec(), num_seqs=4, ref_mode="lora_off"), opt, schedule)
    state, metrics = step(state, b.params, None, _one_batch(), None)
    jax.block_until_ready(metrics)
    assert abs(float(metrics["loss"]) - math.log(2)) < 1e-6
    assert float(metrics["rewards/chosen"]) == 0.0 and float(metrics["rewards/rejected"]) == 0.0
    assert _base_size_arrays(b.params, spec) == before
    assert all(not x.is_deleted() for x in jax.tree_util.tree_leaves(b.params))
    assert all(x.shape in {y.shape for y in jax.tree_util.tree_leaves(lora)}
               for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)


# ---------------------------------------------------------------------------------------------
# g) the command line: train -> export -> continue from the adapter


def _cli(module: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAXPREF_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _metrics(run: Path) -> list[dict]:
    """Training rows of a run's metrics.jsonl (eval rows carry no `loss`)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_cli_train_export_and_continue(tmp_path, tiny_llama, tiny_pairs):
    if "llama" not in ARCHITECTURES:
        pytest.skip("llama not registered")
    from conftest import write_config

    out = tmp_path / "runs"
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    training = {"max_steps": 2, "learning_rate": 1e-2, "lr_scheduler_type": "constant"}
    cfg = write_config(tmp_path / "train.yaml", tiny_llama, tiny_pairs, lora=lora, training=training)
    p = _cli("jaxpref.train", "--config", cfg, "--output-dir", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    run = out / "tiny"
    assert abs(_metrics(run)[0]["loss"] - math.log(2)) < 1e-4   # B = 0 at step 0

    merged = tmp_path / "merged"
    p = _cli("jaxpref.export", "--run", run, "--merged-out", merged, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    peft_logits = _torch_logits(_peft_on_base(tiny_llama, run / "adapter"))
    base_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert _diff(peft_logits, _torch_logits(base_model.eval())) > 1e-4, "the LoRA should have moved"
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    diff = _diff(_torch_logits(merged_model.eval()), peft_logits)
    _record("g cli merged vs peft-on-base", diff)
    assert diff <= TOL

    # Continue from the adapter. Same seed and data, so step 1 sees the batch the first run's
    # step 1 saw (with B = 0, the base model); the policy's log-probs now differ: it starts from
    # the adapter. (The loss need not: the reference may be the base or the initial adapter.)
    cfg2 = write_config(tmp_path / "more.yaml", tiny_llama, tiny_pairs,
                        models=[{"name": "more", "huggingface_id": str(tiny_llama)}],
                        lora={**lora, "init_from": str(run / "adapter")}, training={**training, "max_steps": 1})
    p = _cli("jaxpref.train", "--config", cfg2, "--output-dir", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    first, cont = _metrics(run)[0], _metrics(out / "more")[0]
    assert first["num_tokens"] == cont["num_tokens"]   # the same batch
    for k in ("logps/chosen", "logps/rejected"):
        assert abs(cont[k] - first[k]) > 1e-3, (k, first[k], cont[k])

    # A rank that conflicts with the adapter's: exit 2, one line on stderr, no traceback.
    cfg3 = write_config(tmp_path / "bad.yaml", tiny_llama, tiny_pairs,
                        models=[{"name": "bad", "huggingface_id": str(tiny_llama)}],   # not over the finished run
                        lora={**lora, "r": 8, "init_from": str(run / "adapter")})
    p = _cli("jaxpref.train", "--config", cfg3, "--output-dir", out, cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "`lora.r` is 8" in lines[0] and "init_from" in lines[0], lines[0]

    # Export to a file path, and an adapter whose weights file is cut short: one line, exit 2.
    (tmp_path / "afile").write_text("x")
    p = _cli("jaxpref.export", "--run", run, "--adapter-out", tmp_path / "afile", cwd=tmp_path)
    assert p.returncode == 2 and "is a file, expected a directory" in p.stderr and "Traceback" not in p.stderr
    import shutil
    shutil.copytree(run, tmp_path / "cut")
    st = tmp_path / "cut" / "adapter" / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:20])
    p = _cli("jaxpref.export", "--run", tmp_path / "cut", "--adapter-out", tmp_path / "again", cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "not a readable safetensors file" in lines[0], p.stderr


@pytest.mark.parametrize("kw,needle", [
    ({"alora_invocation_tokens": [5, 6]}, "`alora_invocation_tokens: [5, 6]` is not supported"),
    ({"bias": "lora_only"}, '`bias: "lora_only"` is not supported'),
])
def test_peft_lora_variants_with_their_own_forward_are_refused(kw, needle, tmp_path):
    """An aLoRA adapter (PEFT applies it only after its invocation tokens) was loaded as a plain
    LoRA, and PEFT's `bias` training too: another model than PEFT's, silently."""
    import copy

    from conftest import save_tiny_llama
    from jaxpref.models.source import resolve
    from jaxpref.models.weights import build

    save_tiny_llama(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config, **kw)).eval()
    pm.save_pretrained(tmp_path / "variant")
    if "alora_invocation_tokens" in kw:   # PEFT's model is not the plain LoRA of the same tensors
        ids = torch.tensor([[1, 10, 11, 12, 5, 6, 13, 14]])
        torch.manual_seed(0)
        plain = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config)).eval()
        with torch.no_grad():
            assert (pm(ids).logits - plain(ids).logits).abs().max() > 1e-2
    bundle = build(resolve(str(tmp_path / "base")))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_adapter(tmp_path / "variant", bundle, bundle.abstract_params())


@pytest.mark.parametrize("arch,table", [("llama", "lm_head"), ("llama", "embed_tokens"), ("gpt_neox", "embed_out")])
def test_peft_adapter_on_the_embedding_or_head_is_refused_by_name(arch, table, base, tmp_path):
    """PEFT puts LoRA on the LM head or the token embedding when target_modules names them; the
    error blamed the adapter's tensors on another architecture."""
    b = base(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(b.path)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[ATTENTION[arch][0], table]))
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ConfigError, match=re.escape(f"LoRA on `{table}` (the ")):
        load_adapter(tmp_path / "adapter", b.bundle, b.params)


def test_adapter_names_the_base_revision_peft_loads(tmp_path):
    """A hub model pinned at `models[i].revision`: the adapter's `revision` is it, which
    `AutoPeftModelForCausalLM` passes to the base's from_pretrained (it was always null: PEFT
    would load the base's main branch)."""
    from conftest import save_tiny_llama
    from jaxpref.models.source import resolve
    from jaxpref.models.weights import build

    save_tiny_llama(tmp_path / "base")
    bundle = build(resolve(str(tmp_path / "base")))
    spec = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "v_proj"))
    lora = init_lora(bundle.abstract_params(), spec, jax.random.PRNGKey(0), "test")
    for revision in (None, "0123abc"):
        bundle.source.revision = revision
        out = save_adapter(tmp_path / f"adapter_{revision}", bundle, lora, spec, "org/tiny-llama")
        config = peft.PeftConfig.from_pretrained(out)
        assert (config.base_model_name_or_path, config.revision) == ("org/tiny-llama", revision)
