"""Evaluation during training: the eval split's mean metrics, and early stopping on one of them."""
from __future__ import annotations

import jax

from jaxpref.errors import ConfigError


def evaluate_split(eval_fn, lora, params, ref_params, data, batch_size: int, layout, seed: int,
                   iter_cls, mesh=None) -> dict:
    """Mean of eval metrics over all full batches of the eval split, `eval_` prefixed."""
    from jaxpref.runtime.mesh import put_batch

    it = iter_cls(data, batch_size, 1, seed, layout, shuffle=False)
    sums: dict[str, float] = {}
    n = 0
    for _ in range(it.steps_per_epoch):
        batch, _ = next(it)
        batch = put_batch(batch, mesh) if mesh is not None else batch
        m = jax.device_get(eval_fn(lora, params, ref_params, batch, None))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}


class EarlyStopping:
    """`finetuning.early_stopping`: stop when `metric` has not improved by `min_delta` for
    `patience` evaluations; the best step's adapter is the one exported."""

    def __init__(self, es):
        self.es = es
        self.best = None
        self.best_step = None
        self.bad = 0

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def restore(self, d: dict) -> None:
        self.best, self.best_step, self.bad = d.get("best"), d.get("best_step"), d.get("bad", 0)

    def update(self, metrics: dict, step: int) -> tuple[bool, bool]:
        """-> (improved, stop)."""
        key = self.es.metric
        if key not in metrics:
            raise ConfigError(f"`finetuning.early_stopping.metric` `{key}` is not logged; "
                              f"eval metrics are: {', '.join(sorted(metrics))}")
        v = metrics[key]
        better = (self.best is None or (v < self.best - self.es.min_delta if self.es.mode == "min"
                                        else v > self.best + self.es.min_delta))
        if better:
            self.best, self.best_step, self.bad = v, step, 0
        else:
            self.bad += 1
        return better, self.bad >= self.es.patience
