"""Checkpoints and --resume: exact continuation, broken checkpoints, finished models, crashes."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, write_config
from jaxpref import train


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["rewards/margins"], r["grad_norm"]) for r in rows if "loss" in r]


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def cfg_for(tmp_path, tiny_llama, tiny_pairs, logging_steps: int = 1, **extra):
    return write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                        training={"max_steps": 6, "logging_steps": logging_steps, "learning_rate": 5e-3,
                                  "warmup_steps": 2, "per_device_train_batch_size": 2},
                        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                              "lora_dropout": 0.1},
                        post_training={"method": "dpo", "beta": 0.1, "disable_dropout": False},
                        finetuning={"save_steps": 3}, **extra)


def forget_after(run: Path, step: int) -> None:
    """Leave the run as a stop after `step` would: later checkpoints, adapter and marker gone."""
    for d in (run / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > step:
            shutil.rmtree(d)
    shutil.rmtree(run / "adapter")
    (run / "FINISHED").unlink()


def test_resume_is_exact(tmp_path, tiny_llama, tiny_pairs, capsys):
    """Stopped after step 3 and resumed = the straight run. Rows every 2 steps: the checkpoint at
    step 3 is inside the window that the row at step 4 averages (steps 3 and 4)."""
    cfg = cfg_for(tmp_path, tiny_llama, tiny_pairs, logging_steps=2)
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a")]) == 0
    straight = tmp_path / "a" / "tiny"
    assert sorted(int(d.name) for d in (straight / "checkpoints").iterdir() if d.name.isdigit()) == [3, 6]
    shutil.copytree(straight, tmp_path / "b" / "tiny")
    resumed = tmp_path / "b" / "tiny"
    forget_after(resumed, 3)
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "b"), "--resume"]) == 0
    assert "resuming from step 3" in capsys.readouterr().err
    assert [r[0] for r in losses(straight)] == [1, 2, 4, 6]
    assert losses(resumed) == losses(straight)  # bit for bit, dropout RNG and data order included
    a, b = adapter(straight), adapter(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # A finished model is skipped by --resume.
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "b"), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().err


def test_truncated_latest_checkpoint_is_skipped(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = cfg_for(tmp_path, tiny_llama, tiny_pairs)
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a")]) == 0
    run = tmp_path / "a" / "tiny"
    straight = losses(run)
    (run / "FINISHED").unlink()
    # Corrupt checkpoint 6: truncate every data file in it.
    for f in (run / "checkpoints" / "6").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "unreadable" in err and "6" in err and "resuming from step 3" in err
    assert losses(run) == straight


def test_resume_with_changed_config_names_the_difference(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = cfg_for(tmp_path, tiny_llama, tiny_pairs)
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a")]) == 0
    forget_after(tmp_path / "a" / "tiny", 3)
    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--resume",
                       "--set", "post_training.beta=0.3"])
    err = capsys.readouterr().err
    assert code == 2 and "beta" in err and "--resume-force" in err
    # Settings that change the saved state's shapes (LoRA rank, optimizer) or the updates (learning
    # rate) are named too, before any state is read: the checkpoints stay where they are.
    ckpts = lambda: sorted(d.name for d in (tmp_path / "a" / "tiny" / "checkpoints").iterdir())
    before = ckpts()
    for change, key in [("lora.r=8", "lora.r"), ("training.optimizer=sgd", "optimizer"),
                        ("training.learning_rate=0.5", "learning_rate")]:
        code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--resume", "--set", change])
        err = capsys.readouterr().err
        assert code == 2 and f"`{key}` changed" in err, err
        assert ckpts() == before
    # Forced, a state that cannot fit is an error, and nothing is set aside.
    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--resume-force",
                       "--set", "lora.r=8"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the current settings" in err and "unreadable" not in err
    assert ckpts() == before
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--resume-force",
                       "--set", "post_training.beta=0.3"]) == 0


def test_resume_refuses_a_change_of_the_dropout_masks_or_tf32(tmp_path, tiny_llama, tiny_pairs, capsys):
    # With LoRA dropout, the batch's shapes and the layer loop draw the dropout masks: changing the
    # padding, the token budget's cuts or scan_layers changes the numbers; so do TF32 products
    # (fp32 compute) and the dropout rate itself. Each is one line naming the key.
    cfg = cfg_for(tmp_path, tiny_llama, tiny_pairs)
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a")]) == 0
    forget_after(tmp_path / "a" / "tiny", 3)
    capsys.readouterr()
    for change, key in [("training.scan_layers=false", "scan_layers"), ("training.padding_free=false", "padding_free"),
                        ("training.max_tokens_per_batch=400", "max_tokens_per_batch"),
                        ("training.matmul_precision=tf32", "matmul_precision"),
                        ("lora.lora_dropout=0.2", "lora.lora_dropout")]:
        code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--resume", "--set", change])
        err = capsys.readouterr().err
        line = next(l for l in err.splitlines() if "changed" in l)
        assert code == 2 and f"`{key}` changed" in line and "--resume-force" in line and "Traceback" not in err, err
    # The dry run says what --resume would do: the same refusal, the checkpoint it continues from.
    listing = lambda: sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "a").rglob("*"))
    before = listing()
    dry = lambda *a: (train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--dry-run", *a]),
                      capsys.readouterr())
    code, (out, err) = dry("--resume", "--set", "training.scan_layers=false")
    lines = [l for l in err.splitlines() if l.startswith("jaxpref: error")]
    assert code == 2 and len(lines) == 1 and "`scan_layers` changed" in lines[0] and "dry run OK" not in out, err
    code, (out, err) = dry("--resume-force", "--set", "training.scan_layers=false")
    assert code == 0 and "resume           from step 3 of " in out and "(--resume-force: `scan_layers` changed)" in out
    code, (out, err) = dry("--resume", "--set", "training.attention=xla_chunked")
    assert code == 0 and "from step 3 of " in out and "(its critical settings unchanged)" in out, err
    code, (out, err) = dry("--resume-from", "6")
    assert code == 2 and "--resume-from 6: no checkpoint of step 6" in err and "(kept: 3)" in err
    assert listing() == before   # the dry run wrote nothing


def test_resume_with_the_speed_settings_changed_continues_the_run(tmp_path, tiny_llama, tiny_pairs, capsys):
    # Without dropout, the attention backend, recompute, vocab_chunk, scan_layers and the token
    # budget's cuts change no number beyond float rounding: a resume with all of them changed
    # continues the same run.
    cfg = write_config(tmp_path / "c0.yaml", tiny_llama, tiny_pairs,
                       training={"max_steps": 6, "logging_steps": 1, "learning_rate": 5e-3,
                                 "warmup_steps": 2, "per_device_train_batch_size": 2},
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                       finetuning={"save_steps": 3})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "s")]) == 0
    shutil.copytree(tmp_path / "s" / "tiny", tmp_path / "r" / "tiny")
    forget_after(tmp_path / "r" / "tiny", 3)
    capsys.readouterr()
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "r"), "--resume",
                       "--set", "training.attention=xla_chunked", "--set", "training.recompute_activations=false",
                       "--set", "training.vocab_chunk=16", "--set", "training.scan_layers=false",
                       "--set", "training.max_tokens_per_batch=400"]) == 0
    assert "resuming from step 3" in capsys.readouterr().err
    straight, resumed = losses(tmp_path / "s" / "tiny"), losses(tmp_path / "r" / "tiny")
    assert [r[0] for r in resumed] == [r[0] for r in straight]
    np.testing.assert_allclose([r[1:] for r in resumed], [r[1:] for r in straight], rtol=1e-5, atol=1e-6)


def test_multi_model_resume_skips_finished_and_finishes_the_rest(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = cfg_for(tmp_path, tiny_llama, tiny_pairs,
                  models=[{"name": "first", "huggingface_id": str(tiny_llama)},
                          {"name": "second", "huggingface_id": str(tiny_llama)}])
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 0
    forget_after(tmp_path / "o" / "second", 3)   # as if the second model was killed after step 3
    capsys.readouterr()
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "[first] already finished" in err and "[second] resuming from step 3" in err
    assert (tmp_path / "o" / "second" / "FINISHED").is_file()


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_llama, tiny_pairs):
    """A run killed with SIGKILL at a random moment resumes to the same losses (see also
    scripts/kill_resume.py, which repeats this many times)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from kill_resume import kill_and_resume
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       training={"max_steps": 12, "logging_steps": 1, "learning_rate": 5e-3,
                                 "per_device_train_batch_size": 2},
                       finetuning={"save_steps": 2})
    result = kill_and_resume(cfg, tmp_path, seed=0, tries=1)
    assert result["identical"] == result["tries"] == 1


