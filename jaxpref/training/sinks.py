"""Metric sinks: metrics.jsonl always; TensorBoard, W&B (offline-safe) and MLflow on request."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class MetricSinks:
    def __init__(self, run_dir: Path, cfg, name: str, append: bool = False, enabled: bool = True):
        self.tb = self.wandb = self.mlflow = self.file = None
        if not enabled:  # not the main process of a multi-process run: nothing is written
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a" if append else "w")
        report = cfg.report_to
        if "tensorboard" in report:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if "wandb" in report:
            self.wandb = _start_wandb(run_dir, cfg, name)
        if "mlflow" in report:
            self.mlflow = _start_mlflow(run_dir, cfg, name)

    def log(self, metrics: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = int(metrics.get("step", 0))
        scalars = {k: float(v) for k, v in metrics.items()
                   if k not in ("step",) and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                tag = k if "/" in k else (f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}")
                self.tb.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            mlflow, run = self.mlflow
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.file is None or self.file.closed:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow[0].end_run()


def _start_wandb(run_dir: Path, cfg, name: str):
    import wandb

    # Offline unless a key is set; never block on a network that is not there.
    mode = "online" if os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "offline" else "offline"
    try:
        return wandb.init(project=cfg.logging.project, name=cfg.logging.run_name or name,
                          dir=str(run_dir), mode=mode, reinit="finish_previous",
                          settings=wandb.Settings(init_timeout=30, silent=True))
    except Exception as e:
        print(f"jaxpref: warning: W&B disabled ({type(e).__name__}: {e})".splitlines()[0], file=sys.stderr)
        return None


def _start_mlflow(run_dir: Path, cfg, name: str):
    try:
        import mlflow
    except ImportError:
        print("jaxpref: warning: mlflow is not installed (uv sync --extra mlflow); skipping it",
              file=sys.stderr)
        return None
    # A local file store (no server); MLflow 3 asks for this opt-in.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
    mlflow.set_experiment(cfg.logging.project)
    run = mlflow.start_run(run_name=cfg.logging.run_name or name)
    return mlflow, run
