"""LoRA on a mixture's experts crosses the PEFT boundary both ways, as PEFT's `target_parameters`.

transformers 5 holds each layer's experts as fused 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`); PEFT adapts them with nested `lora.ParamWrapper`s. The oracles are PEFT
and transformers: our adapter (random, or after a training step) loads in `peft.PeftModel` and
gives our logits to 1e-4 fp32; PEFT's own adapter loads in jaxpref and gives PEFT's logits; the
merged export loads in transformers alone. The router stays frozen: targeting it is refused.
"""
from __future__ import annotations

import json
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

from jaxpref.config import TrainingConfig
from jaxpref.errors import ConfigError
from jaxpref.lora.merged import save_merged
from jaxpref.lora.peft import load_adapter, save_adapter
from jaxpref.lora.tree import LoraSpec, count, init_lora, resolve_targets
from jaxpref.models.attention import MaskInfo
from jaxpref.models.source import resolve
from jaxpref.models.weights import build, load_params
from jaxpref.objectives.losses import LossSpec
from jaxpref.training.optim import make_optimizer
from jaxpref.training.step import StepOptions, TrainState, make_train_step

TOL = 1e-4
_MOE = dict(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**_MOE, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_MOE, head_dim=32, moe_intermediate_size=32,
                                                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
}
IDS = np.random.default_rng(0).integers(3, 128, size=(2, 10)).astype(np.int64)
POS = np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape).copy()
MASK = MaskInfo.rows(np.ones((2, 10), np.int32))
TARGETS = {"attention+experts": ["q_proj", "v_proj", "gate_up_proj", "down_proj"],
           "down_proj": ["down_proj"], "gate_up_proj": ["gate_up_proj"]}


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.float().numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            model.save_pretrained(path)
            bundle = build(resolve(str(path)))
            cache[name] = (path, bundle, load_params(bundle), _torch_logits(model))
        return cache[name]
    return get


def _our_logits(bundle, params, lora, spec) -> np.ndarray:
    bundle = bundle.with_args(lora_scale=spec.scale)
    h = bundle.hidden(params, lora, jnp.asarray(IDS, jnp.int32), jnp.asarray(POS, jnp.int32), MASK)
    return np.asarray(jnp.matmul(h, bundle.head(params), precision="highest"))


def _random_lora(params, spec, seed=0) -> dict:
    flat = traverse_util.flatten_dict(init_lora(params, spec, jax.random.PRNGKey(seed)))
    for i, k in enumerate(sorted(flat)):
        if k[-1] == "b":
            flat[k] = 0.1 * jax.random.normal(jax.random.PRNGKey(seed + 100 + i), flat[k].shape, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def _peft(path: Path, adapter: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, str(adapter)).eval()


def _diff(a, b) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_expert_adapter_loads_in_peft_with_our_logits(arch, targets, base, tmp_path):
    """Our adapter names the experts in `target_parameters`; PEFT nests its wrappers of one
    module's parameters in transformers' order, so gate_up_proj's tensors sit under
    `experts.base_layer.` when down_proj is targeted too, and under `experts.` alone when not."""
    path, bundle, params, ref = base(arch)
    spec = LoraSpec(r=4, alpha=8.0, targets=resolve_targets(TARGETS[targets], bundle.arch, params))
    lora = _random_lora(params, spec)
    ours = _our_logits(bundle, params, lora, spec)
    assert _diff(ours, ref) > 1e-2, "the adapter should change the logits"
    out = save_adapter(tmp_path / "adapter", bundle, lora, spec, str(path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    experts = [t for t in TARGETS[targets] if t in ("gate_up_proj", "down_proj")]
    assert cfg["target_parameters"] == [f"mlp.experts.{t}" for t in ("gate_up_proj", "down_proj") if t in experts]
    assert cfg["target_modules"] == (sorted(set(TARGETS[targets]) - set(experts)) or None)
    model = _peft(path, out)
    names = {n.replace(".default.", ".") for n, _ in model.named_parameters() if ".lora_" in n}
    assert names == set(load_file(str(out / "adapter_model.safetensors")))
    diff = _diff(ours, _torch_logits(model))
    print(f"{arch} {targets}: ours vs PEFT max|diff| = {diff:.1e}")
    assert diff <= TOL
    back, spec2 = load_adapter(out, bundle, bundle.abstract_params())   # and back: the identity
    assert set(spec2.targets) == set(spec.targets)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lora)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_peft_made_expert_adapter_loads_with_peft_logits(arch, base, tmp_path):
    path, bundle, params, ref = base(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_rslora=True,
        target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False)).eval()
    theirs = _torch_logits(model)
    assert _diff(theirs, ref) > 1e-2
    model.save_pretrained(tmp_path / "peft")
    lora, spec = load_adapter(tmp_path / "peft", bundle, bundle.abstract_params())
    assert set(spec.targets) == {"k_proj", "o_proj", "gate_up_proj", "down_proj"} and spec.use_rslora
    assert count(lora) == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    diff = _diff(_our_logits(bundle, params, lora, spec), theirs)
    print(f"{arch} PEFT's expert adapter in jaxpref: max|diff| = {diff:.1e}")
    assert diff <= TOL


def test_trained_expert_adapter_and_merged_export_match_peft_and_transformers(base, tmp_path):
    """Two DPO steps from PEFT's initialisation (B = 0) move the experts' factors; the adapter then
    gives PEFT our logits, and the merged export gives transformers them."""
    path, bundle, params, ref = base("mixtral")
    spec = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "gate_up_proj", "down_proj"))
    run = bundle.with_args(lora_scale=spec.scale)
    lora = init_lora(params, spec, jax.random.PRNGKey(0))
    opt, schedule = make_optimizer(TrainingConfig(learning_rate=5e-2), 10)
    state = TrainState(lora, opt.init(lora), jnp.zeros((), jnp.int32), jax.random.PRNGKey(1))
    step = make_train_step(run, StepOptions(LossSpec(), num_seqs=4, ref_mode="lora_off"), opt, schedule)
    batch = _batch()
    for _ in range(2):
        state, metrics = step(state, params, None, batch, None)
    trained = jax.device_get(state.lora)
    b = traverse_util.flatten_dict(trained)[("layers", "mlp", "experts", "down_proj", "b")]
    assert float(np.abs(b).max()) > 1e-3, "the experts' factors should have trained"
    ours = _our_logits(bundle, params, trained, spec)
    out = save_adapter(tmp_path / "adapter", bundle, trained, spec, str(path))
    diff = _diff(ours, _torch_logits(_peft(path, out)))
    merged = save_merged(tmp_path / "merged", bundle, params, trained, spec)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged_diff = _diff(ours, _torch_logits(hf.eval()))
    print(f"trained expert adapter: vs PEFT {diff:.1e}, merged vs transformers {merged_diff:.1e}")
    assert diff <= TOL and merged_diff <= TOL


