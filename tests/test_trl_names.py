"""A TRL user's DPOConfig keys: aliases that work, or errors that name our key; "did you mean"
across sections; `--print-config` generated from the dataclasses."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from jaxpref.config import config_from_dict
from jaxpref.errors import ConfigError

BASE = {"models": [{"name": "m", "huggingface_id": "some/model"}], "dataset": {"name": "d.jsonl"}}


def cfg(**sections):
    return config_from_dict({**BASE, **sections}, "c.yaml")


def test_trl_named_config_is_accepted():
    c = cfg(training={"num_train_epochs": 3, "bf16": True, "fp16": False, "output_dir": "runs",
                      "warmup_steps": 0.1, "optim": "adamw_torch_fused", "precompute_ref_log_probs": True,
                      "gradient_checkpointing": True, "eval_strategy": "steps", "eval_steps": 5,
                      "load_best_model_at_end": True, "metric_for_best_model": "rewards/accuracies",
                      "save_steps": 10, "save_total_limit": 2, "report_to": "none", "run_name": "r",
                      "tf32": True},
            logging={"logging_steps": 5},
            post_training={"method": "dpo", "loss_type": "discopop", "discopop_tau": 0.2},
            dataset={"name": "d.jsonl", "eval_fraction": 0.2})
    tr, ft = c.training, c.finetuning
    assert (tr.num_epochs, tr.compute_dtype, tr.output_dir, tr.optimizer) == (3.0, "bfloat16", "runs", "adamw")
    assert (tr.warmup_steps, tr.logging_steps, tr.eval_strategy, tr.matmul_precision) == (0.1, 5, "steps", "tf32")
    assert c.post_training.precompute_ref_logps and ft.gradient_checkpointing and ft.load_best_model_at_end
    assert (ft.save_steps, ft.save_total_limit, c.logging.run_name, c.report_to) == (10, 2, "r", [])
    # TRL's rules: `eval_` is added to the metric; accuracies are better when greater.
    assert (c.best_metric, c.greater_is_better) == ("eval_rewards/accuracies", True)
    assert cfg(finetuning={"load_best_model_at_end": True}).greater_is_better is False  # eval_loss
    from jaxpref.training.setup import loss_spec
    assert dict(loss_spec(c).extra)["discopop_tau"] == 0.2


@pytest.mark.parametrize("training, message", [
    ({"fp16": True}, "`training.fp16`: float16 training is not supported; set `training.compute_dtype: bfloat16`"),
    ({"optim": "adamw_bnb_8bit"}, "`training.optim` `adamw_bnb_8bit` has no equivalent here; set `training.optimizer`"),
    ({"bf16": "yes"}, "`training.bf16` must be true or false"),
    ({"bf16": True, "compute_dtype": "float32"}, "`training.bf16` ('bfloat16') and `training.compute_dtype`"),
    ({"warmup_steps": 2.5}, "`training.warmup_steps` must be a whole number of steps, or below 1 a fraction"),
    ({"eval_strategy": "sometimes"}, "`training.eval_strategy` is `sometimes`, expected one of no, steps, epoch"),
    ({"metric_for_best_model": "acc"}, "`training.metric_for_best_model` `eval_acc` is never logged"),
    ({"num_train_epochs": "two"}, "`training.num_train_epochs` must be a finite number"),
])
def test_trl_names_with_bad_values_name_the_key(training, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg(training=training)


def test_warmup_steps_below_one_is_a_ratio():
    """transformers 5: warmup_steps < 1 is a fraction of the run (ceil), >= 1 a step count."""
    from jaxpref.training.optim import make_optimizer

    for warmup, expect in ((0.1, 3), (4, 4), (0, 0)):
        _, schedule = make_optimizer(cfg(training={"warmup_steps": warmup, "learning_rate": 1.0}).training, 25)
        lrs = [float(schedule(i)) for i in range(8)]
        peak = next(i for i, v in enumerate(lrs) if v >= 1.0 - 1e-6) if expect else 0
        assert peak == expect, (warmup, lrs)


@pytest.mark.parametrize("sections, suggestion", [
    ({"training": {"beta": 0.2}}, "`post_training.beta`"),
    ({"dataset": {"name": "d.jsonl", "max_length": 64}}, "`training.max_length`"),
    ({"training": {"loss_typ": "sigmoid"}}, "`post_training.loss_type`"),
    ({"logging": {"save_steps": 5}}, "`finetuning.save_steps`"),
    ({"post_training": {"num_train_epochs": 1}}, "`training.num_epochs`"),
    ({"training": {"learning_rat": 1e-5}}, "`learning_rate`"),
    ({"beta": 0.1}, "`post_training.beta`"),   # a flat, TRL-style key at the top level
])
def test_did_you_mean_looks_across_sections(sections, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}"):
        cfg(**sections)


def _every_key(c) -> list[str]:
    out = []
    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        if f.metadata.get("internal"):
            continue
        items = v if isinstance(v, list) else [v]
        for item in items:
            if dataclasses.is_dataclass(item):
                out += [x.name for x in dataclasses.fields(item) if not x.metadata.get("internal")]
    return out


def test_every_key_has_help_and_print_config_loads_back(tmp_path, capsys):
    from jaxpref import train
    from jaxpref.config import load_config
    from jaxpref.config.describe import field_help
    from jaxpref.config.schema import EarlyStoppingConfig

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "training": {"num_train_epochs": 2, "bf16": True},
                                    "finetuning": {"early_stopping": {"metric": "eval_loss"}},
                                    "gpu": {"mesh": {"data": 1}}}))
    c = load_config(path)
    for section in [*c.models, c.dataset, c.post_training, c.lora, c.training, c.gpu, c.finetuning, c.logging,
                    EarlyStoppingConfig()]:
        helps = field_help(type(section))
        missing = [f.name for f in dataclasses.fields(section)
                   if not f.metadata.get("internal") and not helps.get(f.name)]
        assert not missing, (type(section).__name__, missing)   # a key without its one line of help
    assert train.main(["--print-config", str(path)]) == 0
    out = capsys.readouterr().out
    for key in _every_key(c):
        assert any(line.strip().startswith(f"{key}:") and "# " in line and "Default: " in line
                   for line in out.splitlines()), key
    assert "  compute_dtype: \"bfloat16\"" in out and "Default: \"float32\"" in out
    assert not [line for line in out.splitlines() if line.count("Default:") > 1]   # one default per key
    from jaxpref.objectives.methods import METHODS
    method_help = next(line for line in out.splitlines() if line.strip().startswith("method:"))
    assert all(f" {m}" in method_help for m in METHODS), method_help   # every method is named
    back = config_from_dict(yaml.safe_load(out), "printed")
    back.source = c.source
    assert back == c   # the printout is the resolved config itself


def test_truncation_mode_help_says_what_it_truncates():
    """`training.truncation_mode` cuts prompt + completion to `max_length` (TRL's DPOConfig: "when the
    sequence exceeds max_length"); a long prompt alone is `max_prompt_length`'s, which keeps its end.
    --print-config's help said "which end of a long prompt is kept"."""
    from jaxpref.config.describe import field_help
    from jaxpref.config.schema import TrainingConfig
    from jaxpref.data.lengths import truncate

    text = field_help(TrainingConfig)["truncation_mode"]
    assert "max_length" in text and "prompt" not in text, text
    # What it describes: keep_start keeps the sequence's start (the completion's end goes), keep_end its end.
    assert truncate([1, 2, 3], [4, 5, 6], 4, "keep_start") == ([1, 2, 3, 4], 3)
    assert truncate([1, 2, 3], [4, 5, 6], 4, "keep_end") == ([3, 4, 5, 6], 1)


def test_print_config_and_run_config_load_back_from_another_folder(tmp_path, capsys):
    """A reward function's `file.py:function` is relative to the config's folder: --print-config
    (and the run folder's config.yaml) printed it as written, so the printout saved anywhere else
    did not load back ("file rewards/r.py not found")."""
    from jaxpref import train
    from jaxpref.config import dump_config, load_config

    src = tmp_path / "project"
    (src / "rewards").mkdir(parents=True)
    (src / "rewards" / "r.py").write_text("def correct(completions, **kw):\n    return [1.0 for _ in completions]\n")
    path = src / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "post_training": {"method": "grpo",
                                                              "reward_funcs": ["rewards/r.py:correct", "math:sqrt"]}}))
    c = load_config(path)
    assert train.main(["--print-config", str(path)]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "printed.yaml").write_text(capsys.readouterr().out)
    dump_config(c, elsewhere / "config.yaml")
    for name in ("printed.yaml", "config.yaml"):
        back = load_config(elsewhere / name)
        assert back.post_training.reward_funcs == [f"{src / 'rewards' / 'r.py'}:correct", "math:sqrt"], name
    assert c.post_training.reward_funcs == ["rewards/r.py:correct", "math:sqrt"]   # the live config as written
