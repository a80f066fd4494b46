"""The optimizer, schedule and clipping of `training` equal what TRL's trainers (transformers'
Trainer underneath) do: the learning rate of each step for every scheduler and warm-up form,
AdamW / SGD / Adafactor updates with weight decay left off biases and norm weights (the Trainer's
`get_decay_parameter_names`), and `grad_norm` logged before clipping."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import PAIRS, save_tiny_llama, write_config
from jaxpref import train
from jaxpref.config.schema import TrainingConfig
from jaxpref.training.optim import make_optimizer

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def hf_rates(kind: str, warmup, total: int) -> list[float]:
    """transformers' learning rate of each optimizer step (TrainingArguments' warm-up rule)."""
    from transformers import TrainingArguments, get_scheduler

    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, lr_scheduler_type=kind,
                             warmup_steps=warmup, report_to=[])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = get_scheduler(kind, opt, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total)
    rates = []
    for _ in range(total):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return rates


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_schedule_and_warmup_form_equals_transformers(kind):
    """warmup_steps whole, a fraction below 1 (transformers 5), warmup_ratio (the same fraction),
    and a warm-up longer than the run (transformers ramps towards a peak it never reaches)."""
    for total in (1, 5, 7):
        for warmup, ratio in ((0, 0.0), (1, 0.0), (2, 0.0), (0.3, 0.0), (0, 0.3), (0.99, 0.0), (10, 0.0)):
            tc = TrainingConfig(learning_rate=1e-3, lr_scheduler_type=kind, warmup_steps=warmup, warmup_ratio=ratio)
            _, schedule = make_optimizer(tc, total)
            mine = [float(schedule(k)) for k in range(total)]
            theirs = hf_rates(kind, warmup or ratio, total)
            assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-12), (kind, total, warmup, ratio)


def _stacked_tree(rng):
    """A trainable tree as ours are: top-level leaves, per-layer leaves stacked on a leading axis
    (kernels [L, in, out], biases, norm scales) and a LoRA factor."""
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return {"embed_tokens": f(10, 6), "norm": {"scale": f(6)},
            "layers": {"q_proj": {"kernel": f(2, 6, 8), "bias": f(2, 8)}, "input_layernorm": {"scale": f(2, 6)},
                       "k_proj": {"a": f(2, 6, 3)}}}


def _as_torch(tree) -> dict:
    """The same numbers as transformers' separate parameters (per layer, [out, in])."""
    ps = {"model.embed_tokens.weight": tree["embed_tokens"], "model.norm.weight": tree["norm"]["scale"]}
    for i in range(2):
        lay = tree["layers"]
        ps[f"model.layers.{i}.q_proj.weight"] = lay["q_proj"]["kernel"][i].T
        ps[f"model.layers.{i}.q_proj.bias"] = lay["q_proj"]["bias"][i]
        ps[f"model.layers.{i}.input_layernorm.weight"] = lay["input_layernorm"]["scale"][i]
        ps[f"model.layers.{i}.k_proj.lora_A.weight"] = lay["k_proj"]["a"][i].T
    return {k: torch.nn.Parameter(torch.tensor(np.array(v))) for k, v in ps.items()}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
