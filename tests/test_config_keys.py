"""Config keys with one home: aliases move to it, a method's own keys belong to that method, the
seed's `gpu.ddp` and `logging.log_level` do what they say, and auto layouts resolve as documented."""
from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from jaxpref.config import config_from_dict
from jaxpref.errors import ConfigError

BASE = {"models": [{"name": "m", "huggingface_id": "some/model"}], "dataset": {"name": "d.jsonl"}}


def cfg(**sections):
    return config_from_dict({**BASE, **sections}, "c.yaml")


def test_training_aliases_move_to_finetuning():
    c = cfg(training={"save_steps": 5, "gradient_checkpointing": True})
    assert (c.finetuning.save_steps, c.finetuning.gradient_checkpointing) == (5, True)
    assert c.save_steps == 5 and c.gradient_checkpointing
    assert not hasattr(c.training, "save_steps")
    with pytest.raises(ConfigError, match="same setting; give it once, as `finetuning.save_steps`"):
        cfg(training={"save_steps": 5}, finetuning={"save_steps": 7})


@pytest.mark.parametrize("method, key, value, owner", [
    ("dpo", "cpo_alpha", 0.5, "simpo, cpo"),
    ("orpo", "desirable_weight", 2.0, "kto"),
    ("kto", "orpo_nll_span", "completion", "orpo"),
    ("cpo", "ld_alpha", 0.5, "dpo, ipo"),
])
def test_a_key_of_another_method_is_an_error(method, key, value, owner):
    with pytest.raises(ConfigError, match=f"`post_training.{key}` applies to method {owner}, not {method}"):
        cfg(post_training={"method": method, key: value})
    # Its default is no setting at all (the example config lists every key).
    cfg(post_training={"method": method, key: getattr(cfg().post_training, key)})


def test_each_method_declares_its_loss_types_and_data():
    from jaxpref.objectives.methods import METHODS

    assert set(METHODS) == {"dpo", "ipo", "kto", "orpo", "simpo", "cpo", "grpo", "rloo", "online_dpo", "ppo"}
    assert [m for m, x in METHODS.items() if x.online] == ["grpo", "rloo", "online_dpo", "ppo"]
    assert cfg(post_training={"method": "ipo"}).loss_types == ["ipo"]
    assert cfg(post_training={"method": "cpo", "loss_type": "hinge"}).loss_types == ["hinge"]
    with pytest.raises(ConfigError, match=r"`post_training.loss_type` `orpo` is a loss of method orpo, not of cpo "
                                          r"\(its losses: sigmoid, hinge, ipo, simpo\)"):
        cfg(post_training={"method": "cpo", "loss_type": "orpo"})
    # The seed README's KTO loss: the older paired KTO is a DPO loss, named as such.
    with pytest.raises(ConfigError, match="`kto_pair` is a loss of method dpo / ipo, not of kto"):
        cfg(post_training={"method": "kto", "loss_type": "kto_pair"})
    with pytest.raises(ConfigError, match="`post_training.loss_type` is `nope`, expected one of kto"):
        cfg(post_training={"method": "kto", "loss_type": "nope"})
    assert [m for m, x in METHODS.items() if x.data == "unpaired"] == ["kto"]
    assert [m for m, x in METHODS.items() if x.tokenization == "row"] == ["orpo", "simpo", "cpo"]


def test_ddp_false_is_one_device():
    from jaxpref.runtime.mesh import make_mesh

    c = cfg(gpu={"ddp": False})
    assert make_mesh(c.gpu, c.source).devices.size == 1
    with pytest.raises(ConfigError, match="`gpu.ddp: false` trains on one device"):
        make_mesh(cfg(gpu={"ddp": False, "mesh": {"data": 2}}).gpu, "c.yaml")


