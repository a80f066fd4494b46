"""Shared pieces of the online-method tests (GRPO, RLOO, online DPO, PPO): a reward function file,
six prompts with their answers, the folders that hold them beside a tiny model, and a run on one
device against the same run on a mesh of 8 virtual CPU devices."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, write_config

REWARDS = '''
def digit_share(prompts, completions, completion_ids, **kwargs):
    """The share of the completion's words that are numbers (None for an empty completion)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w.isdigit() for w in words) / len(words) if words else None)
    return out

def wants_answer(prompts, completions, answer, log_extra=None, **kwargs):
    if log_extra is not None:   # a column of samples.jsonl (GRPO's and RLOO's completions table in TRL)
        log_extra("wanted", list(answer))
    return [float(a in c) for c, a in zip(completions, answer)]
'''

PROMPTS = ["what is one and one ?", "is the sun hot ?", "what is two and two ?", "is the sky blue ?",
           "what is the opposite of hot ?", "is the grass green ?"]
ANSWERS = ["two", "yes", "four", "yes", "cold", "yes"]


def train_ok(cfg, out, capsys) -> tuple:
    """`jaxpref train --config cfg --output-dir out` that must succeed: (the run folder of the
    config's model `tiny`, its metrics.jsonl rows, its samples.jsonl rows)."""
    from jaxpref import train

    code = train.main(["--config", str(cfg), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    run_dir = out / "tiny"
    rows = lambda name: [json.loads(x) for x in (run_dir / name).read_text().splitlines()]
    return run_dir, rows("metrics.jsonl"), rows("samples.jsonl")


def train_refused(cfg, out, capsys, needles) -> None:
    """`jaxpref train` that must exit 2 with one `jaxpref: error` line naming each of `needles`,
    no traceback."""
    from jaxpref import train

    code = train.main(["--config", str(cfg), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("jaxpref: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def write_prompts_and_rewards(d, n: int = len(PROMPTS), name: str = "prompts.jsonl"):
    """rewards.py and `name` (the first `n` of the prompts, repeated as needed) in the folder `d`."""
    (d / "rewards.py").write_text(REWARDS)
    rows = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ANSWERS)]
    rows = (rows * (n // len(rows) + 1))[:n]
    (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def online_setup(tmp_path_factory, tiny_llama):
    """The tiny model with the number words as extra end-of-sequence ids (generation_config.json,
    as TRL reads them), so that completions end at different lengths; prompts; reward functions."""
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("online")
    shutil.copytree(tiny_llama, d / "model")
    tok = AutoTokenizer.from_pretrained(d / "model")
    stops = [tok.eos_token_id] + [tok.convert_tokens_to_ids(str(i)) for i in range(40)]
    (d / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return write_prompts_and_rewards(d)


@pytest.fixture(scope="module")
def ppo_setup(tmp_path_factory):
    """The prompts and reward functions (PPO's runs read the tiny model where it is)."""
    return write_prompts_and_rewards(tmp_path_factory.mktemp("ppo_cli"))


def one_device_and_mesh(tmp_path, d, model, post_training: dict, per_device: tuple[int, int], mesh: dict,
                        prompts: str = "prompts.jsonl", **training) -> dict[str, list[dict]]:
    """The metrics.jsonl rows of the same run on one device (per_device_train_batch_size
    per_device[0]) and on `mesh` (per_device[1]) over 8 virtual CPU devices, each a subprocess
    (the device count is fixed when JAX starts): {"one": rows, "mesh": rows}."""
    import os
    import subprocess
    import sys

    runs = {}
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    for name, size, gpu in (("one", per_device[0], {"device_ids": [0]}), ("mesh", per_device[1], {"mesh": mesh})):
        tr = {"max_steps": 2, "per_device_train_batch_size": size, "learning_rate": 1.0e-2, "logging_steps": 1,
              "seed": 0, **training}
        cfg = write_config(d / f"{post_training['method']}_{name}.yaml", model, d / prompts,
                           post_training=post_training, gpu=gpu, training=tr)
        proc = subprocess.run([sys.executable, "-m", "jaxpref.train", "--config", str(cfg), "--output-dir",
                               str(tmp_path / name)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = [json.loads(l) for l in (tmp_path / name / "tiny" / "metrics.jsonl").read_text().splitlines()]
    return runs
