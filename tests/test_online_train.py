"""`python -m jaxpref.train` with an online method on a tiny model: completions sampled by the
engine, rewards from a reward function file, and the first step's advantages and loss equal to
TRL's formulas (GRPOTrainer / RLOOTrainer, written out in torch) on the completions the run
sampled and wrote to samples.jsonl."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_config
from online_fixtures import (ANSWERS, PROMPTS, one_device_and_mesh, online_setup,  # noqa: F401  (the fixture)
                             train_ok, train_refused)

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
    answers = dict(zip(PROMPTS, ANSWERS))
    assert [s["extra"] for s in rows] == [{"wanted": answers[s["prompt"]]} for s in rows]   # log_extra's column
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


def base_entropy(model_dir, rows, temperature: float, micro_batches: int, adapter=None) -> float:
    """The base model's (with `adapter`: that PEFT adapter's) mean entropy of softmax(logits / T)
    over each completion's tokens (the word-level test tokenizer decodes and re-encodes a completion
    to its ids; an EOS that ended one is the token its length counts beyond the words)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
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
@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_grpo_and_rloo_continue_an_init_from_adapter_against_its_initial_copy(tmp_path, request, capsys, method):
    """`lora.init_from` was read for its shape only: the online loop trained a new adapter. Now the
    run starts from the adapter (step 1's entropy is the PEFT model's, transformers + peft), and
    with beta > 0 the reference is its frozen initial copy, as TRL's GRPOTrainer / RLOOTrainer add
    it as a "ref" adapter: step 1's kl is 0 (against the base it would not be)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from conftest import save_moved_adapter

    d = request.getfixturevalue("online_setup")
    adapter = save_moved_adapter(AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.float32),
                                 tmp_path / "adapter")
    pt = {"method": method, "reward_funcs": ["rewards.py:digit_share"], "num_generations": 4,
          "max_completion_length": 4, "beta": 0.04}
    cfg = write_config(d / f"init_{method}.yaml", d / "model", d / "prompts.jsonl", post_training=pt,
                       lora={"init_from": str(adapter)},
                       training={"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1.0e-9})
    run_dir, metrics, samples = train_ok(cfg, tmp_path / "out", capsys)
    assert metrics[0]["kl"] == 0.0
    ours, theirs = load_file(run_dir / "adapter" / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    for k in theirs:   # one step of 1e-9: the adapter it started from
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-6, err_msg=k)
    rows = [s for s in samples if s["step"] == 0]
    want = base_entropy(d / "model", rows, 1.0, micro_batches=1, adapter=adapter)
    assert metrics[0]["entropy"] == pytest.approx(want, rel=1e-4)


def trl_logged_keys(d, **args) -> dict:
    """GRPOTrainer.train on the tiny model with the run's reward functions and batch sizes, logging
    every step: {"rollout": the names it logs with a generation, "per_step": the sorted ones of
    those each step logged, "epoch": each step's epoch}."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from jaxpref.data.rewards import load_reward_func
    from online_fixtures import ANSWERS, PROMPTS

    funcs = [load_reward_func(f"rewards.py:{f}", d).fn for f in ("digit_share", "wants_answer")]
    cfg = GRPOConfig(output_dir=str(d / "trl_keys"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     num_generations=4, max_completion_length=2, logging_steps=1, report_to=[], use_cpu=True,
                     save_strategy="no", **args)
    tr = GRPOTrainer(model=str(d / "model"), reward_funcs=funcs, args=cfg,
                     train_dataset=Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS}))
    tr.train()
    rows = [h for h in tr.state.log_history if "loss" in h]
    rollout = {k for k in rows[0] if k.startswith(("reward", "completions/", "frac_reward", "num_tokens"))}
    return {"rollout": rollout, "per_step": [sorted(rollout & set(h)) for h in rows],
            "epoch": [h["epoch"] for h in rows]}


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
    # TRL logs a generation's metrics with the step that sampled it only: step 2 has none of them.
    trl = trl_logged_keys(online_setup, num_iterations=2, max_steps=2)
    assert [sorted(set(m) & trl["rollout"]) for m in metrics] == trl["per_step"]
    assert [m["epoch"] for m in metrics] == pytest.approx(trl["epoch"], abs=1e-4)   # 6 steps an epoch
    assert "reward" in metrics[0] and "reward" not in metrics[1] and metrics[1]["time/generate"] == 0.0
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
    # offline keys an online run does not read: refused, not ignored
    ({}, {"max_length": 64}, ["training.max_length", "post_training.max_completion_length"]),
    ({}, {"truncation_mode": "keep_end"}, ["training.truncation_mode", "last tokens"]),
    ({}, {"train_sampling_strategy": "sequential"}, ["training.train_sampling_strategy", "shuffled"]),
    ({}, {"per_device_eval_batch_size": 2}, ["training.per_device_eval_batch_size", "evaluation"]),
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
    # The flash path on the mesh: the kernel (tokamax's reference on a CPU) inside shard_map.
    flash = one_device_and_mesh(tmp_path / "flash", d, d / "model", pt, (8, 1), {"data": 4, "fsdp": 2, "tensor": 1},
                                attention="flash")["mesh"]
    for a, b, c in zip(runs["one"], runs["mesh"], flash):
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7) and c["reward"] == a["reward"]
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


