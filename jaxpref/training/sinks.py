"""Metric sinks: metrics.jsonl always; TensorBoard, W&B (offline-safe) and MLflow on request
(`logging.report_to`). Each sink is one small class with `log(metrics)` and `close()` (and
`log_samples(rows, step)` when it shows text: TensorBoard and W&B); adding one is a class and a
row of `SINKS`.

The trackers get the run's resolved config (flattened: `training.learning_rate`) as W&B config,
MLflow params and TensorBoard hparams, and one tag scheme for train and eval, the one TRL's runs
show through transformers' callbacks (`train/rewards/chosen`, `eval/rewards/chosen`), so that the
curves of a jaxpref run and a TRL run overlay. metrics.jsonl keeps TRL's logged names
(`rewards/chosen`, `eval_rewards/chosen`)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path



def read_rows(path: Path) -> list[dict]:
    """The JSON object rows of a metrics/samples .jsonl file ([] when absent); a row cut short by
    a killed run is skipped."""
    out = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                out.append(row)
    return out

class JsonlSink:
    """metrics.jsonl: one JSON object per logged step (appended to when resuming)."""

    def __init__(self, run_dir: Path, cfg, name: str, append: bool):
        self.file = open(Path(run_dir) / "metrics.jsonl", "a" if append else "w")

    def log(self, metrics: dict, step: int, scalars: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()

    def log_final(self, row: dict, step: int, scalars: dict) -> None:
        pass   # metrics.jsonl holds the logged rows; summary.json has these numbers

    def close(self) -> None:
        self.file.close()


def tracker_name(key: str) -> str:
    """metrics.jsonl's name -> the trackers' tag: `eval_x` -> `eval/x`, anything else `train/x`
    (transformers' `rewrite_logs`)."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def flat_config(cfg) -> dict:
    """The resolved config as {`section.key`: value} (list entries by index: `models.0.name`)."""
    from jaxpref.config import to_dict

    out = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        else:
            out[prefix] = v
    walk("", to_dict(cfg))
    return out


def _param(v) -> str | int | float | bool:
    """A value trackers take (strings, numbers, booleans); lists, mappings and null as text."""
    return v if isinstance(v, (str, int, float, bool)) else json.dumps(v)


class TensorBoardSink:
    """Scalars under train/... and eval/...; the config as hparams (the HParams tab)."""

    def __init__(self, run_dir: Path, cfg, name: str, append: bool):
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        params = {k: _param(v) for k, v in flat_config(cfg).items()}
        exp, ssi, self.sei = hparams(params, {"train/loss": 0.0, "eval/loss": 0.0})
        for summary in (exp, ssi):
            self.writer.file_writer.add_summary(summary)

    def log(self, metrics: dict, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(tracker_name(k), v, step)

    log_final = log   # train/train_loss, ... as transformers' TensorBoardCallback writes TRL's

    def log_samples(self, rows: list[dict], step: int) -> None:
        """A markdown table (TensorBoard's text tab renders it): model, prompt, completion."""
        cell = lambda s: " ".join(str(s).split()).replace("|", "\\|")
        lines = ["| model | prompt | completion |", "|---|---|---|"]
        lines += [f"| {r['model']} | {cell(r['prompt'])} | {cell(r['completion'])} |" for r in rows]
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.file_writer.add_summary(self.sei)
        self.writer.close()


class WandbSink:
    """A W&B run, offline unless WANDB_API_KEY is set: never blocks on a network that is not there."""

    def __init__(self, run_dir: Path, cfg, name: str, append: bool):
        import wandb

        online = os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "offline"
        self.run = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name or name,
                              dir=str(run_dir), mode="online" if online else "offline", reinit="finish_previous",
                              config=flat_config(cfg), settings=wandb.Settings(init_timeout=30, silent=True))
        # As transformers' WandbCallback (TRL's runs): every metric's x axis is train/global_step.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, metrics: dict, step: int, scalars: dict) -> None:
        self.run.log({**{tracker_name(k): v for k, v in scalars.items()}, "train/global_step": step}, step=step)

    def log_final(self, row: dict, step: int, scalars: dict) -> None:
        self.run.summary.update(scalars)   # as transformers' WandbCallback: single values, not curves

    def log_samples(self, rows: list[dict], step: int) -> None:
        import wandb

        data = [[r["step"], r["model"], str(r["prompt"]), r["completion"]] for r in rows]
        self.run.log({"samples": wandb.Table(columns=["step", "model", "prompt", "completion"], data=data),
                      "train/global_step": step}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """A local MLflow file store under the run folder (no server)."""

    def __init__(self, run_dir: Path, cfg, name: str, append: bool):
        import mlflow

        # MLflow 3 asks for this opt-in to a file store.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
        mlflow.set_experiment(cfg.logging.project)
        mlflow.start_run(run_name=cfg.logging.run_name or name)
        params = [(k, _param(v)) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(params[i:i + 100]))
        self.mlflow = mlflow

    def log(self, metrics: dict, step: int, scalars: dict) -> None:
        self.mlflow.log_metrics({tracker_name(k): v for k, v in scalars.items()}, step=step)

    log_final = log

    def close(self) -> None:
        self.mlflow.end_run()


FINAL = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}
MISSING = {"mlflow": "mlflow is not installed (uv sync --extra mlflow)"}


class MetricSinks:
    """Every sink of a run; nothing is written by a process other than the main one (`enabled`)."""

    def __init__(self, run_dir: Path, cfg, name: str, append: bool = False, enabled: bool = True):
        self.sinks: list = []
        if not enabled:
            return
        self.sinks.append(JsonlSink(run_dir, cfg, name, append))
        for kind in cfg.report_to:
            try:
                self.sinks.append(SINKS[kind](run_dir, cfg, name, append))
            except ImportError:
                print(f"jaxpref: warning: {MISSING.get(kind, f'{kind} is not installed')}; skipping it",
                      file=sys.stderr)
            except Exception as e:  # a tracker that cannot start must not stop the training
                print(f"jaxpref: warning: {kind} disabled ({type(e).__name__}: {e})".splitlines()[0], file=sys.stderr)

    def log(self, metrics: dict) -> None:
        step = int(metrics.get("step", 0))
        scalars = {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        for sink in self.sinks:
            sink.log(metrics, step, scalars)

    def log_final(self, summary: dict, step: int) -> None:
        """TRL's final log row (`train_runtime`, `train_samples_per_second`, `train_steps_per_second`,
        `train_loss`: summary.json's numbers) to the trackers, as transformers' callbacks pass it on."""
        row = {k: summary[k] for k in FINAL if isinstance(summary.get(k), (int, float))}
        scalars = {k: float(v) for k, v in row.items()}
        for sink in self.sinks:
            sink.log_final(row, step, scalars)

    def log_samples(self, rows: list[dict], step: int) -> None:
        for sink in self.sinks:
            if hasattr(sink, "log_samples"):
                sink.log_samples(rows, step)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
