"""Metric sinks: TensorBoard event files, W&B offline runs, an MLflow file store, plots; and no
token from .env in any file a run writes."""
from __future__ import annotations

import json
import os

import pytest

from conftest import write_config
from jaxpref import train

FAKE = "hf_PLANTEDfakeTOKEN1234567890abcdef"
FAKE_WANDB = "0123456789abcdef0123456789abcdefPLANTED"


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_llama, tiny_pairs):
    tmp = tmp_path_factory.mktemp("logged")
    cfg = write_config(tmp / "c.yaml", tiny_llama, tiny_pairs,
                       dataset={"name": str(tiny_pairs), "eval_fraction": 0.25},
                       training={"max_steps": 3, "logging_steps": 1, "eval_steps": 2,
                                 "per_device_eval_batch_size": 2},
                       logging={"report_to": ["tensorboard", "wandb", "mlflow"], "progress_bar": False,
                                "sample_prompts": 2, "sample_max_new_tokens": 4})
    (tmp / ".env").write_text(f"HF_TOKEN={FAKE}\nWANDB_API_KEY={FAKE_WANDB}\n")
    cwd = os.getcwd()
    saved = {k: os.environ.get(k) for k in ("HF_TOKEN", "WANDB_API_KEY", "WANDB_MODE")}
    os.environ["WANDB_MODE"] = "offline"
    os.chdir(tmp)
    try:
        code = train.main(["--config", str(cfg), "--output-dir", str(tmp / "out")])
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert code == 0
    return tmp / "out" / "tiny"


def test_tensorboard_events_readable_with_expected_tags(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for t in ("train/loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "train/grad_norm",
              "eval/loss"):
        assert t in tags, (t, tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_wandb_offline_run_written(logged_run):
    runs = list((logged_run / "wandb").glob("offline-run-*"))
    assert runs, list((logged_run / "wandb").iterdir())
    assert any(f.suffix == ".wandb" for f in runs[0].iterdir())


def test_wandb_samples_table(logged_run):
    samples = [json.loads(l) for l in (logged_run / "samples.jsonl").read_text().splitlines()]
    tables = sorted((logged_run / "wandb").rglob("samples_*.table.json"), key=lambda f: f.stat().st_mtime)
    assert len(tables) == 3   # base (step 0), the eval at step 2, the end (step 3)
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "model", "prompt", "completion"]
    assert last["data"] == [[3, "tuned", r["prompt"], r["completion"]] for r in samples if r["step"] == 3]


def test_mlflow_file_store_has_metrics(logged_run):
    metrics = list((logged_run / "mlruns").rglob("metrics/loss"))
    assert metrics, "no mlflow loss metric"
    lines = metrics[0].read_text().split("\n")
    assert len([l for l in lines if l.strip()]) == 3


def test_plot_written(logged_run):
    png = logged_run / "metrics.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_metrics_prefixed(logged_run):
    rows = [json.loads(l) for l in (logged_run / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval_loss" in r]
    assert ev and all(k.startswith("eval_") or k == "step" for k in ev[0])
    assert "eval_rewards/accuracies" in ev[0]


def test_planted_tokens_appear_in_no_file(logged_run):
    for f in logged_run.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert FAKE.encode() not in data, f
            assert FAKE_WANDB.encode() not in data, f
