"""`jaxpref evaluate`'s summary equals TRL's own `trainer.evaluate()` for the offline methods it
takes, on the same tiny model, PEFT adapter and pairs (TRL's means: each eval batch's mean, then
their mean over the batches, the last one smaller): DPO (reference: the adapter off), and ORPO / CPO / SimPO, which have no
reference and whose rewards are beta times the policy's log-probs (length-averaged for ORPO and
for the ipo / simpo losses, as TRL's trainers compute them)."""
from __future__ import annotations

import json

import pytest

from conftest import write_config
from jaxpref import evaluate
from test_trl_orpo_cpo import PLAIN, smol  # noqa: F401 (fixture)
from test_trl_trainers import base_model, fresh_peft

KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected")
SLOW = pytest.mark.slow
CASES = [pytest.param("dpo", None, 4, marks=SLOW), ("orpo", None, 4), pytest.param("cpo", "sigmoid", 4, marks=SLOW),
         ("cpo", "ipo", 4), pytest.param("simpo", None, 4, marks=SLOW),
         # batches of 3 and 1 pairs: TRL's evaluate() means each batch, then the batch means
         ("dpo", None, 3), pytest.param("orpo", None, 3, marks=SLOW)]


def trl_evaluate(smol, method: str, loss_type: str | None, batch: int) -> dict:  # noqa: F811
    from datasets import Dataset

    tmp, tok, model_dir, adapter, _ = smol
    kw = {"loss_type": loss_type} if loss_type else {}
    if method == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
        kw = {"loss_type": "simpo", "cpo_alpha": 0.0} if method == "simpo" else kw
    args = Config(output_dir=str(tmp / "trl_eval"), per_device_eval_batch_size=batch, report_to=[],
                  use_cpu=True, max_length=64, beta=0.1, bf16=False, **kw)
    data = Dataset.from_list(PLAIN)
    # DPO: the reference is the base model (given a PeftModel alone, TRL 1.16 would copy the adapter
    # as its "ref" adapter, jaxpref's `lora.init_from`).
    ref = {"ref_model": base_model(model_dir)} if method == "dpo" else {}
    tr = Trainer(model=fresh_peft(model_dir, adapter), args=args, train_dataset=data, eval_dataset=data,
                 processing_class=tok, **ref)
    return tr.evaluate()


@pytest.mark.parametrize("method,loss_type,batch", CASES)
def test_evaluate_summary_equals_trl_evaluate(smol, method, loss_type, batch, tmp_path, monkeypatch, capsys):  # noqa: F811
    tmp, _, model_dir, adapter, files = smol
    pt = {"method": method, "beta": 0.1, **({"loss_type": loss_type} if loss_type else {})}
    cfg = write_config(tmp_path / "c.yaml", model_dir, files["plain"], post_training=pt,
                       training={"per_device_eval_batch_size": batch, "max_length": 64})
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.jsonl"
    code = evaluate.main(["--config", str(cfg), "--adapter", str(adapter), "--split", "train",
                          "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    mine = json.loads(captured.out)
    theirs = trl_evaluate(smol, method, loss_type, batch)
    assert mine["examples"] == len(PLAIN)
    assert abs(theirs["eval_rewards/margins"]) > 1e-4
    for k in KEYS:
        assert mine[k] == pytest.approx(theirs["eval_" + k], rel=1e-5, abs=1e-6), (k, mine[k], theirs["eval_" + k])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    for line in lines:   # each line: rewards = beta * (policy - reference)
        for side in ("chosen", "rejected"):
            assert line[f"rewards/{side}"] == pytest.approx(0.1 * (line[f"logps/{side}"] - line[f"ref_logps/{side}"]))
