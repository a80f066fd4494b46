"""`--dry-run` of an online method: the plan of the run printed (the online loop's sizes), bad
input as one line, nothing trained or written."""
from __future__ import annotations

import pytest

from conftest import write_config
from jaxpref import train
from online_fixtures import online_setup, ppo_setup  # noqa: F401  (the fixtures)


def dry(tmp_path, d, capsys, **training):
    pt = {"method": "rloo", "reward_funcs": ["rewards.py:digit_share", "rewards.py:wants_answer"],
          "num_generations": 2, "max_completion_length": 6, "num_iterations": 2}
    tr = {"max_steps": 5, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, **training}
    cfg = write_config(d / "dry.yaml", d / "model", d / "prompts.jsonl", post_training=pt, training=tr,
                       finetuning={"save_steps": 2, "save_total_limit": 3})
    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "out"), "--dry-run"])
    out, err = capsys.readouterr()
    assert not (tmp_path / "out").exists()
    return code, out, err


def test_online_dry_run_prints_the_plan(tmp_path, online_setup, capsys):  # noqa: F811
    code, out, err = dry(tmp_path, online_setup, capsys)
    assert code == 0 and "dry run OK" in out, err
    assert "6 rows in, 6 usable, 0 skipped" in out
    # 8 completions a generation = 4 prompts x 2; one generation an epoch of 6 prompts; 5 steps of
    # 2 per rollout: 3 generations.
    assert "4 prompts x 2 completions = 8 completions" in out and "2 step(s) of 2 micro-batch(es) of 4" in out
    assert "1 generations/epoch, 3 generations, 5 steps, 2 prompts/epoch left over" in out
    assert "after every 2 steps and at the end, newest 3 kept" in out
    assert "training step [accum, rows, tokens, completion slots] [2, 4, " in out and "memory plan" in out
    # What the training step's attention, recompute and fp32 products will be, as the offline dry run says.
    assert "attention        training step xla (training.attention auto); recompute_activations True; fp32 " \
           "matmuls highest; the generation attends through its KV cache" in out


def test_online_dry_run_says_the_attention_recompute_and_precision_set(tmp_path, online_setup, capsys):  # noqa: F811
    code, out, err = dry(tmp_path, online_setup, capsys, attention="xla_chunked", recompute_activations=False,
                         matmul_precision="tf32")
    assert code == 0, err
    assert "training step xla_chunked (training.attention xla_chunked); recompute_activations False; fp32 " \
           "matmuls fp32 (matmul_precision tf32: a CPU has no TF32 products)" in out


@pytest.mark.parametrize("limit, recompute", [(80 << 30, False), (1 << 10, True)])
def test_online_recompute_auto_follows_the_memory_plan_on_an_accelerator(tmp_path, online_setup, capsys,  # noqa: F811
                                                                         monkeypatch, limit, recompute):
    """`recompute_activations: auto` on an accelerator: activations stored when the training step's
    memory plan fits the device, as the offline loop decides (the online loop always recomputed);
    the dry run and the run's model agree."""
    import jax

    from jaxpref.config import load_config
    from jaxpref.training.online_loop import OnlineRun

    device = type("Device", (), {"memory_stats": lambda self: {"bytes_limit": limit}})()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [device])
    code, out, err = dry(tmp_path, online_setup, capsys)
    assert code == 0, err
    assert f"recompute_activations {recompute};" in next(l for l in out.splitlines() if "attention   " in l)
    run = OnlineRun.__new__(OnlineRun)
    run._open(load_config(online_setup / "dry.yaml"), 0, tmp_path / "run")   # settings and model, no weights
    assert run.bundle.args.recompute_activations is recompute


@pytest.mark.parametrize("training, needle", [
    ({"gradient_accumulation_steps": 8}, "prompts are fewer than one generation's 16"),
    ({"per_device_train_batch_size": 3, "gradient_accumulation_steps": 1}, "not a multiple"),
    # Keys of the offline pairs' layout, which the online loop never read: refused, not ignored.
    ({"pair_layout": "packed"}, "`training.pair_layout` lays out the offline methods' pairs; rloo lays out"),
    ({"padding_free": False}, "`training.padding_free` lays out"),
    ({"length_buckets": [64]}, "`training.length_buckets` lays out"),
])
def test_online_dry_run_bad_input_is_one_line(tmp_path, online_setup, capsys, training, needle):  # noqa: F811
    code, out, err = dry(tmp_path, online_setup, capsys, **training)
    lines = [l for l in err.splitlines() if l.startswith("jaxpref: error")]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert "dry run OK" not in out


def test_ppo_dry_run_prints_its_plan_and_writes_nothing(tmp_path, ppo_setup, tiny_llama, capsys):  # noqa: F811
    from test_ppo_train import _config

    cfg = _config(ppo_setup, tiny_llama, {}, {"max_steps": 3})
    before = sorted(p.name for p in ppo_setup.iterdir())
    args = ["--config", str(cfg), "--output-dir", str(tmp_path / "out"), "--dry-run"]
    code = train.main(args + ["--set", "finetuning.save_steps=2"])
    out, err = capsys.readouterr()
    assert code == 0 and "dry run OK" in out, err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in ppo_setup.iterdir()) == before
    assert "prompts          format standard, 6 rows in, 6 usable, 0 skipped" in out
    # 2 rows x 2 micro-batches = 4 prompts a rollout batch, one an epoch of 6; each update 2 epochs
    # x 2 mini-batches of one micro-batch.
    assert "rollout batch    4 prompts x 1 completion (response_length 6, temperature 1, stop_token eos)" in out
    assert ("update           num_ppo_epochs 2 x num_mini_batches 2 = 4 optimizer steps per rollout batch, "
            "each of 1 micro-batch(es) of 2") in out
    assert "value head       linear [hidden 64 -> 1]" in out
    assert "1 rollout batches/epoch, 3 rollout batches, 3 steps, 2 prompts/epoch left over" in out
    assert "checkpoints      every 2 steps and at the end" in out
    assert "training step [accum, rows, tokens, completion slots] [1, 2, " in out
    # PPO's size rules, as the run applies them: one line, nothing planned.
    code = train.main(args + ["--set", "post_training.num_mini_batches=3"])
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.startswith("jaxpref: error")]
    assert code == 2 and len(lines) == 1 and "`post_training.num_mini_batches` 3" in lines[0], err
    assert "dry run OK" not in out and not (tmp_path / "out").exists()


def test_online_dpo_dry_run_plans_two_completions_a_prompt(tmp_path, online_setup, capsys):  # noqa: F811
    from test_online_dpo_train import _config

    code = train.main(["--config", str(_config(online_setup, "dry")), "--output-dir", str(tmp_path / "out"),
                       "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0 and "dry run OK" in out and not (tmp_path / "out").exists(), err
    assert "generation       4 prompts x 2 completions = 8 completions (max_new_tokens 6" in out
    assert "1 generations/epoch, 2 generations, 2 steps" in out
