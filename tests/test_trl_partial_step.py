"""A train split that does not divide into whole optimizer steps trains as TRL's trainers do
(transformers' Trainer underneath): each epoch is ceil(N / per_device_train_batch_size)
micro-batches, the last one shorter, taken gradient_accumulation_steps at a time, so its last step
holds the micro-batches that are left, and that step's loss (and gradient) is divided by the
number of micro-batches it holds (`current_gradient_accumulation_steps`). `epoch` is logged as
epoch + micro-batches done / micro-batches per epoch; the schedule runs over those steps.

Each case runs jaxpref and TRL (1.16) on the tiny Llama with a random LoRA, the same rows in
order on both sides, logging every step: the same steps, each row's numbers equal TRL's, and
summary.json's `train_loss`, `train_samples_per_second` and `train_steps_per_second` are those of
TRL's final row (samples: rows x epochs, the shorter batch counted as it is)."""
from __future__ import annotations

import json

import pytest

from conftest import PAIRS
from test_trl_logging import our_rows
from test_trl_trainers import base_model, fresh_peft, ours, setup, trl_common  # noqa: F401

OWN = {"compilations", "tokens_per_second"}   # jaxpref's own keys, documented in the README
TIMING = ("runtime", "per_second")
# ORPO's `logits/*` average every position of TRL's padded batch (tests/test_trl_orpo_cpo.py)
NOT_COMPARED = {"orpo": {"logits/chosen", "logits/rejected"}}
EXTRA = {"orpo": {"num_tokens"}}   # jaxpref logs the train tokens for every method; TRL's ORPOTrainer does not
PLAIN = {"pair_layout": "concatenated", "padding_free": False}
FAST = {"pair_layout": "shared_prompt", "padding_free": True}
# name: method, rows, training (both sides; TRL's names), jaxpref-only training, post_training, TRL config keys,
#       the steps TRL takes, their logged epochs
CASES = {
    # 10 pairs in micro-batches of 4: steps of 4, 4, 2 pairs an epoch, two epochs
    "dpo-lora-2_epochs": ("dpo", 10, {"per_device_train_batch_size": 4, "num_epochs": 2}, PLAIN, {}, {},
                          6, [1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0]),
    # 9 pairs, micro-batches of 2 x 2: 5 micro-batches, steps of 2, 2, 1 (the last of one pair);
    # linear schedule after one warm-up step (its lr shows the run's 3 steps), clipped at 0.02
    "dpo-accumulation-clip": ("dpo", 9, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                         "lr_scheduler_type": "linear", "warmup_steps": 1, "max_grad_norm": 0.02, "num_epochs": 1},
                              PLAIN, {}, {}, 3, [0.4, 0.8, 1.0]),
    "dpo-accumulation-clip-shared_prompt": ("dpo", 9, {"per_device_train_batch_size": 2,
                                                       "gradient_accumulation_steps": 2, "lr_scheduler_type": "linear",
                                                       "warmup_steps": 1, "max_grad_norm": 0.02, "num_epochs": 1},
                                            FAST, {}, {}, 3, [0.4, 0.8, 1.0]),
    # 8 completions in micro-batches of 3: 3, 3, 2 (TRL's KL completions rotate within the same groups)
    "kto": ("kto", 8, {"per_device_train_batch_size": 3, "num_epochs": 1}, {}, {"loss_type": "kto"}, {"loss_type": "kto"},
            3, [1 / 3, 2 / 3, 1.0]),
    # 5 pairs in micro-batches of 2: 2, 2, 1
    "orpo": ("orpo", 5, {"per_device_train_batch_size": 2, "num_epochs": 1}, {}, {}, {}, 3, [1 / 3, 2 / 3, 1.0]),
}
KTO_LABELS = [True, False, True, True, False, True, False, True]   # the last micro-batch holds both kinds


def _rows(method: str, n: int) -> list[dict]:
    if method == "kto":
        return [{"prompt": p, "completion": " " + (c if ok else r), "label": ok}
                for (p, c, r), ok in zip(PAIRS * 2, KTO_LABELS[:n])]
    return [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in (PAIRS * 2)[:n]]


def _trl(method: str, tmp, tok, tiny_llama, adapter, rows, training: dict, trl_keys: dict):
    """TRL's logged train rows {step: row} and its final row (train_loss)."""
    from datasets import Dataset

    if method == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    elif method == "kto":
        from trl import KTOConfig as Config, KTOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    names = {"num_epochs": "num_train_epochs"}
    args = Config(**{**trl_common(tmp), "max_steps": -1, "train_sampling_strategy": "sequential",
                     **{names.get(k, k): v for k, v in training.items()}, **trl_keys})
    kw = {} if method == "orpo" else {"ref_model": base_model(tiny_llama)}
    tr = Trainer(model=fresh_peft(tiny_llama, adapter), args=args, train_dataset=Dataset.from_list(rows),
                 processing_class=tok, **kw)
    tr.train()
    rows = {h["step"]: h for h in tr.state.log_history if "loss" in h}
    return rows, next(h for h in tr.state.log_history if "train_loss" in h)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_a_last_shorter_step_equals_trl(request, tiny_llama, case):
    tmp, tok, adapter, _, _ = request.getfixturevalue("setup")
    method, n, training, layout, pt, trl_keys, steps, epochs = CASES[case]
    rows = _rows(method, n)
    theirs, final = _trl(method, tmp, tok, tiny_llama, adapter, rows, training, trl_keys)
    assert sorted(theirs) == list(range(1, steps + 1))   # the oracle takes the last shorter step
    assert [theirs[s]["epoch"] for s in sorted(theirs)] == pytest.approx(epochs, rel=1e-12)

    data = tmp / f"partial_{case}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tag = f"_partial_{case}"
    ours(tmp, tiny_llama, data, adapter, method, batch=training["per_device_train_batch_size"], tag=tag,
         training={"max_steps": -1, "train_sampling_strategy": "sequential", **training, **layout},
         **({} if method == "orpo" else {"use_ref_model": True}), **pt)
    out = tmp / f"out_{method}{tag}"
    mine = our_rows(out)
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    assert (sorted(mine), summary["steps"]) == (sorted(theirs), steps), "jaxpref's steps are not TRL's"
    skip = NOT_COMPARED.get(method, set())
    compared = 0
    for step, t in theirs.items():
        m = mine[step]
        assert set(t) - skip == set(m) - OWN - EXTRA.get(method, set()) - skip, \
            (step, sorted(set(t) ^ (set(m) - OWN)))
        for k, v in t.items():
            if k not in skip and not any(w in k for w in TIMING):
                assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k, m[k], v)
                compared += 1
    assert summary["train_loss"] == pytest.approx(final["train_loss"], rel=1e-5)
    # TRL's final row counts the samples trained (rows x epochs: the last step's shorter batch as it is)
    for key, count in (("train_samples_per_second", n * training["num_epochs"]), ("train_steps_per_second", steps)):
        assert final[key] * final["train_runtime"] == pytest.approx(count, rel=0.01), key
        assert summary[key] * summary["train_runtime"] == pytest.approx(count, rel=0.01), key
    if "max_grad_norm" in training:   # clipping acted on every step
        assert min(t["grad_norm"] for t in theirs.values()) > training["max_grad_norm"]
    if method != "kto":
        assert abs(theirs[steps]["rewards/margins"]) > 1e-4   # the run moved
    print(f"{case}: {steps} steps, {compared} numbers equal TRL's")
