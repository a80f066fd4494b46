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


# One tag scheme for train and eval in every tracker, as TRL's runs show (transformers' callbacks).
TAGS = ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/rewards/chosen",
        "train/logps/chosen", "train/grad_norm", "eval/loss", "eval/rewards/accuracies", "eval/rewards/chosen")


def _resolved(run) -> dict:
    """The run's config.yaml, flattened as the trackers get it."""
    from jaxpref.config import load_config
    from jaxpref.training.sinks import flat_config
    return flat_config(load_config(run / "config.yaml"))


def test_tensorboard_tags_and_hparams(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(logged_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for t in TAGS:
        assert t in tags, (t, tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["training.learning_rate"].number_value == 1e-3
    assert hparams["post_training.method"].string_value == "dpo"
    assert set(hparams) == set(_resolved(logged_run))


def _wandb_records(path):
    """The protobuf records of a W&B offline run's transaction log (LevelDB's log format)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sH", data[:6]) == (b":W&B", 0xBEE1)
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last fragment
            yield wandb_internal_pb2.Record.FromString(buf)
            buf = b""


def test_wandb_offline_run_has_the_config_and_tags(logged_run):
    runs = list((logged_run / "wandb").glob("offline-run-*"))
    assert runs, list((logged_run / "wandb").iterdir())
    config, keys = {}, set()
    for rec in _wandb_records(next(runs[0].glob("*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind in ("run", "config"):
            update = rec.run.config.update if kind == "run" else rec.config.update
            config.update({item.key: json.loads(item.value_json) for item in update})
        elif kind == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
    config.pop("_wandb", None)
    assert config == _resolved(logged_run)
    assert config["training.max_steps"] == 3 and config["models.0.name"] == "tiny"
    assert set(TAGS) <= keys, keys


def test_wandb_samples_table(logged_run):
    samples = [json.loads(l) for l in (logged_run / "samples.jsonl").read_text().splitlines()]
    tables = sorted((logged_run / "wandb").rglob("samples_*.table.json"), key=lambda f: f.stat().st_mtime)
    assert len(tables) == 3   # base (step 0), the eval at step 2, the end (step 3)
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "model", "prompt", "completion"]
    assert last["data"] == [[3, "tuned", r["prompt"], r["completion"]] for r in samples if r["step"] == 3]



def test_mlflow_params_and_metric_names_keep_their_slashes(logged_run):
    import mlflow

    client = mlflow.tracking.MlflowClient((logged_run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("jaxpref")
    (run,) = client.search_runs([exp.experiment_id])
    assert set(TAGS) <= set(run.data.metrics), run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    params = run.data.params
    assert params["training.learning_rate"] == "0.001" and params["post_training.method"] == "dpo"
    assert set(params) == set(_resolved(logged_run))


def test_plot_written(logged_run):
    png = logged_run / "metrics.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_metrics_prefixed(logged_run):
    rows = [json.loads(l) for l in (logged_run / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval_loss" in r]
    assert ev and all(k.startswith("eval_") or k in ("step", "epoch") for k in ev[0])   # as TRL's eval rows
    assert "eval_rewards/accuracies" in ev[0]


def test_planted_tokens_appear_in_no_file(logged_run):
    for f in logged_run.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert FAKE.encode() not in data, f
            assert FAKE_WANDB.encode() not in data, f


def test_wandb_rows_carry_the_global_step_as_trl(logged_run):
    """transformers' WandbCallback (TRL's runs) logs `train/global_step` in every row and makes it
    every metric's x axis (`define_metric("*", step_metric="train/global_step")`), so that
    jaxpref's and TRL's curves share their x axis in W&B."""
    runs = list((logged_run / "wandb").glob("offline-run-*"))
    rows, step_metrics = [], {}
    for rec in _wandb_records(next(runs[0].glob("*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
        elif kind == "metric":
            step_metrics[rec.metric.glob_name or rec.metric.name] = rec.metric.step_metric
    logged = [r for r in rows if "train/loss" in r or "eval/loss" in r]
    assert [r["train/global_step"] for r in logged if "train/loss" in r] == [1, 2, 3]
    assert all(r["train/global_step"] == r["_step"] for r in logged)
    assert step_metrics.get("*") == "train/global_step", step_metrics



def test_trackers_get_trl_final_row(logged_run):
    """TRL's final log row (transformers' `speed_metrics` and `train_loss`) reaches the trackers as
    its runs show it: `train/train_loss`, `train/train_runtime`, `train/train_samples_per_second`,
    `train/train_steps_per_second` at the last step; metrics.jsonl keeps its rows (the numbers are
    in summary.json)."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((logged_run / "summary.json").read_text())
    keys = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    acc = EventAccumulator(str(logged_run / "tensorboard"))
    acc.Reload()
    for k in keys:
        (event,) = acc.Scalars(f"train/{k}")
        assert event.step == 3 and event.value == pytest.approx(summary[k], rel=1e-6), k
    client = mlflow.tracking.MlflowClient((logged_run / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("jaxpref").experiment_id])
    assert run.data.metrics["train/train_loss"] == pytest.approx(summary["train_loss"], rel=1e-6)
    wandb_summary = {}   # W&B: run summary values, as transformers' WandbCallback sets them
    for rec in _wandb_records(next(next((logged_run / "wandb").glob("offline-run-*")).glob("*.wandb"))):
        if rec.WhichOneof("record_type") == "summary":
            wandb_summary.update({i.key: json.loads(i.value_json) for i in rec.summary.update})
    for k in keys:
        assert wandb_summary[k] == pytest.approx(summary[k], rel=1e-6), k
    rows = [json.loads(l) for l in (logged_run / "metrics.jsonl").read_text().splitlines()]
    assert not any("train_loss" in r for r in rows)
