"""Ctrl-C during training: finish the step under way, then stop with a checkpoint.

The train step donates its state, so an interrupt raised while a step is being dispatched could
leave no valid state to save. While a `StopRequest` is active, the first SIGINT only asks the run
loop to stop at the next step boundary; a second one raises `KeyboardInterrupt` at once."""
from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    def __init__(self, name: str, unit: str = "step"):
        self.name, self.unit = name, unit   # what the run finishes before it stops
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[{self.name}] Ctrl-C: stopping after this {self.unit} with a checkpoint "
              "(Ctrl-C again stops at once, without one)", file=sys.stderr)

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
