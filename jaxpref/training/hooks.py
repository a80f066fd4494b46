"""Hooks of the run loop, registered the way Levanter's `trainer.add_hook(fn, every=N)` does: each
runs after every N-th optimizer step (and, with `at_end`, after the last one), in the order added.
Logging, evaluation, early stopping, checkpoints and samples are hooks; the loop itself only
steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class StepInfo:
    """What a hook sees after a step: `step` (optimizer steps done), `epoch` (fractional), `total`
    (steps of the run), `metrics` (the step's metrics, still on the device: a hook that reads them
    calls `host_metrics`), `state` (the train state after the step)."""
    step: int
    epoch: float
    total: int
    metrics: dict
    state: Any
    _host: dict | None = field(default=None, repr=False)

    def host_metrics(self) -> dict:
        """The step's metrics as Python floats (fetched from the device once)."""
        if self._host is None:
            import jax

            from jaxpref.training.window import without_counts

            self._host = {k: float(v) for k, v in jax.device_get(without_counts(self.metrics)).items()}
        return self._host


@dataclass
class Hook:
    fn: Callable[[StepInfo], None]
    every: int
    at_end: bool


class Hooks:
    def __init__(self):
        self.hooks: list[Hook] = []

    def add_hook(self, fn: Callable[[StepInfo], None], every: int | None, at_end: bool = False) -> None:
        """Run `fn` after every `every`-th step (never when `every` is None or 0) and, with
        `at_end`, after the last step."""
        self.hooks.append(Hook(fn, every or 0, at_end))

    def run(self, info: StepInfo) -> None:
        for h in self.hooks:
            due = h.every > 0 and info.step % h.every == 0
            if due or (h.at_end and info.step == info.total):
                h.fn(info)