def test_log_level_sets_the_root_level(tmp_path, tiny_llama, tiny_pairs, capsys):
    from conftest import write_config
    from jaxpref import train

    path = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, logging={"log_level": "error",
                                                                              "report_to": [], "progress_bar": False})
    before = logging.getLogger().level
    try:
        assert train.main(["--config", str(path), "--dry-run"]) == 0
        assert logging.getLogger().level == logging.ERROR
    finally:
        logging.getLogger().setLevel(before)
    with pytest.raises(ConfigError, match="`logging.log_level` is `loud`"):
        cfg(logging={"log_level": "loud"})


def test_auto_layout_resolves_to_shared_prompt_padding_free():
    from jaxpref.data.layouts import PairLayout
    from jaxpref.data.prepare import resolve_layout

    assert resolve_layout(cfg()) == (PairLayout.SHARED_PROMPT, True)
    assert resolve_layout(cfg(post_training={"method": "kto"})) == (PairLayout.CONCATENATED, True)
    assert resolve_layout(cfg(training={"pair_layout": "packed"})) == (PairLayout.PACKED, False)
    assert resolve_layout(cfg(training={"padding_free": False})) == (PairLayout.SHARED_PROMPT, False)
    with pytest.raises(ConfigError, match="KTO needs `training.pair_layout: concatenated`"):
        cfg(post_training={"method": "kto"}, training={"pair_layout": "shared_prompt"})


def test_each_method_logs_the_metrics_it_declares():
    """`Method.metrics` (what early stopping may name) is what its loss returns."""
    import jax.numpy as jnp

    from jaxpref.data.batches import Batch
    from jaxpref.objectives.losses import LossSpec, PairStats
    from jaxpref.objectives.methods import METHODS, LossInputs

    b = 2
    stats = PairStats(*[jnp.full((b,), v, jnp.float32) for v in (-3.0, -4.0, 2.0, 3.0, 5.0, 4.0, -1.0, -1.5,
                                                                  0.5, 0.7)],
                      ent_sum=jnp.full((2 * b,), 4.0), top1_sum=jnp.full((2 * b,), 1.0))   # entropy's sums
    z = jnp.zeros((2 * b, 3), jnp.int32)
    batch = Batch(input_ids=z, positions=z, segment_ids=z, branch=z, tgt_src=z, tgt_ids=z, tgt_seq=z,
                  tgt_weight=z.astype(jnp.float32), tgt_full=z.astype(jnp.float32), labels=jnp.array([1.0, 0.0]))
    for name, m in METHODS.items():
        if m.online:   # tests/test_online_methods.py
            continue
        spec = LossSpec(method=name, loss_types=(m.default_loss_type,))
        _, metrics = m.loss(LossInputs(stats, jnp.zeros((2 * b,)), jnp.zeros((2 * b, 3)), batch, 2 * b), spec)
        assert {k for k in metrics if not k.startswith("_")} == set(m.metrics), name


@pytest.mark.parametrize("section, values, message", [
    ("gpu", {"device_ids": []}, "`gpu.device_ids` is empty (null: every device)"),
    ("gpu", {"device_ids": [0, 1, 0]}, "`gpu.device_ids` names device 0 twice"),
    ("training", {"length_buckets": [64, 0]}, "`training.length_buckets` are padded lengths in tokens (>= 1), got 0"),
    ("training", {"length_buckets": [-4]}, "got -4"),
    ("training", {"pair_layout": "SHARED_PROMPT"}, "(did you mean `shared_prompt`?)"),
    ("training", {"attention": "XLA_Chunked"}, "(did you mean `xla_chunked`?)"),
    # gpu.distributed was an untyped mapping: int("two") was a traceback, a misspelt key was ignored.
    ("gpu", {"distributed": {"coordinator_address": "h:1", "num_processes": "two", "process_id": 0}},
     "`gpu.distributed.num_processes` must be an integer"),
    ("gpu", {"distributed": {"auto": True, "timout_s": 5}}, "unknown key `gpu.distributed.timout_s` (did you mean `timeout_s`?)"),
    ("gpu", {"distributed": {"auto": "yes"}}, "`gpu.distributed.auto` must be true or false"),
    ("gpu", {"distributed": {"num_processes": 2, "process_id": 0}}, "`gpu.distributed.coordinator_address` is missing"),
    ("gpu", {"distributed": {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}},
     "`gpu.distributed.process_id` must be in [0, num_processes - 1]"),
    ("gpu", {"distributed": {"auto": True, "timeout_s": 0}}, "`gpu.distributed.timeout_s` must be >= 1"),
])
def test_bad_layout_and_device_values_are_one_line_errors(section, values, message):
    """An empty `device_ids` used to fail deep in the mesh (ZeroDivisionError); duplicates and
    non-positive bucket lengths passed; a near miss in other letter case had no hint."""
    with pytest.raises(ConfigError) as e:
        config_from_dict({**BASE, section: values}, "c.yaml")
    assert str(e.value).startswith("c.yaml: ") and "\n" not in str(e.value) and message in str(e.value), str(e.value)