def _online_config(tmp_path, post=None, **sections):
    """A grpo config beside a reward function file (validation only: no model is read)."""
    (tmp_path / "rewards.py").write_text("def f(completions, **kw):\n    return [1.0] * len(completions)\n")
    pt = {"method": "grpo", "reward_funcs": ["rewards.py:f"], "num_generations": 2, **(post or {})}
    return write_config(tmp_path / "online.yaml", tmp_path / "model", tmp_path / "prompts.jsonl", post_training=pt,
                        **sections)


@pytest.mark.parametrize("post, sections, needle", [
    ({"use_ref_model": True}, {}, "`post_training.use_ref_model`"),
    ({}, {"models": [{"name": "tiny", "huggingface_id": "m", "ref_model_id": "r"}]}, "`models[0].ref_model_id`"),
    ({}, {"dataset": {"name": "p.jsonl", "eval_fraction": 0.25}}, "`dataset.eval_fraction`: evaluation"),
    ({}, {"dataset": {"name": "p.jsonl", "eval_split": "test"}}, "`dataset.eval_split`: evaluation"),
    ({}, {"training": {"eval_strategy": "steps", "eval_steps": 2}}, "`training.eval_steps`: evaluation"),
    ({}, {"finetuning": {"load_best_model_at_end": True}}, "`finetuning.load_best_model_at_end`: evaluation"),
    ({}, {"finetuning": {"early_stopping": {"patience": 2}}}, "`finetuning.early_stopping`: evaluation"),
    ({}, {"logging": {"report_to": [], "sample_prompts": 2}}, "`logging.sample_prompts` does not apply to grpo"),
    ({}, {"logging": {"report_to": [], "sample_max_new_tokens": 16}}, "`logging.sample_max_new_tokens` does not apply"),
    ({}, {"finetuning": {"greater_is_better": True}}, "`finetuning.greater_is_better`: evaluation"),
])
def test_offline_keys_an_online_run_would_ignore_are_refused(tmp_path, post, sections, needle):
    """The online loop evaluates nothing, has no separate reference model and writes every rollout to
    samples.jsonl: these keys would be parsed and ignored."""
    from jaxpref.config import load_config
    from jaxpref.errors import ConfigError

    cfg = _online_config(tmp_path, post, **sections)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert needle in str(e.value) and str(cfg) in str(e.value) and "\n" not in str(e.value)
    load_config(_online_config(tmp_path))   # the same config without the key loads


@pytest.mark.parametrize("returned, needle", [
    ("[float('inf'), 1.0]", "returned inf for completion 0; rewards must be finite"),
    ("[1.0, -float('inf')]", "returned -inf for completion 1"),
    ("[1.0]", "returned 1 rewards for 2 completions"),
    ("['a', 1.0]", "returned 'a' (a str) for completion 0"),
    ("1.0", "returned a float"),
    ("__import__('sys').exit(3)", "called sys.exit(3)"),
    ("(kw['log_extra']('c', [1]), [1.0, 1.0])[1]", "logged 1 values for column `c` (log_extra) for 2 completions"),
    ("1 / 0", "raised ZeroDivisionError"),
])
def test_bad_reward_returns_are_one_line_errors(returned, needle):
    from jaxpref.data.rewards import RewardError, RewardFunc, score

    fn = eval(f"lambda completions, **kw: {returned}")
    with pytest.raises(RewardError) as e:
        score([RewardFunc("f", "rewards.py:f", fn)], ["p", "p"], ["a", "b"], [[1], [2]])
    assert needle in str(e.value) and "`rewards.py:f`" in str(e.value) and "\n" not in str(e.value)


