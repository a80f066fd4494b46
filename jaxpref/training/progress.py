"""What a person watching a run sees, on stdout.

Written to a file or a pipe (SLURM, nohup, `| tee`), the run prints one plain line per logged step
and one per evaluation, so that `tail -f` follows it:

    [tiny] step 10/30 (33%) | loss 0.6412 | acc 0.750 | margin 0.1210 | 2,345 tok/s | elapsed 0:14 | ETA 0:21
    [tiny] eval at step 10/30 | eval loss 0.6518 | eval acc 0.625 | eval margin 0.0903 | 1.2 s

In a terminal it draws a tqdm bar instead, with the current step's numbers, and writes the
evaluations above it. Both measure the ETA on the steps' own time: the seconds spent compiling
(the first step, each new batch shape) are left out, since the remaining steps will not spend
them again.
"""
from __future__ import annotations

import sys
import time

# (metric, label, format) in the order shown; a metric the method does not log is left out.
FIELDS = (("loss", "loss", ".4f"), ("rewards/accuracies", "acc", ".3f"), ("rewards/margins", "margin", ".4f"),
          ("kl", "kl", ".4f"))


def clock(seconds: float) -> str:
    """1:02:03, or 2:03 under an hour."""
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def metric_fields(m: dict, prefix: str = "") -> list[str]:
    out = []
    for key, label, fmt in FIELDS:
        v = m.get(prefix + key)
        if isinstance(v, (int, float)):
            out.append(f"{'eval ' if prefix else ''}{label} {v:{fmt}}")
    return out


class Clock:
    """Elapsed time, throughput and an ETA that leave out compilation: the rate is measured over
    the steps' own time (wall time minus the seconds spent compiling)."""

    def __init__(self, start: int, total: int):
        self.start, self.total = start, total
        self.t0 = time.time()
        self.compile_s = 0.0   # compiling, and the first evaluation (which compiles the eval step)
        self.eval_s = 0.0      # the other evaluations
        self.evals = 0
        self.tokens = 0

    def elapsed(self) -> float:
        return time.time() - self.t0

    def evaluated(self, seconds: float) -> None:
        if self.evals == 0:
            self.compile_s += seconds
        else:
            self.eval_s += seconds
        self.evals += 1

    def sampled(self, seconds: float, first: bool) -> None:
        """Samples (`logging.sample_prompts`) decoded: the first with a model (base or tuned)
        compiles the decoder, counted as compiling; later ones recur like evaluations."""
        if first:
            self.compile_s += seconds
        else:
            self.eval_s += seconds

    def eta(self, step: int) -> float | None:
        """Seconds left: the steps' (and later evaluations') own time so far, per step."""
        done = step - self.start
        running = max(self.elapsed() - self.compile_s, 1e-9)
        return running / done * (self.total - step) if done > 0 else None

    def tokens_per_second(self) -> float:
        """Training tokens per second of training time (no compiling, no evaluation)."""
        return self.tokens / max(self.elapsed() - self.compile_s - self.eval_s, 1e-9)

    def fields(self, step: int) -> list[str]:
        eta = self.eta(step)
        return [f"{self.tokens_per_second():,.0f} tok/s", f"elapsed {clock(self.elapsed())}",
                f"ETA {clock(eta) if eta is not None else '?'}"]


