"""Checkpoints and --resume of an online run (GRPO, online DPO, PPO): a run stopped at a checkpoint
and resumed writes the same metrics.jsonl and samples.jsonl rows and the same adapter (PPO: and
value head) as one that ran through; changed settings and impossible continuations are one-line
errors; a fresh run deletes nothing."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import write_config
from jaxpref import train
from online_fixtures import online_setup, ppo_setup  # noqa: F401  (the fixtures)


def rows(path):
    """The file's rows without the timings (the only numbers allowed to differ: time/*, and PPO's
    completions per second, eps)."""
    out = [json.loads(l) for l in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "eps"} for r in out]


def adapter(run, name="adapter/adapter_model.safetensors"):
    return load_file(str(run / name))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def steps_on_disk(run):
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def stopped_copy(run, to, step: int):
    """`run` copied to `to` as a run stopped after its checkpoint `step` leaves it: the later
    checkpoints, the outputs and the FINISHED marker gone, the rows logged after `step` kept."""
    shutil.copytree(run, to)
    for s in steps_on_disk(to):
        if s > step:
            shutil.rmtree(to / "checkpoints" / str(s))
    shutil.rmtree(to / "adapter")
    (to / "FINISHED").unlink()
    (to / "value_head.safetensors").unlink(missing_ok=True)
    return to


def config(d, **training):
    # 4 prompts x 2 completions per generation (one generation per epoch of 6 prompts), each
    # rollout used for 2 steps; dropout (the RNG) and the KL term (the reference pass) on.
    pt = {"method": "grpo", "reward_funcs": ["rewards.py:digit_share", "rewards.py:wants_answer"],
          "num_generations": 2, "max_completion_length": 6, "beta": 0.04, "num_iterations": 2}
    tr = {"max_steps": 5, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
          "learning_rate": 1.0e-2, "logging_steps": 3, "seed": 0, "max_prompt_length": 32, **training}
    return write_config(d / "resume.yaml", d / "model", d / "prompts.jsonl", post_training=pt, training=tr,
                        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1},
                        finetuning={"save_steps": 1})


def cli(capsys, cfg, out, *extra):
    code = train.main(["--config", str(cfg), "--output-dir", str(out), *extra])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_online_run_resumes_exactly(tmp_path, online_setup, capsys):  # noqa: F811
    cfg = config(online_setup)
    code, err = cli(capsys, cfg, tmp_path / "a")
    assert code == 0, err
    straight = tmp_path / "a" / "tiny"
    # Checkpoints at the generation boundaries (steps 2, 4) and at the end (5, inside a generation).
    assert steps_on_disk(straight) == [2, 4, 5]
    assert [r["step"] for r in rows(straight / "metrics.jsonl")] == [1, 3, 5]
    assert sorted({r["step"] for r in rows(straight / "samples.jsonl")}) == [0, 2, 4]

    # Stopped after step 2 (its later checkpoints, adapter and marker gone; the rows it had
    # logged after step 2 still in the files): resumed, the same rows once each and the same adapter.
    resumed = stopped_copy(straight, tmp_path / "b" / "tiny", 2)
    code, err = cli(capsys, cfg, tmp_path / "b", "--resume")
    assert code == 0 and "resuming from step 2" in err, err
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert rows(resumed / name) == rows(straight / name), name
    a = adapter(straight)
    assert_same_tensors(a, adapter(resumed))
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 2

    # A finished run is skipped; one that stopped after its final checkpoint goes to the finishing work.
    code, err = cli(capsys, cfg, tmp_path / "b", "--resume")
    assert code == 0 and "already finished" in err
    shutil.rmtree(resumed / "adapter")
    (resumed / "FINISHED").unlink()
    code, err = cli(capsys, cfg, tmp_path / "b", "--resume")
    assert code == 0 and "resuming from step 5" in err, err
    assert rows(resumed / "metrics.jsonl") == rows(straight / "metrics.jsonl")
    for k, v in adapter(resumed).items():
        np.testing.assert_array_equal(a[k], v)

    # Step 5 was saved inside a generation: it cannot go on to more steps (one line); from step 4 it can.
    before = steps_on_disk(straight)
    code, err = cli(capsys, cfg, tmp_path / "a", "--resume", "--max-steps", "7")
    assert code == 2 and "inside a generation" in err and "--resume-from" in err, err
    assert len([l for l in err.splitlines() if l.startswith("jaxpref: error")]) == 1 and "Traceback" not in err
    assert steps_on_disk(straight) == before

    # Changed settings are named before any state is read; nothing is set aside.
    for change, key in [("post_training.num_generations=4", "post_training.num_generations"),
                        ("post_training.temperature=0.5", "post_training.temperature"),
                        ("training.learning_rate=0.5", "learning_rate")]:
        code, err = cli(capsys, cfg, tmp_path / "a", "--resume-from", "4", "--set", change)
        assert code == 2 and f"`{key}` changed" in err and "--resume-force" in err, err
        assert steps_on_disk(straight) == before
    # So is an edited reward function file (its rewards would differ from the checkpoint's run's).
    rewards = online_setup / "rewards.py"
    kept = rewards.read_text()
    try:
        rewards.write_text(kept + "\n# edited\n")
        code, err = cli(capsys, cfg, tmp_path / "a", "--resume-from", "4")
        assert code == 2 and "`reward function file rewards.py` changed" in err, err
    finally:
        rewards.write_text(kept)
    assert steps_on_disk(straight) == before


def method_config(method: str, request):
    """PPO's and online DPO's CLI test configs (test_ppo_train, test_online_dpo_train): 6 prompts,
    4 a rollout batch / generation (one an epoch, reshuffled each), run for `STEPS` with a
    checkpoint every step; PPO with 2 epochs x 2 mini-batches an update."""
    if method == "ppo":
        from test_ppo_train import _config
        return _config(request.getfixturevalue("ppo_setup"), request.getfixturevalue("tiny_llama"))
    from test_online_dpo_train import _config
    return _config(request.getfixturevalue("online_setup"), "resume")


STEPS = ("--max-steps", "4", "--set", "training.logging_steps=3", "--set", "finetuning.save_steps=1")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo", "online_dpo"])
def test_stopped_and_resumed_equals_a_straight_run(tmp_path, request, capsys, method):
    cfg = method_config(method, request)
    code, err = cli(capsys, cfg, tmp_path / "a", *STEPS)
    assert code == 0, err
    straight = tmp_path / "a" / "tiny"
    assert steps_on_disk(straight) == [1, 2, 3, 4]
    assert [r["step"] for r in rows(straight / "metrics.jsonl")] == [1, 3, 4]
    assert sorted({r["step"] for r in rows(straight / "samples.jsonl")}) == [0, 1, 2, 3]
    # Stopped after step 2 (the rows of steps 3 and 4 still in the files, the window of step 2's
    # metrics in the checkpoint: step 3's row averages steps 2 and 3).
    resumed = stopped_copy(straight, tmp_path / "b" / "tiny", 2)
    code, err = cli(capsys, cfg, tmp_path / "b", "--resume", *STEPS)
    assert code == 0 and "resuming from step 2" in err, err
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert rows(resumed / name) == rows(straight / name), name
    assert_same_tensors(adapter(straight), adapter(resumed))
    if method == "ppo":
        head = adapter(straight, "value_head.safetensors")
        assert np.abs(head["score.weight"]).max() > 0
        assert_same_tensors(head, adapter(resumed, "value_head.safetensors"))
        assert rows(resumed / "metrics.jsonl")[-1]["episode"] == 16
    # A changed setting of the method is named before any state is read; nothing is set aside.
    key = "post_training.num_ppo_epochs" if method == "ppo" else "post_training.max_new_tokens"
    code, err = cli(capsys, cfg, tmp_path / "b", "--resume-from", "2", *STEPS, "--set", f"{key}=3")
    assert code == 2 and f"`{key}` changed" in err and "--resume-force" in err, err
    assert steps_on_disk(resumed) == [1, 2, 3, 4]


@pytest.mark.slow
def test_online_resume_without_a_checkpoint_is_one_line(tmp_path, online_setup, capsys):  # noqa: F811
    cfg = config(online_setup, max_steps=2)
    code, err = cli(capsys, cfg, tmp_path / "o", "--set", "finetuning.save_steps=null")
    assert code == 0, err
    run = tmp_path / "o" / "tiny"
    assert not (run / "checkpoints").exists() and (run / "FINISHED").is_file()
    kept = {n: (run / n).read_bytes() for n in ("metrics.jsonl", "samples.jsonl")}
    code, err = cli(capsys, cfg, tmp_path / "o", "--resume", "--max-steps", "4", "--set", "finetuning.save_steps=null")
    lines = [l for l in err.splitlines() if l.startswith("jaxpref: error")]
    assert code == 2 and len(lines) == 1 and "without a checkpoint" in lines[0] and "Traceback" not in err, err
    assert {n: (run / n).read_bytes() for n in kept} == kept   # the refused resume changed nothing
    # Started again without --resume: refused, naming both flags; the run's files are kept.
    code, err = cli(capsys, cfg, tmp_path / "o")
    assert code == 2 and "--resume" in err and "--overwrite-output-dir" in err
    assert {n: (run / n).read_bytes() for n in kept} == kept


def test_a_fresh_run_keeps_set_aside_checkpoints_and_refuses_steps(tmp_path):
    from jaxpref.errors import JaxprefError
    from jaxpref.training import checkpoint as ckpt
    from jaxpref.training.rundir import claim_run_dir

    run = tmp_path / "run"
    aside = run / "checkpoints" / "set-aside-after-2-100" / "4"
    aside.mkdir(parents=True)
    (aside / "x").write_text("kept")
    (run / "notes.txt").write_text("mine")
    claim_run_dir(run, resume=False, overwrite=False).release()   # no step: not a previous run
    ckpt.clear_run(run)
    assert (aside / "x").read_text() == "kept" and (run / "notes.txt").read_text() == "mine"
    (run / "checkpoints" / "3").mkdir()
    with pytest.raises(JaxprefError, match="step 3.*--resume.*--overwrite-output-dir"):
        ckpt.clear_run(run)
    assert (run / "checkpoints" / "3").is_dir()


def test_a_previous_runs_samples_count_as_its_outputs(tmp_path):
    from jaxpref.errors import ConfigError
    from jaxpref.training.rundir import claim_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "samples.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ConfigError, match="samples.jsonl.*--overwrite-output-dir"):
        claim_run_dir(run, resume=False, overwrite=False)
    assert (run / "samples.jsonl").read_text() == '{"step": 0}\n'


def test_samples_rows_of_later_generations_are_dropped(tmp_path):
    from jaxpref.training.online_resume import due, truncate_samples

    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps({"step": s, "i": i}) + "\n" for s in (0, 2, 4) for i in range(2)) + '{"step": 4, "cu')
    truncate_samples(f, 4)
    assert [json.loads(l) for l in f.read_text().splitlines()] == [{"step": s, "i": i} for s in (0, 2) for i in range(2)]
    # save_steps 3 with two steps a generation: saved at the boundaries 4 (passes 3) and 6 (is 6), not 2.
    assert [after for after in (2, 4, 6, 8) if due(3, after - 2, after)] == [4, 6]
    assert not due(None, 0, 2)


def test_prompt_batches_continue_from_a_generation():
    from jaxpref.training.online_loop import OnlineRun

    run = SimpleNamespace(cfg=SimpleNamespace(training=SimpleNamespace(seed=3)), data=[0] * 7,
                          steps_per_epoch=3, per_gen=2)
    it = OnlineRun._prompt_batches(run)
    straight = [next(it) for _ in range(8)]
    assert [e for e, _ in straight[:4]] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert straight[3][1] != straight[0][1]          # epoch 1 is shuffled anew
    for g in (1, 3, 5):
        it = OnlineRun._prompt_batches(run, g)
        assert [next(it) for _ in range(8 - g)] == straight[g:]


@pytest.mark.slow
def test_online_sigkill_then_resume_matches_uninterrupted(tmp_path, online_setup):  # noqa: F811
    """A GRPO run killed with SIGKILL at a random moment (checkpoint every step) resumes to the
    same losses and adapter (scripts/kill_resume.py repeats this many times)."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    from kill_resume import kill_and_resume

    cfg = config(online_setup, max_steps=6)
    text = cfg.read_text().replace("num_iterations: 2", "num_iterations: 1")
    assert text != cfg.read_text()
    cfg.write_text(text)
    result = kill_and_resume(cfg, tmp_path, seed=1, tries=1)
    assert result["identical"] == result["tries"] == 1


