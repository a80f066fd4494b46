"""Logged rows over several steps and micro-batches equal TRL's, as its trainers average them:
each metric over the micro-batches of the logging window (`logits/*` per micro-batch token mean,
KTO's chosen / rejected metrics over the micro-batches that hold such completions, left out of a
row whose window holds none), the loss over the window's steps, `grad_norm` and `learning_rate`
the logging step's own. Sequential batches on both sides; tiny Llama, random LoRA."""
from __future__ import annotations

import json

import pytest

from conftest import PAIRS
from test_trl_trainers import KEYS, base_model, fresh_peft, ours, setup, trl_common  # noqa: F401

ROW_KEYS = KEYS + ("grad_norm", "learning_rate", "logits/chosen", "logits/rejected", "num_tokens", "entropy")


def trl_rows(trainer_cls, args, rows, tok, model, **kw) -> dict:
    from datasets import Dataset

    tr = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, **kw)
    tr.train()
    return {h["step"]: h for h in tr.state.log_history if "loss" in h}


def our_rows(out) -> dict:
    return {r["step"]: r for r in map(json.loads, (out / "tiny" / "metrics.jsonl").read_text().splitlines())}


def assert_rows(mine: dict, theirs: dict, keys) -> None:
    assert set(theirs) <= set(mine)
    for step, t in theirs.items():
        m = mine[step]
        assert {k for k in keys if k in t} == {k for k in keys if k in m}, (step, sorted(t), sorted(m))
        for k in keys:
            if k in t:
                assert m[k] == pytest.approx(t[k], rel=1e-4, abs=5e-6), (step, k, m[k], t[k])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dpo_rows_average_the_window_and_micro_batches_as_trl(setup, tiny_llama):
    from trl import DPOConfig, DPOTrainer

    tmp, tok, adapter, pairs, _ = setup
    training = {"max_steps": 2, "logging_steps": 2, "gradient_accumulation_steps": 2,
                "train_sampling_strategy": "sequential"}
    args = {**trl_common(tmp), "per_device_train_batch_size": 1, **training}
    theirs = trl_rows(DPOTrainer, DPOConfig(**args), pairs, tok, fresh_peft(tiny_llama, adapter),
                      ref_model=base_model(tiny_llama))
    ours(tmp, tiny_llama, tmp / "pairs.jsonl", adapter, "dpo", batch=1, tag="_window", training=training,
         use_ref_model=True)
    mine = our_rows(tmp / "out_dpo_window")
    assert sorted(mine) == [1, 2] and list(theirs) == [2]
    assert abs(theirs[2]["logits/chosen"]) > 0
    assert_rows(mine, theirs, ROW_KEYS + ("mean_token_accuracy",))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kto_rows_leave_out_what_a_window_lacks_as_trl(setup, tiny_llama):
    """KTO, 2 completions per step (desirable: both, one, both, none): a metric that no
    micro-batch of the window has is left out of the row (the margin needs both kinds in one
    micro-batch; step 1's own row has no undesirable completion), the others are averaged over the
    micro-batches that have them."""
    from trl import KTOConfig, KTOTrainer

    tmp, tok, adapter, _, _ = setup
    labels = [True, True, False, True, True, True, False, False]
    rows = [{"prompt": p, "completion": " " + (c if ok else r), "label": ok}
            for (p, c, r), ok in zip(PAIRS, labels)]
    path = tmp / "kto_window.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    training = {"max_steps": 4, "logging_steps": 2}
    args = {**trl_common(tmp), "per_device_train_batch_size": 2, **training}
    theirs = trl_rows(KTOTrainer, KTOConfig(**args), rows, tok, fresh_peft(tiny_llama, adapter),
                      ref_model=base_model(tiny_llama))
    ours(tmp, tiny_llama, path, adapter, "kto", batch=2, tag="_window", training=training, use_ref_model=True)
    mine = our_rows(tmp / "out_kto_window")
    assert "rewards/rejected" not in mine[1] and "rewards/margins" not in mine[1]
    assert "rewards/margins" not in theirs[4] and "rewards/chosen" in theirs[4]   # steps 3-4: no pair of both
    assert_rows(mine, theirs, ROW_KEYS + ("kl",))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("eval_batch", [2, 3])