def test_keys_that_would_be_ignored_are_refused():
    """`ref_model_id` without a separate reference, and warmup_ratio beside warmup_steps (which
    wins), would be read and then ignored: one line each."""
    with_ref = [{"name": "m", "huggingface_id": "some/model", "ref_model_id": "other/model"}]
    with pytest.raises(ConfigError, match=r"`models\[0\].ref_model_id` names a separate reference model, which is "
                                          r"read only with `post_training.use_ref_model: true`"):
        cfg(models=with_ref)
    assert cfg(models=with_ref, post_training={"use_ref_model": True}).models[0].ref_model_id == "other/model"
    assert cfg(models=with_ref, lora={"enabled": False}).models[0].ref_model_id == "other/model"
    with pytest.raises(ConfigError, match=r"`training.warmup_steps` \(10\) and `training.warmup_ratio` \(0.1\) "
                                          r"are both set; give one"):
        cfg(training={"warmup_steps": 10, "warmup_ratio": 0.1})
    assert cfg(training={"warmup_ratio": 0.1}).training.warmup_ratio == 0.1
    assert cfg(training={"warmup_steps": 0.1}).training.warmup_steps == 0.1
    # A separate or precomputed reference for a method or loss that reads none.
    for pt, key, why in [({"method": "orpo", "use_ref_model": True}, "use_ref_model", "orpo uses no reference model"),
                         ({"method": "simpo", "precompute_ref_logps": True}, "precompute_ref_logps",
                          "simpo uses no reference model"),
                         ({"method": "dpo", "reference_free": True, "use_ref_model": True}, "use_ref_model",
                          "with `post_training.reference_free: true` no reference is computed")]:
        with pytest.raises(ConfigError, match=f"`post_training.{key}` would be ignored: {re.escape(why)}"):
            cfg(post_training=pt)
    assert cfg(post_training={"method": "dpo", "use_ref_model": True, "precompute_ref_logps": True})


@pytest.mark.parametrize("method", ["dpo", "ipo", "kto", "orpo", "cpo", "simpo", "grpo", "rloo", "online_dpo"])
def test_disable_dropout_defaults_to_trls_and_lora_dropout_under_it_is_refused(method, tmp_path):
    """TRL's trainers switch LoRA dropout off under `disable_dropout` (their config's default:
    true for DPO, KTO, ORPO, CPO and online DPO, false for GRPO and RLOO): the same default here,
    and a `lora.lora_dropout` it would switch off is one line naming the key that allows it."""
    import warnings

    from trl import DPOConfig, GRPOConfig, KTOConfig, RLOOConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.online_dpo import OnlineDPOConfig
    from trl.experimental.orpo import ORPOConfig

    trl_cls = {"dpo": DPOConfig, "ipo": DPOConfig, "kto": KTOConfig, "orpo": ORPOConfig, "cpo": CPOConfig,
               "simpo": CPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig, "online_dpo": OnlineDPOConfig}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = trl_cls(output_dir=str(tmp_path), report_to=[], use_cpu=True).disable_dropout
    online = method in ("grpo", "rloo", "online_dpo")
    (tmp_path / "r.py").write_text("def f(completions, **kw):\n    return [0.0] * len(completions)\n")
    pt = {"method": method, **({"reward_funcs": [f"{tmp_path / 'r.py'}:f"]} if online else {})}
    assert cfg(post_training=pt).post_training.disable_dropout is want
    dropout = {"lora": {"lora_dropout": 0.1}}
    if want and method != "online_dpo":
        with pytest.raises(ConfigError, match=rf"^c\.yaml: `lora\.lora_dropout` 0\.1 would be ignored: "
                                              rf"`post_training\.disable_dropout` is true \(TRL's default for {method}\); "
                                              r"set `post_training\.disable_dropout: false` to train with LoRA dropout"):
            cfg(post_training=pt, **dropout)
    if method != "online_dpo":   # online DPO trains without dropout whatever the key says (check_online)
        got = cfg(post_training={**pt, "disable_dropout": False}, **dropout)
        assert got.lora.lora_dropout == 0.1 and got.post_training.disable_dropout is False


