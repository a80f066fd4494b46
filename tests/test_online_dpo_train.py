"""Online DPO in the online loop on a tiny model: a generation's first optimizer step (the run's own
sampled completions, a LoRA moved away from zero) gives the loss, gradient norm and metrics of
TRL's `OnlineDPOTrainer.training_step` run on the same completions with the same adapter in peft;
and `python -m jaxpref.train` trains it, logs TRL's metric names and saves an adapter peft loads."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from conftest import write_config
from online_fixtures import one_device_and_mesh, online_setup, train_ok  # noqa: F401  (the module fixture)

METRICS = ("objective/scores_margin", "objective/scores", "val/contain_eos_token", "logps/chosen",
           "logps/rejected", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
           "objective/entropy", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "beta")


def _config(d, name: str, **post):
    pt = {"method": "online_dpo", "reward_funcs": ["rewards.py:digit_share", "rewards.py:wants_answer"],
          "reward_weights": [1.0, 0.5], "max_new_tokens": 6, "beta": 0.2, **post}
    return write_config(d / f"{name}.yaml", d / "model", d / "prompts.jsonl", post_training=pt,
                        training={"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                  "learning_rate": 1.0e-2, "logging_steps": 1, "seed": 0, "max_prompt_length": 32})


def _trl_first_step(d, r, funcs, adapter, B: int, G: int, loss_type: str, beta: float, penalty):
    """OnlineDPOTrainer.training_step on each micro-batch of the rollout `r` (TRL's row order: first
    samples, then second ones), generation replaced by those rows, the policy the peft adapter.
    Padded completion slots get log-prob 0: TRL sums `objective/kl` and `objective/entropy` over
    every slot, padding included, jaxpref over the completion tokens (the loss masks either way)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tok = AutoTokenizer.from_pretrained(d / "model")
    base = AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.float32)
    args = OnlineDPOConfig(output_dir=str(d / "trl"), per_device_train_batch_size=B, gradient_accumulation_steps=G,
                           max_new_tokens=2, beta=[beta], loss_type=loss_type, missing_eos_penalty=penalty,
                           reward_weights=[1.0, 0.5], report_to=[], use_cpu=True, save_strategy="no",
                           gradient_checkpointing=False)
    ds = Dataset.from_dict({"prompt": ["x"], "answer": ["y"]})
    lora = LoraConfig.from_pretrained(adapter)
    lora.inference_mode = False
    tr = OnlineDPOTrainer(model=base, reward_funcs=funcs, args=args, processing_class=tok, train_dataset=ds,
                          peft_config=lora)   # the reference: the adapter off
    missing = set_peft_model_state_dict(tr.model, load_file(adapter / "adapter_model.safetensors"))
    assert not missing.unexpected_keys
    forward = tr._forward
    tr._forward = lambda m, p, pm, c, cm, v=None: forward(m, p, pm, c, cm, v) * cm
    n, P, losses = 2 * B, r.P, []
    for g in range(G):
        s = slice(g * n, (g + 1) * n)
        ids, valid = torch.tensor(r.ids[s]).long(), torch.tensor(r.valid[s]).long()
        out = (ids[:, :P], valid[:, :P], ids[:, P:], torch.tensor(r.mask[s]).long(), None)
        tr._generate = lambda model, prompts, images=None, out=out: out
        answers = [row["answer"] for row in r.columns[s][:B]]
        losses.append(tr.training_step(tr.model, {"prompt": list(r.prompts[s][:B]), "answer": answers}).item())
    grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    return sum(losses), norm, {k: float(np.mean(v)) for k, v in tr.stats.items() if v}