def test_completions_no_function_scored_are_counted(capsys):
    """TRL warns when every reward function returned None for a completion; so do we, with the count."""
    import numpy as np

    from jaxpref.data.rewards import RewardFunc, TrainerState, score

    funcs = [RewardFunc("a", "r.py:a", lambda completions, **kw: [None, 1.0, float("nan")]),
             RewardFunc("b", "r.py:b", lambda completions, **kw: [None, None, float("nan")])]
    out = score(funcs, ["p"] * 3, ["x", "y", "z"], [[1]] * 3, trainer_state=TrainerState(global_step=4))
    assert np.isnan(out.per_func[[0, 2]]).all() and out.per_func[1, 0] == 1.0
    err = capsys.readouterr().err
    assert "2 of the 3 completions sampled for step 5 got no reward" in err
    ok = RewardFunc("c", "r.py:c", lambda completions, **kw: [0.0] * len(completions))
    score([ok, funcs[1]], ["p"] * 3, ["x", "y", "z"], [[1]] * 3)
    assert capsys.readouterr().err == ""


def test_the_start_line_counts_skipped_and_truncated_prompts():
    from types import SimpleNamespace

    from jaxpref.data.prompts import Prompts
    from jaxpref.training.online_loop import OnlineRun

    data = Prompts([[1]], ["p"], {}, skipped={"empty prompt": 2, "prompt is null": 1}, truncated=1)
    run = SimpleNamespace(data=data, cfg=SimpleNamespace(training=SimpleNamespace(max_prompt_length=8)))
    assert OnlineRun._rows_note(run) == (" (3 rows skipped: empty prompt 2, prompt is null 1; 1 prompts truncated "
                                         "to max_prompt_length 8)")
    assert OnlineRun._rows_note(SimpleNamespace(data=Prompts([[1]], ["p"], {}), cfg=run.cfg)) == ""


@pytest.mark.parametrize("flag", ["--resume", "--resume-force"])
def test_resume_refuses_a_run_folder_of_another_method(tmp_path, capsys, flag):
    """A grpo run's folder continued as ppo (or any other method) is refused in one line, before
    anything is loaded or written; the folder is left as it was."""
    import yaml

    from jaxpref import train

    cfg = _online_config(tmp_path, {"method": "ppo", "num_generations": None, "beta": None})
    run = tmp_path / "out" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"post_training": {"method": "grpo"}}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "out"), flag])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("jaxpref: error") == 1 and "Traceback" not in err, err
    assert f"{run} holds a grpo run, not ppo (`post_training.method`)" in err and "--overwrite-output-dir" in err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before


def test_bad_prompt_rows_are_counted_skips_and_no_usable_prompt_is_one_line(tmp_path):
    from datasets import Dataset

    from conftest import make_tokenizer
    from jaxpref.config.schema import DatasetConfig
    from jaxpref.data.prompts import prepare_prompts
    from jaxpref.errors import DataError

    tok = make_tokenizer(tmp_path / "tok")
    ds_cfg = DatasetConfig(name="p.jsonl")
    rows = ["is the sun hot ?", "", "  ", None, "what is one and one ? " * 4]
    out = prepare_prompts(Dataset.from_dict({"prompt": rows, "answer": list("abcde")}), ds_cfg, tok, 8)
    assert len(out) == 2 and out.columns["answer"] == ["a", "e"] and out.truncated == 1
    assert out.skipped == {"empty prompt": 2, "prompt is null": 1} and len(out.prompt_ids[1]) == 8
    bad = Dataset.from_dict({"prompt": [[{"role": "user"}], [{"role": "assistant"}]]})
    with pytest.raises(DataError, match=r"^dataset `p.jsonl`: no usable prompt \(prompt is not a list of "
                                        r"\{role, content\} messages: 2\)$"):
        prepare_prompts(bad, ds_cfg, tok)
    with pytest.raises(DataError, match="missing column `prompt` .*columns present: question"):
        prepare_prompts(Dataset.from_dict({"question": ["q"]}), ds_cfg, tok)


