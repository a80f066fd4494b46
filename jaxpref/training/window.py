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
    """The steps' metrics since the last log (device arrays, fetched when the row is written)."""

    def __init__(self):
        self.steps: list[dict] = []

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
        if not steps:
            return {}
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for m in steps:
            for k, v in m.items():
                if k.startswith(COUNT) or k in OWN:
                    continue
                c = 1.0 if k == "loss" else float(m.get(COUNT + k, 1.0))
                sums[k] = sums.get(k, 0.0) + float(v) * c
                counts[k] = counts.get(k, 0.0) + c
        out = {k: sums[k] / counts[k] for k in sums if counts[k] > 0}
        out.update({k: float(steps[-1][k]) for k in OWN if k in steps[-1]})
        return out
