"""Less common offline options over a train split that does not divide into whole optimizer steps:
each epoch ends with a last, shorter step (tests/test_trl_partial_step.py has the plain cases).
Each case runs jaxpref and TRL 1.16 (DPOTrainer, KTOTrainer, ORPOTrainer, CPOTrainer) on a tiny
random model, the same rows in order on both sides: the same steps, every logged train (and eval)
row's names and numbers equal TRL's (rel 1e-5), and summary.json's train_loss and counts those of
TRL's final row."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from conftest import PAIRS, save_tiny_llama, write_config
from jaxpref import train
from test_trl_trainers import _tiny_mixtral, base_model, fresh_peft, setup, trl_common  # noqa: F401

OWN = {"compilations", "tokens_per_second"}   # jaxpref's own keys, documented in the README
TIMING = ("runtime", "per_second")
# ORPO's and CPO's `logits/*` average every position of TRL's padded batch (tests/test_trl_orpo_cpo.py)
NOT_COMPARED = {"orpo": {"logits/chosen", "logits/rejected"}, "cpo": {"logits/chosen", "logits/rejected"}}
EXTRA = {"orpo": {"num_tokens"}, "cpo": {"num_tokens"}}   # jaxpref logs train tokens for every method
PLAIN = {"pair_layout": "concatenated", "padding_free": False}
TRL_NAMES = {"num_epochs": "num_train_epochs"}
TRAINER = {"dpo": "dpo", "ipo": "dpo", "kto": "kto", "orpo": "orpo", "cpo": "cpo", "simpo": "cpo"}


def pairs(n: int) -> list[dict]:
    return [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in (PAIRS * 3)[:n]]


def unpaired(labels: list[bool]) -> list[dict]:
    return [{"prompt": p, "completion": " " + (c if ok else r), "label": ok} for (p, c, r), ok in zip(PAIRS * 3, labels)]


@dataclass
class Case:
    method: str
    rows: list
    training: dict                 # both sides (jaxpref's names; num_epochs is TRL's num_train_epochs)
    steps: list                    # the steps TRL logs
    pt: dict = field(default_factory=dict)        # jaxpref's post_training
    trl: dict = field(default_factory=dict)       # TRL's config keys
    ours: dict = field(default_factory=dict)      # jaxpref-only training keys
    eval_rows: list | None = None
    reference: str | None = "base"                # base | other | None (no reference model)
    full: bool = False                            # full fine-tuning (no LoRA)
    model: str = "llama"                          # llama | mixtral


def _trl(case: Case, tmp, tok, model_dir, adapter, other):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    trainer = TRAINER[case.method]
    if trainer == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    elif trainer == "kto":
        from trl import KTOConfig as Config, KTOTrainer as Trainer
    elif trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    args = Config(**{**trl_common(tmp), "max_steps": -1, "num_train_epochs": 1, "train_sampling_strategy": "sequential",
                     **{TRL_NAMES.get(k, k): v for k, v in case.training.items()}, **case.trl})
    kw = {}
    if trainer in ("dpo", "kto"):
        kw["ref_model"] = {"base": lambda: base_model(model_dir), "other": lambda: AutoModelForCausalLM.from_pretrained(other),
                           None: lambda: None}[case.reference]()
    if case.eval_rows:
        kw["eval_dataset"] = Dataset.from_list(case.eval_rows)
    policy = base_model(model_dir) if case.full else fresh_peft(model_dir, adapter)
    tr = Trainer(model=policy, args=args, train_dataset=Dataset.from_list(case.rows), processing_class=tok, **kw)
    tr.train()
    return tr.state.log_history


def _ours(case: Case, name: str, tmp, model_dir, adapter, other):
    folder = tmp / f"partial_options_{name}"
    folder.mkdir()
    files = {"train": folder / "train.jsonl"}
    if case.eval_rows:
        files["test"] = folder / "test.jsonl"
    for split, path in files.items():
        rs = case.rows if split == "train" else case.eval_rows
        path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    model = {"name": "tiny", "huggingface_id": str(model_dir)}
    if case.reference == "other":
        model["ref_model_id"] = str(other)
    dataset = {"name": str(files["train"])}
    if case.eval_rows:
        dataset = {"name": str(files["train"]), "eval_split": "test", "data_files": {k: str(v) for k, v in files.items()}}
    pt = {"method": case.method, "beta": 0.1, **case.pt}
    if TRAINER[case.method] in ("dpo", "kto"):
        pt["use_ref_model"] = case.reference is not None
    cfg = write_config(folder / "c.yaml", model_dir, files["train"], models=[model], dataset=dataset,
                       post_training=pt,
                       lora={"enabled": False} if case.full else
                       {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_from": str(adapter)},
                       training={"max_steps": -1, "learning_rate": 1e-3, "max_length": 64, "logging_steps": 1,
                                 "train_sampling_strategy": "sequential", **case.training, **case.ours})
    out = folder / "out"
    assert train.main(["--config", str(cfg), "--output-dir", str(out)]) == 0
    logged = [json.loads(line) for line in (out / "tiny" / "metrics.jsonl").read_text().splitlines()]
    return logged, json.loads((out / "tiny" / "summary.json").read_text()), out


def run_case(request, name: str, case: Case) -> int:
    tmp, tok, adapter, _, _ = request.getfixturevalue("setup")
    tiny_llama = request.getfixturevalue("tiny_llama")
    model_dir, other = tiny_llama, tmp / "other_llama"
    if case.model == "mixtral":
        from transformers import AutoTokenizer, MixtralForCausalLM
        import torch

        from conftest import save_moved_adapter
        model_dir = tmp / "tiny_mixtral"
        if not (model_dir / "config.json").exists():
            _tiny_mixtral(model_dir, 0.1)
            save_moved_adapter(MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               tmp / "mixtral_adapter")
        adapter, tok = tmp / "mixtral_adapter", AutoTokenizer.from_pretrained(model_dir)
    if case.reference == "other" and not (other / "config.json").exists():
        save_tiny_llama(other, seed=1)
    history = _trl(case, tmp, tok, model_dir, adapter, other)
    logged, summary, _ = _ours(case, name, tmp, model_dir, adapter, other)
    trainer = TRAINER[case.method]
    skip = NOT_COMPARED.get(trainer, set())
    compared = 0
    for kind in ("loss", "eval_loss"):
        theirs = {h["step"]: h for h in history if kind in h}
        mine = {r["step"]: r for r in logged if kind in r}
        if kind == "loss":
            assert sorted(theirs) == case.steps, sorted(theirs)
            if case.training.get("logging_steps", 1) > 1:   # jaxpref logs step 1 too (TRL's logging_first_step)
                theirs_steps = [1, *sorted(theirs)]
        assert sorted(mine) == (theirs_steps if kind == "loss" and case.training.get("logging_steps", 1) > 1
                                else sorted(theirs)), (kind, sorted(mine), sorted(theirs))
        bad = []
        for step, t in theirs.items():
            m = mine[step]
            assert set(t) - skip == set(m) - OWN - EXTRA.get(trainer, set()) - skip, \
                (kind, step, sorted(set(t) ^ (set(m) - OWN)))
            for k, v in t.items():
                if k not in skip and not any(w in k for w in TIMING):
                    if m[k] != pytest.approx(v, rel=1e-5, abs=1e-6):
                        bad.append((kind, step, k, m[k], v))
                    compared += 1
        worst = {}
        for step, t in theirs.items():
            for k, v in t.items():
                if k not in skip and not any(w in k for w in TIMING) and isinstance(v, float):
                    worst[k] = max(worst.get(k, 0.0), abs(mine[step][k] - v) / max(abs(v), 1e-12))
        print(name, kind, "worst rel:", {k: f"{v:.1e}" for k, v in worst.items()})
        assert not bad, "\n".join(map(str, bad))
    final = next(h for h in history if "train_loss" in h)
    assert summary["steps"] == case.steps[-1]
    assert summary["train_loss"] == pytest.approx(final["train_loss"], rel=1e-5)
    for key in ("train_samples_per_second", "train_steps_per_second"):
        assert summary[key] * summary["train_runtime"] == pytest.approx(final[key] * final["train_runtime"], rel=0.01), key
    print(f"{name}: {len(case.steps)} steps, {compared} numbers equal TRL's")
    return compared


# Most cases: 5 pairs in micro-batches of 2, steps of 2, 2, 1 pairs (the last micro-batch of one pair:
# aot sorts within one). Each passing case also stands for the options it combines; found and checked
# equal besides (dropped for time): ipo, simpo, cpo sigmoid, use_weighting alone, packed_shared_prompt,
# DPO with a step of a whole and a shorter micro-batch.
CASES = {
    "aot": Case("dpo", pairs(5), {"per_device_train_batch_size": 2}, [1, 2, 3],
                pt={"loss_type": "aot"}, trl={"loss_type": ["aot"]}, ours=PLAIN),
    "list-aot_unpaired-robust-ipo-label_smoothing": Case(
        "dpo", pairs(5), {"per_device_train_batch_size": 2}, [1, 2, 3],
        pt={"loss_type": ["aot_unpaired", "robust", "ipo"], "loss_weights": [0.5, 1.0, 0.3], "label_smoothing": 0.2},
        trl={"loss_type": ["aot_unpaired", "robust", "ipo"], "loss_weights": [0.5, 1.0, 0.3], "label_smoothing": 0.2},
        ours=PLAIN),
    # sigmoid + sft (rpo_alpha), LD-DPO; 9 pairs as 2 x 2: steps of 2, 2, 1 micro-batches. (TRL 1.16
    # cannot run use_weighting with an sft term: an in-place product on an expanded tensor.)
    "rpo_alpha-ld_alpha-accumulation": Case(
        "dpo", pairs(9), {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}, [1, 2, 3],
        pt={"rpo_alpha": 0.7, "ld_alpha": 0.4},
        trl={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7], "ld_alpha": 0.4}),
    # a separate reference model, WPO weights, packed rows (jaxpref's layout)
    "ref_model_id-use_weighting-packed": Case("dpo", pairs(5), {"per_device_train_batch_size": 2}, [1, 2, 3],
                                              pt={"use_weighting": True}, trl={"use_weighting": True},
                                              reference="other", ours={"pair_layout": "packed"}),
    "cpo-simpo": Case("cpo", pairs(5), {"per_device_train_batch_size": 2}, [1, 2, 3],
                      pt={"loss_type": "simpo", "simpo_gamma": 0.7}, trl={"loss_type": "simpo", "simpo_gamma": 0.7}),
    # 7 completions in micro-batches of 3: the last of ONE row
    "kto-apo_zero_unpaired-one_row": Case("kto", unpaired([True, False, True, False, True, True, False]),
                                          {"per_device_train_batch_size": 3}, [1, 2, 3],
                                          pt={"loss_type": "apo_zero_unpaired"}, trl={"loss_type": "apo_zero_unpaired"}),
    # 8 completions in micro-batches of 3: the last holds only undesirable ones
    "kto-weights-one_kind": Case("kto", unpaired([True, False, True, True, False, True, False, False]),
                                 {"per_device_train_batch_size": 3}, [1, 2, 3],
                                 pt={"loss_type": "kto", "desirable_weight": 1.5, "undesirable_weight": 0.5},
                                 trl={"loss_type": "kto", "desirable_weight": 1.5, "undesirable_weight": 0.5}),
    # 7 completions in micro-batches of 2, two at a time: the second step holds one of 2 and one of 1
    "kto-accumulation-short_micro_batch": Case("kto", unpaired([True, False, True, True, False, True, False]),
                                               {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
                                               [1, 2], pt={"loss_type": "kto"}, trl={"loss_type": "kto"}),
    "full-weight_decay": Case("dpo", pairs(5), {"per_device_train_batch_size": 2, "weight_decay": 0.1,
                                                "learning_rate": 1e-4}, [1, 2, 3], full=True),
    # Mixtral's router loss; its policy predicts a chosen token by step 3 (mean_token_accuracy 1/3)
    "mixtral": Case("dpo", pairs(5), {"per_device_train_batch_size": 2}, [1, 2, 3], model="mixtral", ours=PLAIN),
    # 10 pairs in micro-batches of 4, two epochs (steps 3 and 6 shorter), logged every 2 steps (step 3
    # inside a window), evaluated after each epoch (eval batches of 3 and 1)
    "eval_epoch-logging_steps_2": Case("dpo", pairs(10), {"per_device_train_batch_size": 4, "num_epochs": 2,
                                                          "logging_steps": 2, "eval_strategy": "epoch",
                                                          "per_device_eval_batch_size": 3},
                                       [2, 4, 6], eval_rows=pairs(14)[10:]),
    # 9 pairs as 5 micro-batches of 2, 3 at a time: steps of 3 and 2 micro-batches
    "accumulation_3": Case("dpo", pairs(9), {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3,
                                             "lr_scheduler_type": "cosine", "warmup_steps": 1}, [1, 2]),
    # 3 steps an epoch: 7 steps (the short step ends epochs 1 and 2), and 1.5 epochs (5 steps)
    "max_steps-7": Case("dpo", pairs(5), {"per_device_train_batch_size": 2, "max_steps": 7}, list(range(1, 8))),
    "num_epochs-1.5": Case("dpo", pairs(5), {"per_device_train_batch_size": 2, "num_epochs": 1.5}, list(range(1, 6))),
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", list(CASES))
def test_an_option_over_a_last_shorter_step_equals_trl(request, name):
    run_case(request, name, CASES[name])