def _interrupt(cfg: Path, out: Path, after_rows: int = 5):
    """Start a run, send SIGINT to its process group (as a terminal's Ctrl-C does) once it has
    logged `after_rows` steps; -> (exit code, stderr, saved checkpoint steps)."""
    import os
    import signal
    import time

    from kill_resume import _train
    proc = _train(cfg, out, wait=False)
    metrics = out / "tiny" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= after_rows:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    saved = sorted(int(d.name) for d in (out / "tiny" / "checkpoints").iterdir() if d.name.isdigit())
    return proc.returncode, err, saved


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_uninterrupted(tmp_path, tiny_llama, tiny_pairs):
    """Ctrl-C in the middle of training saves a checkpoint at the last finished step, exits 130, and
    --resume then ends with the losses and adapter of an uninterrupted run. When that step had just
    saved a checkpoint itself, it is not saved twice."""
    sys.path.insert(0, str(REPO / "scripts"))
    from kill_resume import _adapter, _losses, _train
    config = lambda name, save_steps: write_config(
        tmp_path / name, tiny_llama, tiny_pairs,
        training={"max_steps": 200, "logging_steps": 1, "learning_rate": 5e-3, "per_device_train_batch_size": 2},
        finetuning={"save_steps": save_steps})
    cfg = config("c.yaml", 1000)
    _train(cfg, tmp_path / "straight")
    code, err, saved = _interrupt(cfg, tmp_path / "stopped")
    assert code == 130, err[-2000:]
    assert len(saved) == 1 and 5 <= saved[0] < 200, saved
    assert f"interrupted: saved a checkpoint at step {saved[0]}" in err
    _train(cfg, tmp_path / "stopped", "--resume")
    run, ref = tmp_path / "stopped" / "tiny", tmp_path / "straight" / "tiny"
    assert _losses(run) == _losses(ref)
    a, b = _adapter(ref), _adapter(run)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # A checkpoint at every step: the interrupted step's own save is the one kept.
    code, err, saved = _interrupt(config("every.yaml", 1), tmp_path / "every")
    assert code == 130, err[-2000:]
    assert saved == list(range(1, saved[-1] + 1)) and saved[-1] >= 5, saved
    assert f"interrupted: saved a checkpoint at step {saved[-1]}" in err