@pytest.mark.slow
@pytest.mark.parametrize("loss_type, penalty", [("sigmoid", None), ("ipo", 0.5)])
def test_first_step_is_trls_online_dpo_training_step(tmp_path, online_setup, monkeypatch, loss_type, penalty):  # noqa: F811
    from jaxpref.config import load_config
    from jaxpref.lora.peft import save_adapter
    from jaxpref.training import online_pairs
    from jaxpref.training.online_loop import OnlineRun

    d = online_setup
    cfg = load_config(_config(d, f"oracle_{loss_type}", loss_type=loss_type, missing_eos_penalty=penalty,
                             max_new_tokens=2))
    (tmp_path / "run").mkdir()
    run = OnlineRun(cfg, 0, tmp_path / "run")
    rng = np.random.default_rng(0)   # a policy away from the base: every LoRA factor random
    lora = jax.tree_util.tree_map(lambda x: np.asarray(rng.normal(0, 0.3, x.shape), x.dtype),
                                  jax.device_get(run.state.lora))
    run.state = dataclasses.replace(run.state, lora=jax.device_put(lora))
    save_adapter(tmp_path / "adapter", run.bundle, lora, run.lspec, "tiny", tokenizer=run.tok)
    seen = {}
    assemble = online_pairs.rollouts.assemble

    def keep(*a, **k):
        seen["r"] = out = assemble(*a, **k)
        out.columns = [dict(answer=run.data.columns["answer"][i]) for i in out.rows]
        return out

    monkeypatch.setattr(online_pairs.rollouts, "assemble", keep)
    batch, num_items, P, _, _ = run._rollout(0, [0, 1, 2, 3], 0.0)
    state, m = run.step_fn(run.state, run.params, batch, num_items, P=P)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    run.close()
    r = seen["r"]
    assert len(set(r.lengths.tolist())) > 1 and r.truncated.any() and not r.truncated.all()
    loss, norm, theirs = _trl_first_step(d, r, [f.fn for f in run.funcs], tmp_path / "adapter", 2, 2,
                                          loss_type, 0.2, penalty)
    assert m["loss"] == pytest.approx(loss, rel=1e-5)
    assert m["grad_norm"] == pytest.approx(norm, rel=1e-5)   # both sum the micro-batches' gradients
    assert set(theirs) == set(METRICS)
    for k in METRICS:
        assert m[k] == pytest.approx(theirs[k], rel=1e-5, abs=1e-6), k
    assert abs(theirs["objective/kl"]) > 0.01 and theirs["objective/scores_margin"] > 0


@pytest.mark.slow
def test_online_dpo_trains_from_the_cli(tmp_path, online_setup, capsys):  # noqa: F811
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = online_setup
    cfg = _config(d, "cli", temperature=0.9, missing_eos_penalty=0.5)
    run_dir, metrics, samples = train_ok(cfg, tmp_path / "out", capsys)
    assert [m["step"] for m in metrics] == [1, 2]
    for k in METRICS + ("loss", "grad_norm", "learning_rate", "time/generate", "time/update"):
        assert k in metrics[0], k
    # A generation: 2 x 2 prompts, two completions each; one chosen per pair, never the worse one.
    first = [s for s in samples if s["step"] == 0]
    assert len(first) == 8 and sum(s["chosen"] for s in first) == 4
    pairs = {}
    for s in first:
        pairs.setdefault(s["prompt"], []).append(s)
    for a, b in pairs.values():
        c, o = (a, b) if a["chosen"] else (b, a)
        assert c["reward"] >= o["reward"]
        assert c["reward"] == pytest.approx(sum(w * (v or 0.0) for w, v in zip((1.0, 0.5), c["rewards"].values()))
                                            - (0.0 if c["contains_eos"] else 0.5), abs=1e-6)
    m = metrics[0]
    assert m["objective/scores"] == pytest.approx(np.mean([s["reward"] for s in first]), rel=1e-5)
    assert m["val/contain_eos_token"] == pytest.approx(np.mean([s["contains_eos"] for s in first]), rel=1e-6)
    # Step 1: the adapter is zero, so the policy is the base: no KL, the sigmoid loss log 2.
    assert m["objective/kl"] == 0.0 and m["loss"] == pytest.approx(np.log(2), rel=1e-6)
    assert m["beta"] == pytest.approx(0.2)
    assert m["grad_norm"] > 0 and metrics[1]["objective/kl"] != 0.0
    base = AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.slow
def test_online_dpo_on_8_virtual_devices_gives_the_single_device_numbers(tmp_path, online_setup):  # noqa: F811
    """One generation of 4 prompts (8 completions) on one device and on a data 2 x fsdp 2 x tensor 2
    mesh of 8 virtual CPU devices (subprocesses): the same completions, pairs, losses and gradients."""
    d = online_setup
    pt = {"method": "online_dpo", "reward_funcs": ["rewards.py:digit_share"], "max_new_tokens": 6, "beta": 0.2}
    runs = one_device_and_mesh(tmp_path, d, d / "model", pt, (4, 1), {"data": 2, "fsdp": 2, "tensor": 2})
    assert runs["one"][1]["objective/kl"] != 0.0
    for a, b in zip(runs["one"], runs["mesh"]):
        # abs 1e-6: rewards/* are beta times differences of log-prob sums of about 10 (step 2: the
        # sharded sums differ in their last bits)
        for k in ("loss", "grad_norm") + METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
