"""`python -m jaxpref.train` with an online method on a tiny model: completions sampled by the
engine, rewards from a reward function file, and the first step's advantages and loss equal to
TRL's formulas (GRPOTrainer / RLOOTrainer, written out in torch) on the completions the run
sampled and wrote to samples.jsonl."""
from __future__ import annotations

import pytest

from conftest import write_config
from online_fixtures import (one_device_and_mesh, online_setup, train_ok,  # noqa: F401  (the module fixture)
                             train_refused)

def run(tmp_path, d, capsys, **post):
    pt = {"method": "grpo", "reward_funcs": [str(d / "rewards.py") + ":digit_share", "rewards.py:wants_answer"],
          "reward_weights": [1.0, 0.5], "num_generations": 4, "max_completion_length": 16, **post}
    cfg = write_config(d / f"{post.get('method', 'grpo')}.yaml", d / "model", d / "prompts.jsonl", post_training=pt,
                       training={"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                                 "learning_rate": 1.0e-2, "logging_steps": 1, "seed": 0, "max_prompt_length": 32})
    run_dir, metrics, samples = train_ok(cfg, tmp_path / "out", capsys)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    return metrics, samples


def first(samples):
    import torch

    rows = [s for s in samples if s["step"] == 0]
    assert len(rows) == 8
    per_func = torch.tensor([[float("nan") if v is None else v for v in s["rewards"].values()] for s in rows])
    w = torch.tensor([1.0, 0.5])
    rewards = torch.nansum(per_func * w.unsqueeze(0), dim=1)   # TRL's _generate_and_score_completions
    lengths = torch.tensor([s["completion_length"] for s in rows], dtype=torch.float32)
    adv = torch.tensor([s["advantage"] for s in rows])
    assert len(set(lengths.tolist())) > 1 and adv.abs().max() > 0.1   # a first step with something to check
    return rows, per_func, rewards, lengths, adv


@pytest.mark.slow
def test_grpo_trains_from_the_cli_and_its_first_step_is_trls(tmp_path, online_setup, capsys):
    import torch

    metrics, samples = run(tmp_path, online_setup, capsys, beta=0.04, temperature=0.7)
    assert [m["step"] for m in metrics] == [1, 2]
    rows, per_func, rewards, lengths, adv = first(samples)
    assert rows[0]["prompt"] == rows[3]["prompt"] != rows[4]["prompt"]       # G = 4 completions per prompt
    # GRPOTrainer: group mean and std (scale_rewards "group"), advantages / (std + 1e-4).
    g = rewards.view(-1, 4)
    want = (rewards - g.mean(1).repeat_interleave(4)) / (g.std(1).repeat_interleave(4) + 1e-4)
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-6)
    m = metrics[0]
    assert m["reward"] == pytest.approx(rewards.mean().item(), rel=1e-5)
    assert m["reward_std"] == pytest.approx(rewards.std().item(), rel=1e-5)
    assert m["rewards/digit_share/mean"] == pytest.approx(torch.nanmean(per_func[:, 0]).item(), rel=1e-5)
    assert m["rewards/wants_answer/mean"] == pytest.approx(per_func[:, 1].mean().item(), rel=1e-5, abs=1e-7)
    assert m["completions/mean_length"] == pytest.approx(lengths.mean().item(), rel=1e-6)
    # Step 1: the adapter is zero, so the policy is the base (kl 0) and the rollout (ratio 1);
    # dapo's loss is then -sum(A * length) / sum(length) over the whole step.
    assert m["kl"] == 0.0
    assert m["clip_ratio/region_mean"] == 0.0
    assert m["loss"] == pytest.approx(-(adv * lengths).sum().item() / lengths.sum().item(), rel=1e-5, abs=1e-6)
    for k in ("entropy", "grad_norm", "learning_rate", "completions/clipped_ratio", "frac_reward_zero_std",
              "time/generate", "time/update"):
        assert k in m, k
    assert m["grad_norm"] > 0 and metrics[1]["kl"] > 0    # it trained: the policy left the base
    # num_tokens: TRL's running count of prompt (unpadded) and completion tokens sampled.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(online_setup / "model")
    seen = 0
    for step, row in enumerate(metrics):
        gen = [s for s in samples if s["step"] == step]
        seen += sum(len(tok(s["prompt"])["input_ids"]) + s["completion_length"] for s in gen)
        assert row["num_tokens"] == seen
    # The training forward (left-padded prompt, completion, logits / temperature) as transformers
    # computes it: step 1's entropy, the mean over micro-batches of its token mean.
    assert m["entropy"] == pytest.approx(base_entropy(online_setup / "model", rows, 0.7, micro_batches=2), rel=1e-4)


def base_entropy(model_dir, rows, temperature: float, micro_batches: int) -> float:
    """The base model's mean entropy of softmax(logits / T) over each completion's tokens (the
    word-level test tokenizer decodes and re-encodes a completion to its ids; an EOS that ended
    one is the token its length counts beyond the words)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    per_mb = [[] for _ in range(micro_batches)]
    for i, s in enumerate(rows):
        p = tok(s["prompt"])["input_ids"]
        c = tok(s["completion"], add_special_tokens=False)["input_ids"]
        c = c + [tok.eos_token_id] * (s["completion_length"] - len(c))
        assert len(c) == s["completion_length"]
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1] / temperature
        ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        per_mb[i * micro_batches // len(rows)].append(ent)
    return float(sum(torch.cat(e).mean() for e in per_mb) / micro_batches)


@pytest.mark.slow
def test_rloo_trains_from_the_cli_with_leave_one_out_advantages(tmp_path, online_setup, capsys):
    import torch

    metrics, samples = run(tmp_path, online_setup, capsys, method="rloo", num_generations=4)
    rows, per_func, rewards, lengths, adv = first(samples)
    # RLOOTrainer: rewards - beta * KL (0 at step 1), baseline the mean of the other G - 1.
    g = rewards.view(-1, 4)
    baseline = (g.sum(1, keepdim=True) - g) / 3
    torch.testing.assert_close(adv, (g - baseline).view(-1), rtol=1e-5, atol=1e-6)
    # Ratio 1: the loss is the mean of -A over the sequences of each micro-batch, averaged.
    assert metrics[0]["loss"] == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert metrics[0]["reward"] == pytest.approx(rewards.mean().item(), rel=1e-5)


@pytest.mark.slow
def test_grpo_reuses_a_rollout_and_masks_truncated_completions(tmp_path, online_setup, capsys):
    import torch

    metrics, samples = run(tmp_path, online_setup, capsys, loss_type="bnpo", num_iterations=2,
                           mask_truncated_completions=True, max_completion_length=2)
    assert {s["step"] for s in samples} == {0}                  # one generation for both steps
    assert metrics[1]["reward"] == metrics[0]["reward"] and metrics[1]["time/generate"] == 0.0
    rows, per_func, rewards, lengths, adv = first(samples)
    kept = torch.tensor([0.0 if s["truncated"] else 1.0 for s in rows])
    assert 0 < kept.sum() < len(rows)
    # bnpo per micro-batch (4 completions): -sum(A * tokens) / tokens over the kept completions.
    w = (lengths * kept).view(2, 4)
    loss = (-(adv.view(2, 4) * w).sum(1) / w.sum(1).clamp(min=1)).mean()
    assert metrics[0]["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    assert metrics[1]["clip_ratio/region_mean"] >= 0 and metrics[1]["loss"] != metrics[0]["loss"]


@pytest.mark.parametrize("post, training, needles", [
    ({"method": "ppo"}, {}, ["ppo", "grpo, rloo"]),
    ({"num_generations": 3}, {}, ["not a multiple", "num_generations` 3"]),
    ({"reward_funcs": ["some-org/reward-model"]}, {}, ["reward_funcs[0]", "no reward model folder"]),
    ({"reward_funcs": ["rewards.py:nowhere"]}, {}, ["rewards.py:nowhere", "nowhere"]),
    ({"reward_funcs": ["broken.py:broken"]}, {}, ["broken", "ZeroDivisionError"]),
    ({"repetition_penalty": 0.0}, {}, ["post_training.repetition_penalty", "> 0"]),
    ({"min_p": 1.5}, {}, ["post_training.min_p", "[0, 1]"]),
    ({}, {"max_steps": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8}, ["prompts are fewer"]),
])
def test_bad_online_inputs_are_one_line_errors(tmp_path, online_setup, capsys, post, training, needles):
    d = online_setup
    (d / "broken.py").write_text("def broken(completions, **kw):\n    return [1 / 0]\n")
    pt = {"method": "grpo", "reward_funcs": ["rewards.py:digit_share"], "num_generations": 4,
          "max_completion_length": 4, **post}
    cfg = write_config(d / "bad.yaml", d / "model", d / "prompts.jsonl", post_training=pt,
                       training={"max_steps": 1, "per_device_train_batch_size": 4, **training})
    train_refused(cfg, tmp_path / "out", capsys, needles)


@pytest.mark.slow
def test_grpo_on_8_virtual_devices_gives_the_single_device_numbers(tmp_path, online_setup, capsys):
    """The same generation (8 completions) on one device and on a data 4 x fsdp 2 mesh of 8 virtual
    CPU devices (a subprocess): the same sampled completions, rewards, losses and gradients."""
    d = online_setup
    pt = {"method": "grpo", "reward_funcs": ["rewards.py:digit_share"], "num_generations": 4,
          "max_completion_length": 8, "beta": 0.04}
    runs = one_device_and_mesh(tmp_path, d, d / "model", pt, (8, 1), {"data": 4, "fsdp": 2, "tensor": 1})
    for a, b in zip(runs["one"], runs["mesh"]):
        for k in ("loss", "reward", "reward_std", "kl", "entropy", "grad_norm", "completions/mean_length"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("method", ["grpo", "online_dpo"])
def test_sampling_keys_reach_the_generator(online_setup, method):
    """TRL's min_p and repetition_penalty (with temperature, top_p, top_k) are the engine's
    sampling options; online DPO's completion limit is its max_new_tokens."""
    from transformers import AutoTokenizer

    from jaxpref.config import load_config
    from jaxpref.generation.sampling import Sampling
    from jaxpref.training import online_pairs, rollouts

    d = online_setup
    pt = {"method": method, "reward_funcs": ["rewards.py:digit_share"], "temperature": 0.8, "top_p": 0.9, "top_k": 7,
          "min_p": 0.05, "repetition_penalty": 1.2, ("max_new_tokens" if method == "online_dpo" else
                                                     "max_completion_length"): 5}
    cfg = load_config(write_config(d / f"keys_{method}.yaml", d / "model", d / "prompts.jsonl", post_training=pt))
    tok = AutoTokenizer.from_pretrained(d / "model")
    build = online_pairs.decode_options if method == "online_dpo" else rollouts.decode_options
    opts = build(cfg.post_training, tok, [tok.eos_token_id])
    assert opts.sampling == Sampling(0.8, top_p=0.9, top_k=7, min_p=0.05, repetition_penalty=1.2)
    assert opts.max_new_tokens == 5 and opts.eos_ids == (tok.eos_token_id,)
