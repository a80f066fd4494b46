"""Evaluation during training: the eval split's mean metrics, and early stopping on one of them."""
from __future__ import annotations

from jaxpref.errors import ConfigError


def evaluate_split(eval_for, lora, params, ref_params, data, batch_size: int, layout, seed: int,
                   iter_cls, mesh=None) -> tuple[dict, int, int]:
    """Mean of eval metrics over the eval split's batches, `eval_` prefixed, the number of batches
    and of rows evaluated. As TRL's evaluation (its dataloader keeps the last batch): every row, in
    batches of `batch_size` and a shorter last one, each metric the mean of the batches' means but
    the loss, the mean over rows (transformers' evaluation loop gathers a batch's loss once per row).
    `eval_for(n)`: the eval step of batches of n rows. On several data-parallel devices
    (`layout.streams`) the last batch is the rest's largest multiple of them; the few rows left
    after it (fewer than the devices) are not evaluated."""
    import jax

    from jaxpref.runtime.mesh import put_batch
    from jaxpref.training.window import MetricWindow

    window = MetricWindow()   # TRL's mean over the eval batches (a metric a batch lacks: over the others)
    sizes: list[int] = []
    full = len(data) // batch_size
    rest = len(data) - full * batch_size
    rest -= rest % layout.streams
    for size, count, start in ((batch_size, full, 0), (rest, int(rest > 0), full * batch_size)):
        if not count:
            continue
        it = iter_cls(data, size, 1, seed, layout, shuffle=False)
        it.restore({"epoch": 0, "index": start})
        for _ in range(count):
            batch, _ = next(it)
            batch = put_batch(batch, mesh) if mesh is not None else batch
            window.add(eval_for(size)(lora, params, ref_params, batch, None))
            sizes.append(size)
    row = window.row()
    if "loss" in row:
        losses = jax.device_get([m["loss"] for m in window.steps])
        row["loss"] = float(sum(float(v) * n for v, n in zip(losses, sizes)) / sum(sizes))
    return {f"eval_{k}": v for k, v in row.items()}, len(sizes), sum(sizes)


def check_eval(cfg, eval_data, dp: int) -> None:
    """The evaluations a config asks for can run: `eval_steps`, `eval_strategy` steps or epoch, early
    stopping and the best model need an eval split, and an eval split (evaluated at the end unless
    `eval_strategy: no`) needs a row for each of the `dp` data-parallel devices.
    Otherwise a ConfigError naming the key: the run would silently never evaluate."""
    tr, ft = cfg.training, cfg.finetuning
    if tr.eval_strategy == "no":
        return
    if eval_data is None:
        asks = [key for key, on in (("training.eval_steps", tr.eval_steps is not None),
                                    ("training.eval_strategy", tr.eval_strategy in ("steps", "epoch")),
                                    ("finetuning.early_stopping", ft.early_stopping is not None),
                                    ("finetuning.load_best_model_at_end", ft.load_best_model_at_end)) if on]
        if asks:
            raise ConfigError(f"{cfg.source}: `{asks[0]}` asks for evaluations, but there is no eval split "
                              "(set `dataset.eval_split` or `dataset.eval_fraction`)")
    elif len(eval_data) < dp:
        raise ConfigError(f"{cfg.source}: the eval split has {len(eval_data)} usable rows, fewer than the {dp} "
                          "data-parallel devices, so it would never be evaluated; enlarge the eval split")


class EarlyStopping:
    """`finetuning.early_stopping`: stop when `metric` has not improved by `min_delta` for
    `patience` evaluations; the best step's adapter is the one exported."""

    def __init__(self, es):
        self.es = es
        self.best = None
        self.best_step = None
        self.bad = 0

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad, "metric": self.es.metric,
                "mode": self.es.mode}

    def restore(self, d: dict) -> bool:
        """Continue from a checkpoint's `state()`; -> False (nothing taken) where it tracked another
        metric or direction: its best value is not one of this metric's. (A record without them,
        from an older checkpoint, is taken.)"""
        if "metric" in d and (d["metric"], d.get("mode")) != (self.es.metric, self.es.mode):
            return False
        self.best, self.best_step, self.bad = d.get("best"), d.get("best_step"), d.get("bad", 0)
        return True

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