def test_a_logged_row_aggregates_its_steps_as_grpotrainer_logs_them(tmp_path, tiny_llama):
    """GRPOTrainer.train logging every step, then every third (num_iterations 2: step 2 reuses
    step 1's rollout): jaxpref's rows of those steps (each step's own metrics, the rollout's with
    the step that sampled it; step 1 logged too, as a preview) are TRL's: losses and rollout
    metrics averaged over the window, grad_norm and learning_rate of its last step, num_tokens
    the latest."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from jaxpref.training.online_loop import LATEST, OnlineRun
    from jaxpref.training.window import MetricWindow
    from online_fixtures import PROMPTS

    def window_of(steps):
        w = MetricWindow(latest=LATEST, skip_nan=True)
        for m in steps:
            w.add(m)
        return w

    def share(completions, **kw):
        return [float(len(c) % 3) for c in completions]

    logged = {}
    for every in (1, 3):
        args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=4, learning_rate=1e-2, num_iterations=2, logging_steps=every,
                          max_steps=3, report_to=[], use_cpu=True, save_strategy="no")
        tr = GRPOTrainer(model=str(tiny_llama), reward_funcs=[share], args=args,
                         train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
        tr.train()
        logged[every] = [h for h in tr.state.log_history if "loss" in h]
    steps = logged[1]
    assert [h["step"] for h in steps] == [1, 2, 3] and [h["step"] for h in logged[3]] == [3]
    assert "reward" not in steps[1]
    drop = ("step", "epoch", "step_time")
    window = [{k: v for k, v in h.items() if k not in drop} for h in steps]
    rows = []
    run = SimpleNamespace(window=window_of(window[:1]), SHOWN=("loss", "reward"), entry=SimpleNamespace(name="tiny"), total=3,
                          sinks=SimpleNamespace(log=rows.append),
                          cfg=SimpleNamespace(post_training=SimpleNamespace(method="grpo"),
                                              training=SimpleNamespace(logging_steps=3)))
    OnlineRun._log(run, 1, 1 / 12)
    for m in window[1:]:
        run.window.add(m)
    OnlineRun._log(run, 3, 0.25)
    for ours, theirs in zip(rows, (steps[0], logged[3][0])):
        assert set(ours) - {"step", "epoch"} == set(theirs) - set(drop)
        for k in set(ours) - {"step", "epoch"}:
            assert ours[k] == pytest.approx(theirs[k], rel=1e-6, abs=1e-9), (ours["step"], k)
    rows.clear()
    # NaN (a reward function that scored nothing, ...) is left out of the mean; NaN throughout logs null.
    nan = float("nan")
    tr._metrics["train"] = {"reward": [nan, 0.5, 1.5], "rewards/share/mean": [nan, nan, nan]}
    tr.log({})
    run.window = window_of([{"reward": nan, "rewards/share/mean": nan}, {"reward": 0.5, "rewards/share/mean": nan},
                            {"reward": 1.5, "rewards/share/mean": nan}])
    OnlineRun._log(run, 3, 0.5)
    theirs = tr.state.log_history[-1]
    assert theirs["rewards/share/mean"] is None and theirs["reward"] == 1.0
    assert {k: rows[0][k] for k in ("reward", "rewards/share/mean")} == {"reward": 1.0, "rewards/share/mean": None}


@pytest.mark.parametrize("value", [True, False, "batch"])
def test_scale_rewards_takes_what_grpoconfig_takes(tmp_path, value):
    """GRPOConfig reads true as `group` and false as `none` (its __post_init__); so does the config."""
    import warnings

    from trl import GRPOConfig

    from jaxpref.config import load_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = GRPOConfig(output_dir=str(tmp_path), scale_rewards=value, report_to=[], use_cpu=True).scale_rewards
    assert load_config(_online_config(tmp_path, {"scale_rewards": value})).post_training.scale_rewards == want
