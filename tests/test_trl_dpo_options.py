"""DPO's less common options over whole runs: four steps (two micro-batches of one pair where
asked), evaluated every second step, every train and eval row's numbers and names equal
DPOTrainer's (TRL 1.16) on the tiny Llama with a random LoRA, sequential order on both sides.
jaxpref's `rpo_alpha` is TRL's `loss_type: [sigmoid, sft]` with the weight on sft; a separate
reference (`models[].ref_model_id`) is another random Llama; `precompute_ref_logps` runs full
fine-tuning (with `lora.init_from`, which it refuses)."""
from __future__ import annotations

import json

import pytest

from conftest import PAIRS, save_tiny_llama, write_config
from jaxpref import train
from test_trl_trainers import base_model, fresh_peft, setup, trl_common  # noqa: F401

OWN = {"compilations", "tokens_per_second"}   # jaxpref's own, documented in the README
TIMING = ("runtime", "per_second")
CASES = {   # name: (post_training, training, DPOConfig keys, reference: None / base / other, full fine-tuning)
    "ref_model_id-js": ({"f_divergence_type": "js_divergence"}, {}, {"f_divergence_type": "js_divergence"},
                        "other", False),
    "precompute-ref_model_id-full": ({"precompute_ref_logps": True}, {"learning_rate": 1e-4},
                                     {"precompute_ref_log_probs": True, "learning_rate": 1e-4}, "other", True),
    "alpha_divergence-wpo": ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3,
                              "use_weighting": True}, {},
                             {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3,
                              "use_weighting": True}, "base", False),
    "ld_alpha-rpo_alpha": ({"ld_alpha": 0.4, "rpo_alpha": 0.7}, {},
                           {"ld_alpha": 0.4, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}, "base", False),
    "discopop_tau": ({"loss_type": "discopop", "discopop_tau": 0.2}, {},
                     {"loss_type": ["discopop"], "discopop_tau": 0.2}, "base", False),
    "robust-list-label_smoothing": ({"loss_type": ["robust", "bco_pair", "sft"], "loss_weights": [0.8, 0.3, 0.5],
                                     "label_smoothing": 0.1}, {},
                                    {"loss_type": ["robust", "bco_pair", "sft"], "loss_weights": [0.8, 0.3, 0.5],
                                     "label_smoothing": 0.1}, "base", False),
    "keep_end-accumulation": ({}, {"max_length": 9, "truncation_mode": "keep_end", "per_device_train_batch_size": 1,
                                   "gradient_accumulation_steps": 2},
                              {"max_length": 9, "truncation_mode": "keep_end", "per_device_train_batch_size": 1,
                               "gradient_accumulation_steps": 2}, "base", False),
    # 11 tokens: every chosen and rejected still differ (at 9 both keep one shared token, the
    # gradient is float noise that Adam's first step scales to full size on either side)
    "keep_start": ({}, {"max_length": 11, "truncation_mode": "keep_start"},
                   {"max_length": 11, "truncation_mode": "keep_start"}, "base", False),
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_dpo_option_runs_equal_trl(request, tiny_llama, case):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tmp, tok, adapter, _, _ = request.getfixturevalue("setup")
    pt, training, trl_keys, reference, full = CASES[case]
    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS * 2]
    train_rows, eval_rows = rows[:8], rows[8:12]
    other = tmp / "other_llama"
    if reference == "other" and not (other / "config.json").exists():
        save_tiny_llama(other, seed=1)
    steps = {"max_steps": 4, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "eval_steps": 2,
             "logging_steps": 1, "learning_rate": 1e-3, "max_length": 64, "train_sampling_strategy": "sequential"}
    args = DPOConfig(**{**trl_common(tmp), **steps, **trl_keys, "eval_strategy": "steps"})
    ref = {"base": lambda: base_model(tiny_llama), "other": lambda: AutoModelForCausalLM.from_pretrained(other),
           None: lambda: None}[reference]()
    policy = base_model(tiny_llama) if full else fresh_peft(tiny_llama, adapter)
    tr = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(train_rows),
                    eval_dataset=Dataset.from_list(eval_rows), processing_class=tok)
    tr.train()

    folder = tmp / f"options_{case}"
    folder.mkdir()
    files = {}
    for split, rs in (("train", train_rows), ("test", eval_rows)):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rs))
    model = {"name": "tiny", "huggingface_id": str(tiny_llama)}
    if reference == "other":
        model["ref_model_id"] = str(other)
    cfg = write_config(folder / "c.yaml", tiny_llama, files["train"], models=[model],
                       dataset={"name": str(files["train"]), "eval_split": "test",
                                "data_files": {k: str(v) for k, v in files.items()}},
                       post_training={"method": "dpo", "beta": 0.1, "use_ref_model": reference is not None, **pt},
                       lora={"enabled": False} if full else
                       {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_from": str(adapter)},
                       training={**steps, **training})
    assert train.main(["--config", str(cfg), "--output-dir", str(folder / "out")]) == 0
    logged = [json.loads(l) for l in (folder / "out" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    compared = 0
    for kind in ("loss", "eval_loss"):
        theirs = {h["step"]: h for h in tr.state.log_history if kind in h}
        mine = {r["step"]: r for r in logged if kind in r}
        assert sorted(theirs) == sorted(mine) == ([1, 2, 3, 4] if kind == "loss" else [2, 4])
        for step, t in theirs.items():
            m = mine[step]
            assert set(t) == set(m) - OWN, (kind, step, sorted(set(t) ^ (set(m) - OWN)))
            for k, v in t.items():
                if not any(w in k for w in TIMING):
                    assert m[k] == pytest.approx(v, rel=1e-5, abs=2e-6), (kind, step, k, m[k], v)
                    compared += 1
    assert abs(tr.state.log_history[-2]["eval_rewards/margins"]) > 1e-4   # the runs moved
    print(f"{case}: {compared} numbers equal TRL's")
