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
    keys = KEYS + ("rewards/accuracies", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")
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
    assert_close(mine, theirs, KEYS + ("kl", "entropy"))
    # TRL counts the completion rows' tokens, not the KL rows'
    assert mine["num_tokens"] == theirs["num_tokens"]
    fast = ours(tmp, tiny_llama, tmp / "unpaired.jsonl", adapter, "kto", tag="_fast", training=FAST,
                use_ref_model=True)
    assert_close(fast, theirs, KEYS + ("kl",))
    assert fast["num_tokens"] == theirs["num_tokens"]


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


def _tiny_mixtral(model_dir, coef: float):
    """A tiny random Mixtral (4 experts, top 2) with the test tokenizer, saved to `model_dir`."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from conftest import make_tokenizer

    tok = make_tokenizer(model_dir)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(tok.get_vocab()), hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=coef,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    MixtralForCausalLM(cfg).eval().save_pretrained(model_dir)
    return model_dir


def test_dpo_on_a_mixture_of_experts_adds_the_router_loss_as_trl(tmp_path):
    """Mixtral: TRL adds `router_aux_loss_coef` x the policy forward's load-balancing loss to the
    DPO loss and logs it as `aux_loss`; jaxpref the same, in TRL's padded layout and in the
    shared-prompt one (the prompt's tokens counted once per completion, as in TRL's
    two rows); an explicit padding-free layout is refused. A coefficient of 0.1 makes the term
    visible in the loss."""
    from transformers import AutoTokenizer, MixtralForCausalLM
    from trl import DPOConfig, DPOTrainer

    model_dir = _tiny_mixtral(tmp_path / "tiny_mixtral", 0.1)
    adapter = save_moved_adapter(MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                 tmp_path / "init_adapter")
    pairs = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS[:B]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    tok = AutoTokenizer.from_pretrained(model_dir)
    theirs = first_log(DPOTrainer, DPOConfig(**trl_common(tmp_path)), pairs, tok, fresh_peft(model_dir, adapter),
                       ref_model=base_model(model_dir))
    assert theirs["aux_loss"] > 1.0
    keys = KEYS + ("aux_loss",)
    # concatenated rows, and the default shared prompt (padded here: padding-free rows drop each
    # sequence's last token, which TRL's router statistics count)
    for layout in ({"pair_layout": "concatenated", "padding_free": False}, {}):
        tag = "_".join(f"{v}" for v in layout.values())
        mine = ours(tmp_path, model_dir, tmp_path / "pairs.jsonl", adapter, "dpo", tag=tag, training=layout,
                    use_ref_model=True)
        assert_close(mine, theirs, keys)
    cfg = write_config(tmp_path / "pf.yaml", model_dir, tmp_path / "pairs.jsonl", training={"padding_free": True})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "pf")]) == 2


def test_kto_on_a_mixture_of_experts_with_a_router_loss_is_refused(tmp_path, capsys):
    """TRL's KTO adds the router loss of its main forward only; jaxpref does not compute that yet
    and says so in one line (exit 2) unless the model's coefficient is 0."""
    model_dir = _tiny_mixtral(tmp_path / "tiny_mixtral", 0.001)
    rows = [{"prompt": p, "completion": " " + c, "label": True} for p, c, _ in PAIRS[:B]]
    (tmp_path / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(tmp_path / "kto.yaml", model_dir, tmp_path / "unpaired.jsonl",
                       post_training={"method": "kto", "beta": 0.1})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "kto on a mixture of experts: TRL adds router_aux_loss_coef (0.001)" in err and "Traceback" not in err


def test_padding_free_on_a_mixture_of_experts_is_refused_in_the_dry_run_too(tmp_path, capsys):
    """The run refuses an explicit padding-free layout on a mixture of experts with a router loss;
    the dry run says so as well (it said OK)."""
    model_dir = _tiny_mixtral(tmp_path / "tiny_mixtral", 0.001)
    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS[:B]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(tmp_path / "pf.yaml", model_dir, tmp_path / "pairs.jsonl", training={"padding_free": True})
    capsys.readouterr()   # the model's saving
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`training.padding_free: true` leaves each sequence's last token" in err, err