def test_nan_loss_stops_with_the_step_named(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       training={"max_steps": 5, "learning_rate": 1e38, "max_grad_norm": 0.0,
                                 "logging_steps": 1}, post_training={"beta": 50.0})
    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "at step" in err and ("nan" in err or "inf" in err)


def test_early_stopping_exports_the_best_adapter(tmp_path, tiny_llama, tiny_pairs, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                       training={"max_steps": 10, "logging_steps": 1, "eval_steps": 2, "learning_rate": 5e-3,
                                 "per_device_eval_batch_size": 2},
                       # An improvement must beat a margin no run reaches: the first eval is the best.
                       finetuning={"early_stopping": {"metric": "eval_loss", "mode": "min", "patience": 2,
                                                      "min_delta": 1e9}})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "early stopping at step 6" in err and "best was step 2" in err
    summary = json.loads((tmp_path / "o" / "tiny" / "summary.json").read_text())
    assert summary["early_stopped"] and summary["adapter_from_step"] == 2 and summary["steps"] == 6
    assert (tmp_path / "o" / "tiny" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resume_keeps_early_stopping_and_the_best_adapter(tmp_path, tiny_llama, tiny_pairs, capsys):
    """The best evaluation's adapter travels in the checkpoints: a run killed after its final
    checkpoint but before its export, and one stopped between evaluations, both export the
    straight run's best adapter on --resume; the first trains no further step."""
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                       training={"max_steps": 10, "logging_steps": 1, "eval_steps": 2, "learning_rate": 5e-3,
                                 "per_device_eval_batch_size": 2},
                       finetuning={"save_steps": 2, "early_stopping": {"metric": "eval_loss", "mode": "min",
                                                                       "patience": 2, "min_delta": 1e9}})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a")]) == 0
    straight = tmp_path / "a" / "tiny"
    assert json.loads((straight / "summary.json").read_text())["adapter_from_step"] == 2
    for name, step in (("after_final_checkpoint", 6), ("between_evaluations", 4)):
        shutil.copytree(straight, tmp_path / name / "tiny")
        resumed = tmp_path / name / "tiny"
        forget_after(resumed, step)
        (resumed / "summary.json").unlink()
        capsys.readouterr()
        assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / name), "--resume"]) == 0
        err = capsys.readouterr().err
        assert f"resuming from step {step}" in err, err
        assert ("exporting its best adapter" in err) == (step == 6), err
        summary = json.loads((resumed / "summary.json").read_text())
        assert summary["early_stopped"] and summary["adapter_from_step"] == 2 and summary["steps"] == 6, summary
        assert losses(resumed) == losses(straight)
        a, b = adapter(straight), adapter(resumed)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_resume_from_a_kept_step_and_continue_a_finished_run(tmp_path, tiny_llama, tiny_pairs, capsys):
    """--resume-from STEP continues from any kept checkpoint (the later ones set aside, not
    deleted) and ends as the straight run did; raising --max-steps on a finished run continues it;
    a finished run that cannot be continued is refused in one line, never skipped with exit 0."""
    cfg = cfg_for(tmp_path, tiny_llama, tiny_pairs)
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a")]) == 0
    straight = tmp_path / "a" / "tiny"
    shutil.copytree(straight, tmp_path / "b" / "tiny")
    again = tmp_path / "b" / "tiny"
    capsys.readouterr()
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "b"), "--resume-from", "3"]) == 0
    err = capsys.readouterr().err
    assert "checkpoints 6 set aside" in err and "resuming from step 3" in err, err
    assert losses(again) == losses(straight)
    assert [p.name for p in (again / "checkpoints").glob("set-aside-after-3-*/*")] == ["6"]

    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "b"), "--resume-from", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no checkpoint of step 4" in err and "kept: 3, 6" in err, err

    # A finished run asked for more steps continues from its final checkpoint.
    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--resume", "--max-steps", "8"])
    err = capsys.readouterr().err
    assert code == 0 and "resuming from step 6 to 8 steps" in err and "skipping" not in err, err
    assert [s for s, *_ in losses(straight)] == list(range(1, 9))
    assert json.loads((straight / "summary.json").read_text())["steps"] == 8
    assert (straight / "FINISHED").is_file()
    # Fewer steps than its checkpoint: refused in one line.
    code = train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--resume", "--max-steps", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "past this run's 4 steps" in err, err

    # Finished without checkpoints: more steps cannot be had, and it says so (exit 2).
    plain = write_config(tmp_path / "plain.yaml", tiny_llama, tiny_pairs, training={"max_steps": 2})
    assert train.main(["--config", str(plain), "--output-dir", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert not (tmp_path / "c" / "tiny" / "checkpoints").exists()   # none made without save_steps
    code = train.main(["--config", str(plain), "--output-dir", str(tmp_path / "c"), "--resume", "--max-steps", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "finished without a checkpoint (finetuning.save_steps unset)" in err and "--overwrite-output-dir" in err
    # Unfinished without checkpoints (killed): --resume started afresh over its metrics and adapter.
    (tmp_path / "c" / "tiny" / "FINISHED").unlink()
    before = (tmp_path / "c" / "tiny" / "metrics.jsonl").read_bytes()
    code = train.main(["--config", str(plain), "--output-dir", str(tmp_path / "c"), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "holds a run (adapter/, summary.json, metrics.jsonl, metrics.png) but no checkpoint" in err, err
    assert "--overwrite-output-dir" in err and (tmp_path / "c" / "tiny" / "metrics.jsonl").read_bytes() == before
    # The dry run says the same (it said "no checkpoint: the run starts fresh").
    code = train.main(["--config", str(plain), "--output-dir", str(tmp_path / "c"), "--resume", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds a run (adapter/, summary.json, metrics.jsonl, metrics.png) but no checkpoint" in err, err
    # Nothing of a previous run there: --resume starts afresh, as it says.
    code = train.main(["--config", str(plain), "--output-dir", str(tmp_path / "d"), "--resume"])
    assert code == 0 and "no checkpoint to resume from; starting fresh" in capsys.readouterr().err


@pytest.mark.slow
def test_load_best_model_at_end_exports_the_best_evaluation_and_eval_strategy_no(tmp_path, tiny_llama, tiny_pairs):
    """TRL's load_best_model_at_end / metric_for_best_model / greater_is_better: the adapter is the
    state of the best evaluation (equal to a run stopped there), not the last step's;
    eval_strategy no: no evaluation although the config has an eval split."""
    def run(name: str, **training) -> Path:
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_llama, tiny_pairs,
                           dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                           training={"logging_steps": 1, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
                                     "per_device_eval_batch_size": 2, **training},
                           lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
        assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / name)]) == 0
        return tmp_path / name / "tiny"

    # The least eval loss (TRL's default direction for a loss) is an early evaluation here: the
    # tiny model overfits its 12 pairs.
    best_run = run("best", max_steps=6, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                   metric_for_best_model="loss")
    evals = [json.loads(l) for l in (best_run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r]
    assert [s for s, _ in evals] == [2, 4, 6]
    best = min(evals, key=lambda e: e[1])[0]
    assert best != 6, evals
    summary = json.loads((best_run / "summary.json").read_text())
    assert summary["adapter_from_step"] == best and summary["steps"] == 6
    stopped = run("stopped", max_steps=best, eval_strategy="no")
    rows = [json.loads(l) for l in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("eval_") for r in rows for k in r)
    assert json.loads((stopped / "summary.json").read_text())["final_eval"] is None
    # The same state up to float reordering (two compiled programs, amplified by Adam's
    # normalisation): each of the 4 later steps of Adam at lr 5e-3 moves a weight by up to 5e-3.
    a, b = adapter(best_run), adapter(stopped)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5)


def test_eval_strategy_picks_the_evaluation_steps():
    from types import SimpleNamespace as NS

    from jaxpref.training.loop import eval_every

    cfg = lambda **tr: NS(training=NS(**{"eval_strategy": None, "eval_steps": None, "logging_steps": 5, **tr}))
    assert eval_every(cfg(), 7) is None                                  # only the final evaluation
    assert eval_every(cfg(eval_steps=3), 7) == 3
    assert eval_every(cfg(eval_strategy="steps"), 7) == 5                # TRL: eval_steps defaults to logging_steps
    assert eval_every(cfg(eval_strategy="epoch", eval_steps=3), 7) == 7  # once per epoch
    assert eval_every(cfg(eval_strategy="no", eval_steps=3), 7) is None


def test_a_best_value_of_another_metric_is_not_continued():
    """Resumed with `early_stopping.metric` (or `metric_for_best_model`, `greater_is_better`) changed,
    the checkpoint's best eval_loss 0.3 was taken as the best accuracy: with mode max, no accuracy
    below 0.3 counted as an improvement, and the old metric's adapter was exported as the best."""
    from jaxpref.config.schema import EarlyStoppingConfig
    from jaxpref.training.evaluation import EarlyStopping

    loss = EarlyStopping(EarlyStoppingConfig("eval_loss", "min", patience=2))
    loss.update({"eval_loss": 0.3}, 2)
    saved = json.loads(json.dumps(loss.state()))   # as the checkpoint's JSON record reads back
    acc = EarlyStopping(EarlyStoppingConfig("eval_rewards/accuracies", "max", patience=2))
    assert acc.restore(saved) is False and (acc.best, acc.best_step, acc.bad) == (None, None, 0)
    assert acc.update({"eval_rewards/accuracies": 0.25}, 4) == (True, False)
    same = EarlyStopping(EarlyStoppingConfig("eval_loss", "min", patience=2))
    assert same.restore(saved) is True and (same.best, same.best_step) == (0.3, 2)
    older = EarlyStopping(EarlyStoppingConfig("eval_loss", "min", patience=2))   # a record without the metric
    assert older.restore({"best": 0.5, "best_step": 1, "bad": 1}) is True and older.bad == 1


def test_dry_run_resume_of_a_finished_run_says_what_the_run_does(tmp_path, tiny_llama, tiny_pairs, capsys):
    """A finished run: --dry-run refuses its folder as the run does (without --resume or
    --overwrite-output-dir); with --resume it says the run is skipped; asked for more steps without
    a checkpoint, or for fewer than its checkpoint's step, it refuses as the run does."""
    def both(out, *flags):
        args = ["--config", str(cfg), "--output-dir", str(tmp_path / out), "--resume", *flags]
        dry = train.main([*args, "--dry-run"]), capsys.readouterr()
        real = train.main(args), capsys.readouterr()
        return dry, real

    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs)   # 2 steps, no save_steps
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    # Started afresh, the folder is refused as the run refuses it, unless --overwrite-output-dir.
    fresh = ["--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--dry-run"]
    code, (out, err) = train.main(fresh), capsys.readouterr()
    assert code == 2 and "already holds a run (adapter/" in err and "--resume continues it" in err, out + err
    code, (out, err) = train.main([*fresh, "--overwrite-output-dir"]), capsys.readouterr()
    assert code == 0 and "holds a previous run (adapter/" in out and "--overwrite-output-dir deletes it" in out
    assert (tmp_path / "a" / "tiny" / "adapter").is_dir()   # the dry run deleted nothing
    (code, (out, err)), (real_code, (_, real_err)) = both("a")
    assert code == 0 and "already finished: the run is skipped" in out, out + err
    assert real_code == 0 and "already finished" in real_err
    (code, (out, err)), (real_code, (_, real_err)) = both("a", "--max-steps", "4")
    line = "the run finished without a checkpoint (finetuning.save_steps unset), so it cannot be continued to 4 steps"
    assert code == 2 and line in err and "dry run OK" not in out, out + err
    assert real_code == 2 and line in real_err

    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs, finetuning={"save_steps": 2})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    (code, (out, err)), (real_code, (_, real_err)) = both("b", "--max-steps", "1")
    line = "its checkpoint is at step 2, past this run's 1 steps"
    assert code == 2 and line in err and "dry run OK" not in out, out + err
    assert real_code == 2 and line in real_err


@pytest.mark.parametrize("stop", [5, 6])
def test_resume_around_an_epochs_last_shorter_step_is_exact(tmp_path, tiny_llama, tiny_pairs, capsys, stop):
    """16 pairs in batches of 3: 6 steps an epoch, the 6th of 1 pair (as TRL's Trainer). Stopped just
    before or just after that step and resumed = the straight run, bit for bit; `epoch` as TRL's."""
    cfg = write_config(tmp_path / "c.yaml", tiny_llama, tiny_pairs,
                       training={"max_steps": 8, "logging_steps": 1, "learning_rate": 5e-3,
                                 "per_device_train_batch_size": 3},
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                       post_training={"method": "dpo", "beta": 0.1}, finetuning={"save_steps": 1})
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "a")]) == 0
    straight = tmp_path / "a" / "tiny"
    rows = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "loss" in r] == pytest.approx([k / 6 for k in range(1, 9)], abs=1e-12)
    shutil.copytree(straight, tmp_path / "b" / "tiny")
    resumed = tmp_path / "b" / "tiny"
    forget_after(resumed, stop)
    assert train.main(["--config", str(cfg), "--output-dir", str(tmp_path / "b"), "--resume"]) == 0
    assert f"resuming from step {stop}" in capsys.readouterr().err
    assert losses(resumed) == losses(straight)
    a, b = adapter(straight), adapter(resumed)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