def test_optimizer_updates_equal_the_trainers(optimizer):
    """Three steps of our optimizer (with clipping to 1.0, weight decay 0.1, linear schedule with
    one warm-up step) on a stacked tree equal the Trainer's optimizer for `optim` adamw_torch /
    sgd / adafactor (transformers' Adafactor, scale_parameter and relative_step off) on the same
    numbers as separate parameters, decay grouped by `get_decay_parameter_names`' patterns."""
    import jax
    import optax
    from transformers import get_scheduler
    from transformers.optimization import Adafactor
    from transformers.trainer import Trainer

    rng = np.random.default_rng(0)
    tree = _stacked_tree(rng)
    grads = [jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32) * (1 + k), tree)
             for k in range(3)]
    tc = TrainingConfig(learning_rate=1e-2, weight_decay=0.1, optimizer=optimizer, warmup_steps=1)
    opt, _ = make_optimizer(tc, 5)
    params = jax.tree_util.tree_map(jax.numpy.asarray, tree)
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)

    tp = _as_torch(tree)
    module = torch.nn.Module()
    for k, v in tp.items():   # the parameters under their dotted names, as a model holds them
        *path, leaf = k.split(".")
        parent = module
        for name in path:
            if not hasattr(parent, name):
                parent.add_module(name, torch.nn.Module())
            parent = getattr(parent, name)
        parent.register_parameter(leaf, v)
    decayed = set(Trainer.get_decay_parameter_names(None, module))   # the Trainer's own rule
    assert decayed == {k for k in tp if "bias" not in k and "norm" not in k}
    groups = [{"params": [tp[k] for k in tp if k in decayed], "weight_decay": 0.1},
              {"params": [tp[k] for k in tp if k not in decayed], "weight_decay": 0.0}]
    theirs = {"adamw": lambda: torch.optim.AdamW(groups, lr=1e-2), "sgd": lambda: torch.optim.SGD(groups, lr=1e-2),
              "adafactor": lambda: Adafactor(groups, lr=1e-2, scale_parameter=False, relative_step=False)}[optimizer]()
    sched = get_scheduler("linear", theirs, num_warmup_steps=1, num_training_steps=5)
    for g in grads:
        tg = _as_torch(g)
        for k in tp:
            tp[k].grad = tg[k].data.clone()
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        theirs.step()
        sched.step()
    mine = _as_torch(jax.tree_util.tree_map(np.asarray, params))
    for k in tp:
        np.testing.assert_allclose(mine[k].detach().numpy(), tp[k].detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{optimizer} {k}")


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory):
    """A tiny Llama with attention and MLP biases (weights the Trainer does not decay)."""
    return save_tiny_llama(tmp_path_factory.mktemp("biased_llama"), attention_bias=True, mlp_bias=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_full_finetune_with_weight_decay_equals_dpo_trainer(tmp_path, biased_llama, optimizer):
    """`jaxpref train`, `lora.enabled: false`, weight_decay 0.1, cosine with one warm-up step,
    max_grad_norm 0.5: each step's loss, grad_norm (before clipping) and learning_rate, and the
    weights after three steps, equal TRL's DPOTrainer (optim adamw_torch / adafactor) on the same
    model and pairs (one batch of all four pairs per step, so the order does not matter)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS[:4]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    training = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "weight_decay": 0.1,
                "lr_scheduler_type": "cosine", "warmup_steps": 1, "max_grad_norm": 0.5, "max_length": 64}
    cfg = write_config(tmp_path / "c.yaml", biased_llama, data, lora={"enabled": False},
                       training={**training, "optimizer": optimizer})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "tiny" / "metrics.jsonl").read_text().splitlines()]

    model = AutoModelForCausalLM.from_pretrained(biased_llama, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                     learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=1,
                     max_grad_norm=0.5, optim="adamw_torch" if optimizer == "adamw" else "adafactor",
                     max_length=64, beta=0.1, report_to=[], use_cpu=True, save_strategy="no", seed=0, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(biased_llama))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]
    assert [r["step"] for r in rows] == [h["step"] for h in theirs] == [1, 2, 3]
    assert theirs[1]["grad_norm"] > 0.5   # clipping acted, and the logged norm is the one before it
    for m, t in zip(rows, theirs):
        for k in ("loss", "grad_norm", "learning_rate", "epoch"):
            assert m[k] == pytest.approx(t[k], rel=1e-4, abs=1e-6), (m["step"], k, m[k], t[k])
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "tiny" / "model", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(biased_llama, dtype=torch.float32).state_dict()
    want = trainer.model.state_dict()
    for name, w in tuned.state_dict().items():
        moved = (want[name] - base[name]).norm().item()
        err = (w - want[name]).norm().item()
        assert err <= 1e-3 * moved, (name, err, moved)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_lora_sgd_over_epoch_boundaries_equals_dpo_trainer(tmp_path, tiny_llama):
    """LoRA (from a PEFT adapter with random A and B), SGD with weight decay 0.1,
    constant_with_warmup over 2 steps, 6 pairs in batches of 2 taken in order, max_steps 5 (past
    the first epoch of 3 steps): each step's loss, grad_norm, learning_rate and epoch (1/3, 2/3,
    1, 4/3, 5/3, unrounded as the Trainer logs it), and the adapter after the run, equal
    DPOTrainer's (optim sgd)."""
    from datasets import Dataset
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from conftest import save_moved_adapter

    adapter = save_moved_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                 tmp_path / "init_adapter")
    pairs = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS[:6]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    training = {"max_steps": 5, "per_device_train_batch_size": 2, "learning_rate": 0.05, "weight_decay": 0.1,
                "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 2, "max_length": 64}
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, data, post_training={"method": "dpo", "beta": 0.1},
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_from": str(adapter)},
                       training={**training, "optimizer": "sgd", "train_sampling_strategy": "sequential"})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "tiny" / "metrics.jsonl").read_text().splitlines()]

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), **training, optim="sgd", logging_steps=1, beta=0.1,
                     train_sampling_strategy="sequential", report_to=[], use_cpu=True, save_strategy="no",
                     seed=0, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(tiny_llama))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]
    assert [r["step"] for r in rows] == [h["step"] for h in theirs] == [1, 2, 3, 4, 5]
    for m, t in zip(rows, theirs):
        for k in ("loss", "grad_norm", "learning_rate", "epoch", "rewards/margins"):
            assert m[k] == pytest.approx(t[k], rel=1e-5, abs=1e-6), (m["step"], k, m[k], t[k])
    trainer.model.save_pretrained(tmp_path / "trl_adapter")
    want = load_file(tmp_path / "trl_adapter" / "adapter_model.safetensors")
    start = load_file(adapter / "adapter_model.safetensors")
    mine = load_file(tmp_path / "o" / "tiny" / "adapter" / "adapter_model.safetensors")
    assert set(mine) == set(want)
    for name, w in want.items():
        moved = (w - start[name]).norm().item()
        assert moved > 0
        assert (mine[name] - w).norm().item() <= 1e-4 * moved + 1e-7, name