def test_eval_rows_and_summary_carry_trl_keys(request, tiny_llama, eval_batch):
    """An evaluation's metrics.jsonl row has the keys of DPOTrainer's eval row in its log_history
    (`epoch`, `eval_runtime`, `eval_samples_per_second`, `eval_steps_per_second`, `eval_num_tokens`:
    the train tokens seen so far) and its numbers; in order on both sides, evaluated every step.
    4 eval pairs in batches of 3: TRL evaluates a last batch of 1, each metric the mean of the two
    batches' means, eval_loss the mean over the 4 rows (jaxpref evaluated the first 3 pairs only).
    summary.json has the numbers of TRL's final row (`train_loss`: the mean step loss, `train_runtime`,
    `train_samples_per_second`, `train_steps_per_second`)."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    from conftest import write_config
    from jaxpref import train

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    tmp, tok, adapter, pairs, _ = request.getfixturevalue("setup")
    args = DPOConfig(**{**trl_common(tmp), "per_device_train_batch_size": 2, "max_steps": 2,
                        "per_device_eval_batch_size": eval_batch, "eval_strategy": "steps", "eval_steps": 1})
    tr = InOrder(model=fresh_peft(tiny_llama, adapter), args=args, train_dataset=Dataset.from_list(pairs),
                 eval_dataset=Dataset.from_list(pairs), processing_class=tok, ref_model=base_model(tiny_llama))
    tr.train()
    theirs = {h["step"]: h for h in tr.state.log_history if "eval_loss" in h}
    data = tmp / "pairs.jsonl"
    cfg = write_config(tmp / "eval_keys.yaml", tiny_llama, data,
                       dataset={"name": str(data), "data_files": {"train": str(data), "test": str(data)},
                                "eval_split": "test"},
                       post_training={"method": "dpo", "beta": 0.1, "use_ref_model": True},
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                             "init_from": str(adapter)},
                       training={"max_steps": 2, "per_device_train_batch_size": 2,
                                 "per_device_eval_batch_size": eval_batch, "learning_rate": 1e-3, "max_length": 64,
                                 "logging_steps": 1, "eval_steps": 1, "train_sampling_strategy": "sequential"})
    out = tmp / f"out_eval_keys{eval_batch}"
    assert train.main(["--config", str(cfg), "--output-dir", str(out)]) == 0
    rows = [json.loads(l) for l in (out / "tiny" / "metrics.jsonl").read_text().splitlines()]
    mine = {r["step"]: r for r in rows if "eval_loss" in r}
    assert sorted(mine) == sorted(theirs) == [1, 2]
    for step, t in theirs.items():
        m = mine[step]
        assert set(m) == set(t), (sorted(set(t) - set(m)), sorted(set(m) - set(t)))
        for k in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_num_tokens", "epoch"):
            assert m[k] == pytest.approx(t[k], rel=1e-4, abs=5e-6), (step, k, m[k], t[k])
        assert m["eval_runtime"] > 0
        assert m["eval_samples_per_second"] == pytest.approx(len(pairs) / m["eval_runtime"], rel=0.02)
        batches = -(-len(pairs) // eval_batch)
        assert m["eval_steps_per_second"] == pytest.approx(batches / m["eval_runtime"], rel=0.02)
    final = next(h for h in tr.state.log_history if "train_runtime" in h)
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    assert summary["train_loss"] == pytest.approx(final["train_loss"], rel=1e-5)
    assert summary["train_runtime"] > 0
    assert summary["train_samples_per_second"] == pytest.approx(4 / summary["train_runtime"], rel=0.02)
    assert summary["train_steps_per_second"] == pytest.approx(2 / summary["train_runtime"], rel=0.02)


def _kto_rows(labels, offset=0):
    return [{"prompt": p, "completion": " " + (c if ok else r), "label": ok}
            for (p, c, r), ok in zip((PAIRS * 2)[offset:], labels)]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kto_kl_completions_rotate_in_groups_of_the_train_batch_as_trl(request, tiny_llama):
    """TRL rotates the completions for the KL rows over groups of per_device_train_batch_size
    consecutive examples of a split before batching (the last group shorter), the eval split's
    too. `kl_sources` over the data order names the same completion for every example as TRL's
    prepared eval dataset (7 examples, groups of 3: 3, 3, 1)."""
    import numpy as np
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from jaxpref.data.unpaired import kl_sources

    tmp, tok, adapter, _, _ = request.getfixturevalue("setup")
    rows = _kto_rows([True, False, True, True, False, True, False])
    args = KTOConfig(**{**trl_common(tmp), "per_device_train_batch_size": 3})
    tr = KTOTrainer(model=fresh_peft(tiny_llama, adapter), ref_model=base_model(tiny_llama), args=args,
                    train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows), processing_class=tok)
    comps = [tuple(c) for c in tr.eval_dataset["completion_ids"]]
    assert len(set(comps)) == len(rows)
    theirs = [comps.index(tuple(c)) for c in tr.eval_dataset["KL_completion_ids"]]
    assert theirs == [2, 0, 1, 5, 3, 4, 6]
    n = len(rows)
    assert kl_sources(np.arange(n), n, 3) == theirs
    # An eval batch of 2 takes its rows' sources from the groups of 3, not from the batch.
    assert [s for b in (np.arange(0, 2), np.arange(2, 4), np.arange(4, 6)) for s in kl_sources(b, n, 3)] == theirs[:6]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kto_eval_with_another_batch_size_equals_trl(request, tiny_llama):
    """KTO evaluated in batches of 2 after training in micro-batches of 4 (x2 accumulation): the eval
    KL rows pair completions within groups of 4 as TRL's (jaxpref paired within the eval batch:
    eval_kl 0.0617 against TRL's 0.0485 at step 2). 7 eval rows: TRL's last eval batch holds 1 (jaxpref
    left it out). Every train and eval row of two steps equals TRL's."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from conftest import write_config
    from jaxpref import train

    tmp, tok, adapter, _, _ = request.getfixturevalue("setup")
    rows = _kto_rows([True, True, False, True, True, True, False, True])
    ev = _kto_rows([True, False, True, True, False, False, True], offset=8)   # a last eval batch of 1
    paths = {}
    for name, rs in (("train", rows), ("test", ev)):
        paths[name] = tmp / f"kto_eval_{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rs))
    training = {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                "per_device_eval_batch_size": 2, "eval_steps": 1, "logging_steps": 1, "learning_rate": 1e-3,
                "max_length": 64}
    args = KTOConfig(**{**trl_common(tmp), **training, "eval_strategy": "steps"})
    tr = KTOTrainer(model=fresh_peft(tiny_llama, adapter), ref_model=base_model(tiny_llama), args=args,
                    train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(ev), processing_class=tok)
    tr.train()
    cfg = write_config(tmp / "kto_eval.yaml", tiny_llama, paths["train"],
                       dataset={"name": str(paths["train"]), "eval_split": "test",
                                "data_files": {k: str(v) for k, v in paths.items()}},
                       post_training={"method": "kto", "beta": 0.1, "use_ref_model": True},
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_from": str(adapter)},
                       training=training)
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp / "out_kto_eval")]) == 0
    logged = [json.loads(l) for l in (tmp / "out_kto_eval" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    theirs = {h["step"]: h for h in tr.state.log_history if "loss" in h}
    assert_rows({r["step"]: r for r in logged if "loss" in r}, theirs, ROW_KEYS + ("kl",))
    t_eval = {h["step"]: h for h in tr.state.log_history if "eval_loss" in h}
    m_eval = {r["step"]: r for r in logged if "eval_loss" in r}
    assert sorted(t_eval) == sorted(m_eval) == [1, 2]
    assert t_eval[1]["eval_kl"] > 0.01   # not clamped at 0: the pairing shows
    keys = [f"eval_{k}" for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                  "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy")]
    for step, t in t_eval.items():
        assert {k for k in t if k.startswith("eval_") and "runtime" not in k and "per_second" not in k} == \
            {k for k in m_eval[step] if k.startswith("eval_") and "runtime" not in k and "per_second" not in k}
        for k in keys:
            assert m_eval[step][k] == pytest.approx(t[k], rel=1e-5, abs=2e-6), (step, k, m_eval[step][k], t[k])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_epoch_is_logged_unrounded_as_trl(request, tiny_llama):
    """Three steps an epoch: the train and eval rows' `epoch` is TRL's 1/3, 2/3 exactly (the Trainer
    logs state.epoch as it is; jaxpref rounded it to 4 places: 0.3333); the other numbers too."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from conftest import write_config
    from jaxpref import train

    tmp, tok, adapter, _, _ = request.getfixturevalue("setup")
    pairs = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS[:6]]
    path = tmp / "six.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    training = {"max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "eval_steps": 1,
                "logging_steps": 1, "learning_rate": 1e-3, "max_length": 64, "train_sampling_strategy": "sequential"}
    args = DPOConfig(**{**trl_common(tmp), **training, "eval_strategy": "steps"})
    tr = DPOTrainer(model=fresh_peft(tiny_llama, adapter), ref_model=base_model(tiny_llama), args=args,
                    train_dataset=Dataset.from_list(pairs), eval_dataset=Dataset.from_list(pairs[:2]),
                    processing_class=tok)
    tr.train()
    cfg = write_config(tmp / "six.yaml", tiny_llama, path, dataset={"name": str(path), "eval_split": "test",
                                                                     "data_files": {"train": str(path), "test": str(path)}},
                       post_training={"method": "dpo", "beta": 0.1, "use_ref_model": True},
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_from": str(adapter)},
                       training=training)
    # The eval split: the first two pairs, as TRL's (max_samples would cut the train split too).
    (tmp / "six_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[:2]))
    cfg.write_text(cfg.read_text().replace(f"test: {path}", f"test: {tmp / 'six_eval.jsonl'}"))
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp / "out_six")]) == 0
    logged = [json.loads(l) for l in (tmp / "out_six" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    for kind in ("loss", "eval_loss"):
        theirs = [h for h in tr.state.log_history if kind in h]
        mine = [r for r in logged if kind in r]
        assert [h["epoch"] for h in theirs] == [r["epoch"] for r in mine] == [1 / 3, 2 / 3], kind
        for t, m in zip(theirs, mine):
            for k in set(t) & set(m):
                if "runtime" not in k and "per_second" not in k:
                    assert m[k] == pytest.approx(t[k], rel=1e-5, abs=2e-6), (kind, k, m[k], t[k])


def test_kto_batch_of_one_is_refused_for_the_kl_estimate_only():
    """TRL's KTOTrainer refuses per_device_train_batch_size 1 where it estimates the KL (loss_type
    kto) and takes it for apo_zero_unpaired, which has no KL term; jaxpref refused both."""
    from jaxpref.config import config_from_dict
    from jaxpref.errors import ConfigError

    base = {"models": [{"name": "m", "huggingface_id": "some/model"}], "dataset": {"name": "d.jsonl"},
            "training": {"per_device_train_batch_size": 1}}
    c = config_from_dict({**base, "post_training": {"method": "kto", "loss_type": "apo_zero_unpaired"}}, "c.yaml")
    assert c.training.per_device_train_batch_size == 1
    for pt in ({"method": "kto"}, {"method": "kto", "loss_type": "kto"}):
        with pytest.raises(ConfigError, match="KTO needs `training.per_device_train_batch_size` >= 2"):
            config_from_dict({**base, "post_training": pt}, "c.yaml")


def test_kto_random_sampling_is_refused_for_the_kl_estimate_only():
    """TRL's KTOTrainer refuses `train_sampling_strategy: random` where it estimates the KL (its KL
    completions are its neighbours' in a fixed order) and takes it for apo_zero_unpaired; jaxpref
    trained loss_type kto shuffled, pairing KL rows within the shuffled micro-batch."""
    from jaxpref.config import config_from_dict
    from jaxpref.errors import ConfigError

    base = {"models": [{"name": "m", "huggingface_id": "some/model"}], "dataset": {"name": "d.jsonl"},
            "training": {"train_sampling_strategy": "random"}}
    c = config_from_dict({**base, "post_training": {"method": "kto", "loss_type": "apo_zero_unpaired"}}, "c.yaml")
    assert c.training.train_sampling_strategy == "random"
    for pt in ({"method": "kto"}, {"method": "kto", "loss_type": "kto"}):
        with pytest.raises(ConfigError, match="`training.train_sampling_strategy` must be sequential"):
            config_from_dict({**base, "post_training": pt}, "c.yaml")
    assert config_from_dict({**base, "post_training": {"method": "dpo"}}, "c.yaml").training.train_sampling_strategy == "random"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kto_apo_zero_unpaired_in_batches_of_one_equals_trl(request, tiny_llama):
    """apo_zero_unpaired, one completion per micro-batch x 2 accumulated, 3 steps logged every step:
    TRL's rows (`kl` 0, the chosen / rejected metrics of the micro-batches that have them)."""
    from trl import KTOConfig, KTOTrainer

    tmp, tok, adapter, _, _ = request.getfixturevalue("setup")
    rows = _kto_rows([True, False, True, True, False, True])
    path = tmp / "kto_apo1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    training = {"max_steps": 3, "gradient_accumulation_steps": 2}
    args = {**trl_common(tmp), "per_device_train_batch_size": 1, "loss_type": "apo_zero_unpaired", **training}
    theirs = trl_rows(KTOTrainer, KTOConfig(**args), rows, tok, fresh_peft(tiny_llama, adapter),
                      ref_model=base_model(tiny_llama))
    ours(tmp, tiny_llama, path, adapter, "kto", batch=1, tag="_apo1", training=training, use_ref_model=True,
         loss_type="apo_zero_unpaired")
    mine = our_rows(tmp / "out_kto_apo1")
    assert sorted(theirs) == [1, 2, 3] and theirs[2]["kl"] == 0.0
    assert_rows(mine, theirs, ROW_KEYS + ("kl", "epoch"))