@pytest.mark.slow
def test_online_ctrl_c_saves_a_checkpoint_and_resumes_exactly(tmp_path, online_setup):  # noqa: F811
    """Ctrl-C stops after the generation under way with a checkpoint there (exit 130); --resume then
    ends with the rows and adapter of an uninterrupted run."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    from kill_resume import _train
    from test_resume import _interrupt

    cfg = config(online_setup, max_steps=40, logging_steps=1)
    cfg.write_text(cfg.read_text().replace("save_steps: 1", "save_steps: 1000"))
    _train(cfg, tmp_path / "straight")
    code, err, saved = _interrupt(cfg, tmp_path / "stopped", after_rows=3)
    assert code == 130, err[-2000:]
    assert len(saved) == 1 and 3 <= saved[0] < 40 and saved[0] % 2 == 0, saved   # a generation boundary
    assert "stopping after this generation" in err and f"interrupted: saved a checkpoint at step {saved[0]}" in err
    _train(cfg, tmp_path / "stopped", "--resume")
    run, ref = tmp_path / "stopped" / "tiny", tmp_path / "straight" / "tiny"
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert rows(run / name) == rows(ref / name), name
    a, b = adapter(ref), adapter(run)
    assert all(np.array_equal(a[k], b[k]) for k in a)
