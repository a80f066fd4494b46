"""Who may write a run folder, and what a new run may do with what is already there.

`claim_run_dir` is called once per model before its run: it takes `<run>/.lock` (an advisory lock
held by this process, with its PID written in the file; the kernel drops it when the process dies,
so a killed run never leaves a stale lock) and refuses to start a fresh run over a previous one
unless `--overwrite-output-dir` asks for exactly that (then the previous outputs are deleted).
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from jaxpref.errors import ConfigError
from jaxpref.runtime.outdir import is_our_export

LOCK = ".lock"
# What a run writes (besides config.yaml, error.log and the sinks' folders).
OUTPUTS = ("checkpoints", "adapter", "model", "summary.json", "metrics.jsonl", "samples.jsonl", "metrics.png",
           "FINISHED")


class RunLock:
    """An exclusive lock on a run folder; `release()` (or leaving a `with`) frees it."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take `<run>/.lock` or refuse in one line naming the PID that holds it."""
    import fcntl

    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        os.close(fd)
        who = f"PID {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
        raise ConfigError(f"{run_dir} is being written by another run ({who}, {path}); wait for it to "
                          "finish or train into another --output-dir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return RunLock(path, fd)


FOLDERS = ("checkpoints", "adapter", "model")   # the OUTPUTS that are folders; the others are files


def check_output_kinds(run_dir: Path) -> None:
    """A file where the run keeps a folder of its outputs (or a folder where it writes a file) would
    fail the run at that write, or be taken for a previous run's output: name it up front."""
    for name in OUTPUTS + ("config.yaml",):
        p = Path(run_dir) / name
        if p.exists() and p.is_dir() != (name in FOLDERS):
            want, got = ("folder", "file") if name in FOLDERS else ("file", "folder")
            raise ConfigError(f"{p} is a {got}, where the run writes its `{name}` {want}; move it away "
                              "or train into another --output-dir")


def previous_outputs(run_dir: Path) -> list[str]:
    """The outputs of an earlier run in `run_dir` (empty metrics and checkpoint folders do not count)."""
    run_dir = Path(run_dir)
    found = []
    for name in OUTPUTS:
        p = run_dir / name
        if not p.exists():
            continue
        if p.is_dir() and not any(p.iterdir()):
            continue
        if name == "checkpoints" and not any(c.name.isdigit() for c in p.iterdir()):
            continue  # only Orbax's temporary folders or an old cache: no checkpoint to lose
        if p.is_file() and p.stat().st_size == 0:
            continue
        found.append(name + ("/" if p.is_dir() else ""))
    return found


def holds_a_run(run_dir: Path, previous: list[str]) -> str:
    """The one line refusing to start afresh in a folder that holds a previous run's `previous` outputs."""
    return (f"{run_dir} already holds a run ({', '.join(previous)}); --resume continues it, "
            "--overwrite-output-dir deletes it and starts again")


def check_not_an_input(run_dir: Path, cfg, index: int) -> None:
    """The run folder must not be, nor hold, a local folder the run reads (the model's, the
    reference's, the dataset's): its outputs would land among them, and --overwrite-output-dir
    would delete a `model/` there."""
    from jaxpref.runtime.outdir import refuse_protected

    entry = cfg.models[index]
    inputs = {"the base model's folder": entry.huggingface_id, "the reference model's folder": entry.ref_model_id,
              "the dataset's folder": cfg.dataset.name}
    protect = {what: Path(p).expanduser() for what, p in inputs.items() if p and Path(p).expanduser().is_dir()}
    refuse_protected(run_dir, "run folder", protect, "--overwrite-output-dir")


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool, lock: bool = True,
                  method: str | None = None) -> RunLock:
    """Make `run_dir` this run's: lock it (`lock`: the process that writes, process 0), and check
    what is there. Without `resume`, a folder holding a previous run is refused unless `overwrite`,
    which deletes those outputs; with it, a run of another `method` is refused (--resume-force
    included: its checkpoints, metrics and samples are another method's); an `adapter/` or
    `model/` that is not ours is refused up front (the run would fail at its very end otherwise).
    -> the lock, to release when the run ends."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file; remove it or choose another --output-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {run_dir} ({e.strerror or e})")
    held = lock_run_dir(run_dir) if lock else RunLock(run_dir / LOCK, None)
    try:
        check_output_kinds(run_dir)
        previous = previous_outputs(run_dir)
        if previous and not resume:
            if not overwrite:
                raise ConfigError(holds_a_run(run_dir, previous))
            if lock:
                clear_outputs(run_dir)
        if previous and resume and method is not None:
            _same_method(run_dir, method)
        for name in ("adapter", "model"):
            p = run_dir / name
            if p.is_dir() and any(p.iterdir()) and not is_our_export(p) and not (overwrite and not resume):
                raise ConfigError(f"{p} holds files that are not a jaxpref export; move them away "
                                  "(the run writes its result there)")
    except BaseException:
        held.release()
        raise
    return held


def _same_method(run_dir: Path, method: str) -> None:
    """Refuse to continue a run of another `post_training.method` (its config.yaml says which)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["post_training"]["method"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return   # no record to compare: the checkpoint's fingerprint decides
    if saved != method:
        raise ConfigError(f"{run_dir} holds a {saved} run, not {method} (`post_training.method`), so --resume cannot "
                          "continue it; --overwrite-output-dir deletes it and starts again, or train into another "
                          "--output-dir")


def clear_outputs(run_dir: Path) -> None:
    """Delete a previous run's outputs (only when --overwrite-output-dir asked for it)."""
    for name in OUTPUTS:
        p = Path(run_dir) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