@pytest.mark.parametrize("pt, needle", [
    # TRL's ORPOConfig / CPOConfig / KTOConfig take one loss_type; jaxpref's losses for these
    # methods read the first one only and no loss_weights.
    ({"method": "cpo", "loss_type": ["sigmoid", "hinge"]}, "`post_training.loss_type` takes one value for cpo"),
    ({"method": "kto", "loss_type": ["kto", "apo_zero_unpaired"]}, "takes one value for kto"),
    ({"method": "orpo", "loss_weights": [2.0]}, "`post_training.loss_weights` would be ignored: orpo"),
    ({"method": "simpo", "loss_weights": [0.5]}, "`post_training.loss_weights` would be ignored: simpo"),
    # CPOTrainer smooths the sigmoid and simpo losses only; ORPO and KTO have no label smoothing.
    ({"method": "cpo", "loss_type": "hinge", "label_smoothing": 0.1},
     "`post_training.label_smoothing` would be ignored: cpo's loss_type hinge does not read it (sigmoid, simpo do)"),
    ({"method": "cpo", "loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing` would be ignored: cpo's loss_type ipo"),
    ({"method": "orpo", "label_smoothing": 0.1}, "`post_training.label_smoothing` would be ignored: orpo has none"),
    ({"method": "kto", "label_smoothing": 0.1}, "`post_training.label_smoothing` would be ignored: kto has none"),
    # simpo_gamma is the simpo loss's margin; method simpo is pure SimPO, without cpo_alpha's NLL.
    ({"method": "cpo", "loss_type": "sigmoid", "simpo_gamma": 0.7},
     "`post_training.simpo_gamma` would be ignored: cpo's loss_type sigmoid has no margin"),
    ({"method": "simpo", "cpo_alpha": 0.5}, "`post_training.cpo_alpha` would be ignored: method simpo has no NLL term"),
    ({"method": "orpo", "reference_free": True}, "`post_training.reference_free` would be ignored: orpo uses no "
                                                 "reference model"),
])
def test_keys_the_orpo_cpo_simpo_kto_losses_would_not_read_are_refused(pt, needle):
    with pytest.raises(ConfigError) as e:
        cfg(post_training=pt)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_keys_these_losses_read_stay_accepted():
    for pt in ({"method": "cpo", "loss_type": "sigmoid", "label_smoothing": 0.1},
               {"method": "cpo", "loss_type": "simpo", "simpo_gamma": 0.7, "label_smoothing": 0.1, "cpo_alpha": 0.5},
               {"method": "simpo", "simpo_gamma": 0.3, "label_smoothing": 0.1},
               {"method": "cpo", "loss_type": ["hinge"], "cpo_alpha": 0.0},
               {"method": "kto", "loss_type": "apo_zero_unpaired"},
               {"method": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "label_smoothing": 0.1}):
        assert cfg(post_training=pt).post_training.method == pt["method"]


def test_max_grad_norm_defaults_to_the_trainers_clipping_and_none_for_ppo(tmp_path):
    """transformers' Trainer (TRL's offline, GRPO and RLOO trainers) clips the gradient norm to
    TrainingArguments' max_grad_norm (1.0); TRL's PPOTrainer steps its optimizer unclipped. Left
    unset, the config does the same; set, it applies to PPO too."""
    import jax.numpy as jnp
    from transformers import TrainingArguments

    from jaxpref.training.optim import make_optimizer

    (tmp_path / "r.py").write_text("def f(completions, **kw):\n    return [0.0] * len(completions)\n")
    ppo = {"method": "ppo", "reward_funcs": [f"{tmp_path / 'r.py'}:f"]}
    assert cfg().training.max_grad_norm == TrainingArguments(output_dir=str(tmp_path)).max_grad_norm == 1.0
    assert cfg(post_training={"method": "grpo", "reward_funcs": ppo["reward_funcs"]}).training.max_grad_norm == 1.0
    assert cfg(post_training=ppo).training.max_grad_norm == 0.0
    assert cfg(post_training=ppo, training={"max_grad_norm": 0.5}).training.max_grad_norm == 0.5
    grads = {"w": jnp.full((4,), 5.0)}   # norm 10
    for tr, want in ((cfg(post_training=ppo).training, 5.0), (cfg().training, 0.5)):
        opt, _ = make_optimizer(dataclasses.replace(tr, optimizer="sgd", learning_rate=1.0,
                                                    lr_scheduler_type="constant"), 10)
        step, _ = opt.update(grads, opt.init(grads), {"w": jnp.zeros(4)})
        assert float(-step["w"][0]) == pytest.approx(want, rel=1e-6)


def test_dpo_example_lists_every_offline_key():
    """configs/dpo_example.yaml is "DPO with every option, commented" (issue 2): each key of every
    section, and each offline method's own keys, is written there, and the file loads."""
    import yaml

    from jaxpref.config import schema
    from jaxpref.config.parse import load_config
    from jaxpref.objectives.methods import METHODS

    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "dpo_example.yaml"
    data = yaml.safe_load(open(path))
    offline = {f.name for m in METHODS.values() if not m.online for f in dataclasses.fields(m.keys)}
    online = {f.name for m in METHODS.values() if m.online for f in dataclasses.fields(m.keys)} - offline
    sections = {"models": (schema.ModelEntry, data["models"][0]), "post_training": (schema.PostTrainingConfig, None)}
    missing = []
    for f in dataclasses.fields(schema.Config):
        if f.metadata.get("internal"):
            continue
        cls, written = sections.get(f.name, (None, data.get(f.name)))
        cls = cls or type(getattr(schema.Config(), f.name))
        written = data[f.name] if written is None else written
        missing += [f"{f.name}.{k.name}" for k in dataclasses.fields(cls)
                    if not k.metadata.get("internal") and k.name not in online and k.name not in written]
    assert missing == []
    load_config(path)
    assert "not available yet" not in open(path).read()   # full fine-tuning (lora.enabled: false) is there


def test_readme_config_table_names_every_key():
    """README's config reference (the `| section | keys (defaults) |` table) names each key of every
    section and of every method, so that a key added to the schema is documented where users look
    (`lora.bias` and the online methods' keys were missing)."""
    from pathlib import Path

    from jaxpref.config import schema
    from jaxpref.objectives.methods import method_keys

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = "\n".join(line for line in text.splitlines() if line.startswith("| `"))
    classes = [schema.ModelEntry, schema.DatasetConfig, schema.PostTrainingBase, schema.LoraConfig,
               schema.TrainingConfig, schema.GpuConfig, schema.DistributedConfig, schema.FinetuningConfig,
               schema.EarlyStoppingConfig, schema.LoggingConfig, *method_keys()]
    missing = sorted({f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                      if not f.metadata.get("internal") and f"`{f.name}`" not in table})
    assert missing == []
