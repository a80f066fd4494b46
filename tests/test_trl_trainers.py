"""First logged step of a jaxpref run equals TRL's trainer on the same tiny model, data, batch and
LoRA initial values (a PEFT adapter with random A and B, imported with `lora.init_from`).

Each method is also run padding-free (`training.padding_free`, rows end to end with per-row
attention) over per-layer weights (`training.scan_layers: false`): the same numbers as TRL, and
the same token count."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import PAIRS, save_moved_adapter, write_config
from jaxpref import train

B = 4
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("trl")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    adapter = save_moved_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                 tmp / "init_adapter")
    pairs = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS[:B]]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    unpaired = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"],
                 "label": i % 2 == 0} for i, p in enumerate(pairs)]
    (tmp / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    return tmp, tok, adapter, pairs, unpaired


def base_model(tiny_llama):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def fresh_peft(tiny_llama, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter, is_trainable=True)


FAST = {"padding_free": True, "scan_layers": False}


def ours(tmp, tiny_llama, data, adapter, method, batch=B, tag="", training=None, **pt):
    cfg = write_config(tmp / f"{method}{tag}.yaml", tiny_llama, data,
                       post_training={"method": method, "beta": 0.1, **pt},
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                             "init_from": str(adapter)},
                       training={"max_steps": 1, "per_device_train_batch_size": batch, "learning_rate": 1e-3,
                                 "max_length": 64, "logging_steps": 1, **(training or {})})
    out = tmp / f"out_{method}{tag}"
    assert train.main(["--config", str(cfg), "--output-dir", str(out)]) == 0
    return json.loads((out / "tiny" / "metrics.jsonl").read_text().splitlines()[0])


def trl_common(tmp):
    return dict(output_dir=str(tmp / "trl_out"), per_device_train_batch_size=B, max_steps=1, logging_steps=1,
                learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", max_length=64,
                beta=0.1, seed=0, bf16=False)


def first_log(trainer_cls, args, rows: list[dict], tok, model, **kw) -> dict:
    """TRL's first logged step of `trainer_cls` on these rows."""
    from datasets import Dataset

    tr = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, **kw)
    tr.train()
    return tr.state.log_history[0]


def assert_close(a: dict, b: dict, keys):
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])


def test_dpo_first_step_equals_trl(setup, tiny_llama):
    from trl import DPOConfig, DPOTrainer

    tmp, tok, adapter, pairs, _ = setup
    # Reference = the base model (a separate frozen copy on TRL's side, use_ref_model here).
    theirs = first_log(DPOTrainer, DPOConfig(**trl_common(tmp)), pairs, tok, fresh_peft(tiny_llama, adapter),
                       ref_model=base_model(tiny_llama))
    mine = ours(tmp, tiny_llama, tmp / "pairs.jsonl", adapter, "dpo", use_ref_model=True)
    assert abs(theirs["rewards/margins"]) > 1e-3  # the random LoRA makes the step non-trivial
    keys = KEYS + ("rewards/accuracies", "logits/chosen", "logits/rejected")
    assert_close(mine, theirs, keys)
    for layout in ("concatenated", "shared_prompt"):
        fast = ours(tmp, tiny_llama, tmp / "pairs.jsonl", adapter, "dpo", tag=f"_fast_{layout}",
                    training={**FAST, "pair_layout": layout}, use_ref_model=True)
        assert_close(fast, theirs, keys)
        assert fast["num_tokens"] == mine["num_tokens"]


def test_dpo_from_existing_adapter_uses_it_as_reference_like_trl(setup, tiny_llama):
    from trl import DPOConfig, DPOTrainer

    tmp, tok, adapter, pairs, _ = setup
    theirs = first_log(DPOTrainer, DPOConfig(**trl_common(tmp)), pairs, tok, fresh_peft(tiny_llama, adapter))
    mine = ours(tmp, tiny_llama, tmp / "pairs.jsonl", adapter, "dpo", tag="_init")
    assert theirs["rewards/margins"] == 0.0
    assert_close(mine, theirs, KEYS)


def test_kto_first_step_equals_trl(setup, tiny_llama):
    from trl import KTOConfig, KTOTrainer

    tmp, tok, adapter, _, unpaired = setup
    theirs = first_log(KTOTrainer, KTOConfig(**trl_common(tmp)), unpaired, tok, fresh_peft(tiny_llama, adapter),
                       ref_model=base_model(tiny_llama))
    mine = ours(tmp, tiny_llama, tmp / "unpaired.jsonl", adapter, "kto", use_ref_model=True)
    assert abs(theirs["rewards/chosen"]) > 1e-4
    assert_close(mine, theirs, KEYS + ("kl",))
    fast = ours(tmp, tiny_llama, tmp / "unpaired.jsonl", adapter, "kto", tag="_fast", training=FAST,
                use_ref_model=True)
    assert_close(fast, theirs, KEYS + ("kl",))
    assert fast["num_tokens"] == mine["num_tokens"]


def test_kto_on_paired_data_equals_trl(setup, tiny_llama):
    from trl import KTOConfig, KTOTrainer

    tmp, tok, adapter, pairs, _ = setup
    args = trl_common(tmp)
    args["per_device_train_batch_size"] = 2 * B
    theirs = first_log(KTOTrainer, KTOConfig(**args), pairs, tok, fresh_peft(tiny_llama, adapter),
                       ref_model=base_model(tiny_llama))
    mine = ours(tmp, tiny_llama, tmp / "pairs.jsonl", adapter, "kto", batch=2 * B, tag="_paired",
                use_ref_model=True)
    assert_close(mine, theirs, KEYS + ("kl",))


def test_orpo_first_step_equals_trl(setup, tiny_llama):
    """TRL's ORPO (trl.experimental) prepends the tokenizer's BOS `<s>` to the prompt; so does
    jaxpref's ORPO tokenization (`jaxpref.data.trl_rules`). More cases: tests/test_trl_orpo_cpo.py."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tmp, tok, adapter, pairs, _ = setup
    model_dir = tiny_llama
    assert tok.bos_token == "<s>"
    args = trl_common(tmp)
    theirs = first_log(ORPOTrainer, ORPOConfig(**args), pairs, tok, fresh_peft(model_dir, adapter))
    mine = ours(tmp, model_dir, tmp / "pairs.jsonl", adapter, "orpo", tag="_orpo")
    keys = KEYS + ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies")
    assert_close(mine, theirs, keys)
    fast = ours(tmp, model_dir, tmp / "pairs.jsonl", adapter, "orpo", tag="_orpo_fast",
                training={**FAST, "pair_layout": "shared_prompt"})
    assert_close(fast, theirs, keys)
