"""`--dry-run` of an online method: the plan of the run printed (the online loop's sizes), bad
input as one line, nothing trained or written."""
from __future__ import annotations

import pytest

from conftest import write_config
from jaxpref import train
from test_online_train import online_setup  # noqa: F401  (the fixture)


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


@pytest.mark.parametrize("training, needle", [
    ({"gradient_accumulation_steps": 8}, "prompts are fewer than one generation's 16"),
    ({"per_device_train_batch_size": 3, "gradient_accumulation_steps": 1}, "not a multiple"),
])
def test_online_dry_run_bad_input_is_one_line(tmp_path, online_setup, capsys, training, needle):  # noqa: F811
    code, out, err = dry(tmp_path, online_setup, capsys, **training)
    lines = [l for l in err.splitlines() if l.startswith("jaxpref: error")]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert "dry run OK" not in out
