"""The progress line of a run: step, loss, reward accuracy, tokens/s, ETA."""
from __future__ import annotations

import sys
import time


class ProgressBar:
    """One line, rewritten: step, loss, reward accuracy, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled and total > 0
        self.t0 = time.time()
        self.last: dict = {}

    def update(self, step: int, metrics: dict | None) -> None:
        if metrics:
            self.last = metrics
        if not self.enabled:
            return
        el = time.time() - self.t0
        eta = el / step * (self.total - step) if step else 0.0
        m = self.last
        if not m:
            line = f"\rstep {step}/{self.total} | compiling..."
        else:
            line = (f"\rstep {step}/{self.total} | loss {m.get('loss', float('nan')):.4f} | "
                    f"acc {m.get('rewards/accuracies', float('nan')):.2f} | "
                    f"{m.get('tokens_per_second', 0):.0f} tok/s | ETA {eta:.0f}s ")
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
