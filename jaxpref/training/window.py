"""A logged row's metrics over its logging window, as TRL's trainers log them.

TRL appends each metric once per micro-batch (each `compute_loss` call) and logs the mean of the
values appended since the last log; the loss is the mean of the window's step losses;
`grad_norm` and `learning_rate` are the logging step's own. A metric a micro-batch does not
append (KTO's `rewards/rejected` in a micro-batch without undesirable completions) is averaged
over the micro-batches that did, and a metric no micro-batch of the window appended is left out
of the row. The step reports, next to each metric, how many micro-batch values its mean holds
(`_count/<name>`, `step.reduce_metrics`)."""
from __future__ import annotations

import math

import jax

COUNT = "_count/"
OWN = ("grad_norm", "learning_rate")   # the logging step's own value, not a window mean


def without_counts(m: dict) -> dict:
    """A step's metrics without their `_count/` entries."""
    return {k: v for k, v in m.items() if not k.startswith(COUNT)}


class MetricWindow:
    """The steps' metrics since the last log (device arrays or floats, fetched when the row is
    written). `latest`: the metrics logged as the last step's value that has them, not as a mean
    (the offline Trainer's grad_norm and learning_rate; the online loops add TRL's running
    `num_tokens`). `skip_nan`: a NaN value is left out of its mean, and a metric NaN throughout
    the window is NaN in the row (the online trainers' nanmean); offline a NaN stays in its mean,
    so that a NaN loss stops the run."""

    def __init__(self, latest: tuple[str, ...] = OWN, skip_nan: bool = False):
        self.latest, self.skip_nan = latest, skip_nan
        self.steps: list[dict] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, metrics: dict) -> None:
        self.steps.append(metrics)

    def reset(self) -> None:
        self.steps = []

    def state(self) -> list[dict]:
        """The window as JSON (a checkpoint's record): its steps' metrics as floats, NaN as None."""
        return [{k: (None if math.isnan(v) else v) for k, v in ((k, float(v)) for k, v in m.items())}
                for m in jax.device_get(self.steps)]

    def restore(self, steps: list[dict]) -> None:
        """The window a checkpoint saved (`state`): a resumed run's next row averages the same
        steps as the uninterrupted run's."""
        self.steps = [{k: (math.nan if v is None else v) for k, v in m.items()} for m in steps]

    def row(self) -> dict:
        """The window's metrics as Python floats; empty when no step was added."""
        steps = jax.device_get(self.steps)
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        last: dict[str, float] = {}
        for m in steps:
            for k, v in m.items():
                if k.startswith(COUNT):
                    continue
                if k in self.latest:
                    last[k] = float(v)
                    continue
                c = 1.0 if k == "loss" else float(m.get(COUNT + k, 1.0))
                if self.skip_nan and math.isnan(float(v)):
                    c = 0.0
                sums[k] = sums.get(k, 0.0) + (float(v) * c if c else 0.0)
                counts[k] = counts.get(k, 0.0) + c
        out = {k: sums[k] / counts[k] if counts[k] > 0 else math.nan for k in sums
               if counts[k] > 0 or self.skip_nan}
        out.update(last)
        return out


def final_speed(run, steps: int, seconds: float, loss_sum) -> dict:
    """TRL's final row (transformers' `speed_metrics`; `train_loss`: the mean step loss) over the
    `steps` this call of the run trained in `seconds`; samples as transformers counts them: steps x
    the global batch with `max_steps`, else the split's rows x `num_epochs` (each epoch's last step
    may be shorter), the share of them these steps are."""
    t, seconds = run.cfg.training, max(seconds, 1e-9)
    samples = steps * run.B * run.G if t.max_steps > 0 else len(run.prepared.train) * t.num_epochs * steps / run.total
    return {"train_runtime": round(seconds, 4), "train_samples_per_second": round(samples / seconds, 3),
            "train_steps_per_second": round(steps / seconds, 3),
            "train_loss": float(loss_sum) / steps if steps else None}