class Progress:
    """Plain lines (a file or a pipe). `enabled` false: only the start and end lines."""

    def __init__(self, name: str, start: int, total: int, enabled: bool = True, stream=None):
        self.name, self.total, self.enabled = name, total, enabled
        self.stream = stream or sys.stdout
        self.clock = Clock(start, total)
        self.last_eval: dict | None = None
        self._compile_t0 = None

    def write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str, err: bool = False) -> None:
        """A message that is no metric (early stopping, an interruption)."""
        if err:
            print(text, file=sys.stderr, flush=True)
        else:
            self.write(text)

    def compiling(self, what: str) -> None:
        self._compile_t0 = time.time()
        if self.enabled:
            self.write(f"[{self.name}] compiling {what} ...")

    def compiled(self) -> float:
        """-> the seconds since `compiling` (left out of the ETA)."""
        dt = time.time() - self._compile_t0
        self.clock.compile_s += dt
        if self.enabled:
            self.write(f"[{self.name}] compiled in {dt:.1f} s")
        return dt

    def step(self, info, tokens: int) -> None:
        self.clock.tokens += tokens

    def evaluating(self, step: int) -> None:
        pass

    def sampled(self, seconds: float, first: bool) -> None:
        self.clock.sampled(seconds, first)

    def logged(self, step: int, m: dict) -> None:
        if self.enabled:
            pct = f"({100 * step / self.total:.0f}%)"
            self.write(" | ".join([f"[{self.name}] step {step}/{self.total} {pct}"] + metric_fields(m)
                                  + self.clock.fields(step)))

    def evaluated(self, step: int, ev: dict, seconds: float) -> None:
        self.last_eval = ev
        self.clock.evaluated(seconds)
        if self.enabled:
            self.write(" | ".join([f"[{self.name}] eval at step {step}/{self.total}"]
                                  + metric_fields(ev, "eval_") + [f"{seconds:.1f} s"]))

    def close(self) -> None:
        pass


class Bar(Progress):
    """A tqdm bar in a terminal: percent, steps, elapsed time, the current step's numbers and
    an ETA without compilation; "compiling" while a step compiles; evaluations written above it
    and in its final line."""

    def __init__(self, name: str, start: int, total: int, stream=None):
        super().__init__(name, start, total, True, stream)
        from tqdm import tqdm

        # Redrawn at every step (mininterval 0, miniters 1), so the bar always shows the step it counts.
        self.bar = tqdm(total=total, initial=start, file=self.stream, desc=f"[{name}]", dynamic_ncols=True,
                        mininterval=0, miniters=1,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}")
        self._step = start
        self._fields: list[str] = []

    def _show(self, status: str | None = None, refresh: bool = True) -> None:
        parts = [status] if status else self._fields + self.clock.fields(self._step)
        if self.last_eval and not status:
            parts += metric_fields(self.last_eval, "eval_")
        self.bar.set_postfix_str(" | ".join(parts), refresh=refresh)

    def write(self, text: str) -> None:
        self.bar.write(text, file=self.stream)

    def note(self, text: str, err: bool = False) -> None:
        self.bar.write(text, file=sys.stderr if err else self.stream)

    def compiling(self, what: str) -> None:
        self._compile_t0 = time.time()
        self._show(f"compiling {what} ... (elapsed {clock(self.clock.elapsed())})")

    def compiled(self) -> float:
        dt = time.time() - self._compile_t0
        self.clock.compile_s += dt
        return dt

    def step(self, info, tokens: int) -> None:
        self.clock.tokens += tokens
        self._fields = metric_fields(info.host_metrics())  # this step's numbers, not the last logged
        n, self._step = info.step - self._step, info.step
        self._show(refresh=False)
        self.bar.update(n)

    def logged(self, step: int, m: dict) -> None:
        pass

    def evaluating(self, step: int) -> None:
        self._show(f"evaluating at step {step} ... (elapsed {clock(self.clock.elapsed())})")

    def evaluated(self, step: int, ev: dict, seconds: float) -> None:
        self.last_eval = ev
        self.clock.evaluated(seconds)
        self.write(" | ".join([f"[{self.name}] eval at step {step}/{self.total}"] + metric_fields(ev, "eval_")
                              + [f"{seconds:.1f} s"]))
        self._show()

    def close(self) -> None:
        if not self.bar.disable:  # closed already (finished, or interrupted)
            self._show()
            self.bar.close()


def make_progress(name: str, start: int, total: int, enabled: bool, stream=None) -> Progress:
    """A bar when `stream` (stdout) is a terminal, plain lines otherwise; `enabled` false (the
    config's `logging.progress_bar`, or a process other than the first): neither."""
    stream = stream or sys.stdout
    if enabled and stream.isatty() and _columns(stream) > 0:
        return Bar(name, start, total, stream)
    return Progress(name, start, total, enabled, stream)


def _columns(stream) -> int:
    """The terminal's width; 0 for a terminal that has none (`script` or a container's pseudo-
    terminal with no size set), where a bar would draw nothing at all: plain lines there."""
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0