def _batch():
    from jaxpref.data.iterator import BatchIterator
    from jaxpref.data.layouts import Layout
    from jaxpref.data.tokenize import Tokenized

    rng = np.random.default_rng(7)
    tok = lambda n: [int(x) for x in rng.integers(3, 128, size=n)]
    data = Tokenized(prompt=[tok(4) for _ in range(2)], chosen=[tok(3) for _ in range(2)],
                     rejected=[tok(5) for _ in range(2)])
    return next(BatchIterator(data, 2, 1, 0, Layout(max_length=64), shuffle=False))[0]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_router_lora_is_refused_in_one_line(arch, base, tmp_path):
    """The router stays frozen: `gate` as a target, `all-linear` (PEFT's covers the router) and a
    PEFT adapter on `gate.weight` are refused naming it."""
    path, bundle, params, _ = base(arch)
    listed = r"\(q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj\)$"
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: `lora\.target_modules` entry `gate` is a mixture of "
                                          r"experts' router, .*" + listed):
        resolve_targets(["q_proj", "gate"], bundle.arch, params, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: `lora\.target_modules: all-linear` on a mixture .*router"):
        resolve_targets("all-linear", bundle.arch, params, "cfg.yaml")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                            target_parameters=["mlp.gate.weight"])).save_pretrained(tmp_path / "p")
    with pytest.raises(ConfigError, match=r"LoRA on `gate` \(a mixture of experts' router.*is not supported by jaxpref$"):
        load_adapter(tmp_path / "p", bundle, bundle.abstract_params())


def test_expert_lora_with_dropout_is_refused(base, tmp_path):
    """PEFT's ParamWrapper takes no dropout, and neither do our expert factors: one line."""
    from jaxpref.config import config_from_dict
    from jaxpref.training.setup import lora_spec_for

    path, bundle, params, _ = base("mixtral")
    data = {"models": [{"name": "m", "huggingface_id": str(path)}], "dataset": {"name": "x.jsonl"},
            "post_training": {"disable_dropout": False}}
    lora = {"target_modules": ["q_proj", "down_proj"], "lora_dropout": 0.1}
    with pytest.raises(ConfigError, match=r"^bad\.yaml: `lora\.lora_dropout` = 0\.1 with the experts targeted "
                                          r"\(down_proj\).*set it to 0$"):
        lora_spec_for(config_from_dict({**data, "lora": lora}, "bad.yaml"), bundle.arch, params)
    spec = lora_spec_for(config_from_dict({**data, "lora": {**lora, "lora_dropout": 0.0}}, "ok.yaml"),
                         bundle.arch, params)
    assert set(spec.targets) == {"q_proj", "down_proj"}


def test_flop_model_counts_the_experts_a_token_runs(base):
    """Per token, the step's FLOP count takes top_k of the E experts' kernels and LoRA factors."""
    from jaxpref.runtime.flops import FlopModel

    _, bundle, params, _ = base("mixtral")       # D 64, I 48, E 4, top 2, 2 layers, kv width 32
    spec = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "down_proj"))
    lora = jax.eval_shape(lambda: init_lora(params, spec, jax.random.PRNGKey(0)))
    fm = FlopModel.of(bundle.abstract_params(), bundle.args, lora)
    attention, router, expert = 2 * 64 * 64 + 2 * 64 * 32, 64 * 4, 64 * 96 + 48 * 64
    assert fm.base == 2 * (attention + router + 2 * expert)
    assert fm.lora == 2 * (4 * (64 + 64) + 2 * 4 * (48 + 64))


def test_peft_adapter_naming_expert_kernels_only_in_target_modules_loads_as_peft_reads_it(base, tmp_path):
    """PEFT matches `target_modules` against modules: on fused experts (parameters, not modules)
    `down_proj` there matches nothing and the adapter holds attention factors only; jaxpref reads
    it the same way (it used to refuse it: "lacks tensor ...experts...")."""
    path, bundle, params, ref = base("mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                    init_lora_weights=False)).eval()
    theirs = _torch_logits(model)
    model.save_pretrained(tmp_path / "peft")
    lora, spec = load_adapter(tmp_path / "peft", bundle, bundle.abstract_params())
    assert set(spec.targets) == {"q_proj", "v_proj"}
    assert _diff(_our_logits(bundle, params, lora, spec), theirs) <= TOL
