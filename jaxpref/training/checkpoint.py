"""Resumable checkpoints with Orbax: the train state (LoRA, optimizer state, step, RNG) and a JSON
record (data-iterator position, token count, early-stopping state, fingerprint).

Orbax writes each step into a temporary folder and renames it when whole, so a checkpoint is
either complete or absent; one that lacks a file Orbax writes, or fails to restore (truncated
files), is set aside with a warning (renamed, never deleted) and the one before it is used.
Saving a step that is already whole on disk does nothing: a run resumed from its final checkpoint
goes on to the finishing work instead of failing on the save it already made.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax

from jaxpref.errors import JaxprefError

log = logging.getLogger("jaxpref")
FINISHED = "FINISHED"


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


class CheckpointStore:
    """The run's Orbax checkpoints under `<run>/checkpoints/`. The folder is made by the first
    save (a run without `finetuning.save_steps` has none)."""

    def __init__(self, run_dir: Path, keep: int | None = None, asynchronous: bool = True):
        self.dir = (Path(run_dir) / "checkpoints").resolve()
        self._options = (keep, asynchronous)
        self._manager = None
        self.closed = False

    @property
    def manager(self):
        if self._manager is None:
            ocp = _ocp()
            keep, asynchronous = self._options
            opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                                enable_async_checkpointing=asynchronous)
            # Handlers named up front, so that a checkpoint's tree metadata (shapes) can be read alone.
            self._manager = ocp.CheckpointManager(self.dir, options=opts, item_handlers={
                "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "best": ocp.StandardCheckpointHandler()})
        return self._manager

    def save(self, step: int, state: Any, meta: dict, best: Any = None) -> None:
        """Save `step`, unless it is already on disk whole (the run resumed from it: the same state).
        `best`: the adapter of the best evaluation so far (early stopping, load_best_model_at_end),
        kept beside the state so that a resumed run exports it; `meta["best_saved"]` says so."""
        ocp = _ocp()
        if step in self.manager.all_steps() and incomplete(self.dir / str(step)) is None:
            return
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta, best_saved=best is not None))}
        if best is not None:
            items["best"] = ocp.args.StandardSave(best)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_best(self, step: int, abstract: Any) -> Any:
        """The best adapter saved with `step` (`save(..., best=)`)."""
        ocp = _ocp()
        return self.manager.restore(step, args=ocp.args.Composite(best=ocp.args.StandardRestore(abstract)))["best"]

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._manager is not None:
                self._manager.wait_until_finished()
                self._manager.close()

    def steps(self) -> list[int]:
        if self._manager is None and not self.dir.is_dir():
            return []
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def set_aside_after(self, step: int) -> list[int]:
        """Move the checkpoints after `step` into `set-aside-after-<step>-<time>/` (never deleted;
        a run continued from `step` saves those steps anew). -> the steps moved."""
        later = [s for s in self.steps() if s > step]
        if later:
            aside = self.dir / f"set-aside-after-{step}-{int(time.time())}"
            aside.mkdir()
            for s in later:
                (self.dir / str(s)).rename(aside / str(s))
            self.manager.reload()
        return later

    def restore_latest(self, abstract_state: Any, check=None, force: bool = False,
                       step: int | None = None) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that restores whole (`step`: that one only), or None. Broken
        ones are skipped and named.

        `check(meta)` runs on each checkpoint's metadata before its state is read, so that a changed
        setting is reported as such (it raises). A state whose saved shapes do not fit
        `abstract_state` is an error too, read from the tree metadata before any restore: such a
        checkpoint is whole, so it is never set aside. `force` only adds a hint to that error."""
        ocp = _ocp()
        kept = self.steps()
        if step is not None and step not in kept:
            raise JaxprefError(f"--resume-from {step}: no checkpoint of step {step} in {self.dir} (kept: "
                               f"{', '.join(map(str, kept)) or 'none'})")
        for step in reversed([step] if step is not None else kept):
            missing = incomplete(self.dir / str(step))
            if missing is not None:
                self._set_aside(step, f"incomplete: no {missing}")
                continue
            try:
                meta = dict(self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"])
            except Exception as e:
                self._set_aside(step, f"unreadable: {type(e).__name__}")
                continue
            if check is not None:
                check(meta)
            try:
                saved = _shapes(self.manager.item_metadata(step)["state"])
            except Exception as e:
                self._set_aside(step, f"unreadable: {type(e).__name__}")
                continue
            wanted = _shapes(abstract_state)
            diff = next((k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)), None)
            if diff is not None:  # a whole checkpoint of other settings: never set aside
                raise JaxprefError(
                    f"checkpoint {self.dir / str(step)} does not fit the current settings: `{diff}` is "
                    f"{saved.get(diff, 'absent')} there, {wanted.get(diff, 'absent')} now; resume with the "
                    "settings it was saved with" + (" (--resume-force keeps only settings that fit)" if force else ""))
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
                return step, out["state"], meta
            except Exception as e:  # a truncated or corrupted checkpoint: use the one before
                self._set_aside(step, f"unreadable: {type(e).__name__}")
        return None

    def _set_aside(self, step: int, why: str) -> None:
        # Set it aside (never delete data) so that the step can be saved again.
        broken = self.dir / str(step)
        aside = self.dir / f"unreadable-{step}-{int(time.time())}"
        msg = f"checkpoint {broken} is {why}; set aside as {aside.name}, using the previous one"
        print(f"jaxpref: warning: {msg}", file=sys.stderr)
        if broken.exists():
            broken.rename(aside)
        self.manager.reload()


# What Orbax writes into every whole step of this store (a step missing one was cut short or
# damaged after the fact; Orbax itself would restore some of them with default values).
STEP_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt", "meta/metadata", "meta/commit_success.txt",
              "state/_METADATA", "state/manifest.ocdbt", "state/commit_success.txt")


def incomplete(step_dir: Path) -> str | None:
    """The first file a whole checkpoint has that `step_dir` lacks, or None."""
    return next((f for f in STEP_FILES if not (Path(step_dir) / f).is_file()), None)


def _shapes(tree: Any) -> dict[str, tuple]:
    """Leaf path ('lora/layers/.../a', 'opt_state/1/0/mu/...') -> shape, for a state tree or a
    checkpoint's tree metadata alike (attribute, key and index paths all become names)."""
    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def abstract_of(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def check_fingerprint(saved: dict, current: dict, run_dir: Path, force: bool) -> list[str]:
    """-> the critical settings that changed (allowed with `force`, else one line naming them).
    Keys a checkpoint from an older version lacks are not compared."""
    diffs = [k for k in sorted(saved) if saved.get(k) != current.get(k)]
    if diffs and not force:
        k = diffs[0]
        raise JaxprefError(
            f"cannot resume {run_dir}: `{k}` changed (checkpoint: {saved.get(k)!r}, now: {current.get(k)!r})"
            + (f" and {len(diffs) - 1} more" if len(diffs) > 1 else "") + "; use --resume-force to override")
    return diffs


NO_CHECKPOINT = "the run finished without a checkpoint (finetuning.save_steps unset)"


def cannot_continue(run_dir, why: str, total: int) -> str:
    """The one line for a run that cannot be continued (`why`: `no_checkpoint_why`, or an unreadable checkpoint)."""
    return f"{run_dir}: {why}, so it cannot be continued to {total} steps; --overwrite-output-dir trains it again from the start"


def no_checkpoint_why(run_dir, finished: bool) -> str | None:
    """Why a resumed run without a checkpoint cannot start afresh: it finished (nothing to continue
    from), or it holds a previous run's outputs that a fresh start would replace; None: it may."""
    from jaxpref.training.rundir import previous_outputs

    if finished:
        return NO_CHECKPOINT
    earlier = previous_outputs(run_dir)
    return f"it holds a run ({', '.join(earlier)}) but no checkpoint to continue from" if earlier else None


def past_total(run_dir, step: int, total: int) -> str:
    """The one line for a checkpoint past the run's steps."""
    return (f"{run_dir}: its checkpoint is at step {step}, past this run's {total} steps (training.max_steps / "
            "num_epochs); raise --max-steps, or --resume-from an earlier step")


def resume_point(run, force: bool, step: int | None, finished: bool, refuse=None):
    """(step, state, meta) of the newest whole checkpoint of `run` (or `step`'s), or None to start
    fresh (nothing of a previous run there). One line (JaxprefError, the store closed) for what
    cannot be continued: a missing checkpoint a finished run, a previous run's outputs or
    `--resume-from` need, one past `run.total` steps, or what
    `refuse(found)` (a method's own rule) returns. `run`: the offline or online loop's Run
    (store, state, fingerprint, run_dir, total)."""
    def check(meta):
        changed = check_fingerprint(meta.get("fingerprint", {}), run.fingerprint, run.run_dir, force)
        if changed:   # only with --resume-force: said, as the dry run says it
            print(f"jaxpref: warning: [{run.entry.name}] --resume-force: {', '.join(f'`{k}`' for k in changed)} "
                  "changed since the checkpoint", file=sys.stderr)
    try:
        found = run.store.restore_latest(abstract_of(run.state), check, force=force, step=step)
        why = None if found is not None else f"checkpoint {step} cannot be read" if step is not None \
            else no_checkpoint_why(run.run_dir, finished)
        if why:
            raise JaxprefError(cannot_continue(run.run_dir, why, run.total))
        if found is not None and found[0] > run.total:
            raise JaxprefError(past_total(run.run_dir, found[0], run.total))
        why = refuse(found) if refuse is not None and found is not None else None
        if why:
            raise JaxprefError(f"{run.run_dir}: {why}")
    except JaxprefError:
        run.store.close()
        raise
    if found is None:
        print(f"[{run.entry.name}] no checkpoint to resume from; starting fresh", file=sys.stderr)
    return found


def set_aside_later(run, step: int | None) -> None:
    """`--resume-from step`: the checkpoints after it moved aside (never deleted), and said."""
    if step is not None and run.is_main:
        moved = run.store.set_aside_after(step)
        if moved:
            print(f"[{run.entry.name}] checkpoints {', '.join(map(str, moved))} set aside in {run.store.dir} "
                  f"(continuing from step {step})", file=sys.stderr)


def truncate_metrics(path: Path, step: int, final: bool = False) -> None:
    """Drop metric rows logged after `step` (they will be logged again, identically); `final` (the
    run resumes from its final checkpoint) drops the final evaluation at `step` too, which the
    finishing work logs again. The file is replaced whole (a kill here loses no row)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            at = int(row.get("step", 0))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue  # a row cut by a kill
        if at < step or (at == step and not (final and "loss" not in row)):
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def last_train_metrics(path: Path) -> dict:
    """The last logged training row (a run resumed from its final checkpoint logs no step)."""
    from jaxpref.training.sinks import read_rows

    return next((row for row in reversed(read_rows(path)) if "loss" in row), {})


def mark_finished(run_dir: Path) -> None:
    (Path(run_dir) / FINISHED).write_text("finished\n")


def unmark_finished(run_dir: Path) -> None:
    (Path(run_dir) / FINISHED).unlink(missing_ok=True)


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / FINISHED).is_file()


def skip_finished(run_dir: Path, name: str) -> dict:
    """Say that the finished run in `run_dir` is skipped; -> its summary.json. A summary that is
    absent, cut short or edited into something other than an object is named in a warning and
    reads as {}: the run is finished all the same (its FINISHED marker and outputs are there)."""
    print(f"[{name}] already finished ({run_dir}); skipping", file=sys.stderr)
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        summary = e
    if not isinstance(summary, dict):
        why = type(summary).__name__
        print(f"jaxpref: warning: {path} is unreadable ({why}); the finished run's summary is left out",
              file=sys.stderr)
        return {}
    return summary


def clear_run(run_dir: Path) -> None:
    """A fresh (non-resumed) run starts with no checkpoint step and no FINISHED marker.
    `rundir.claim_run_dir` has already refused a folder holding checkpoint steps (or deleted them,
    asked by --overwrite-output-dir), so nothing else is deleted here: checkpoints set aside
    (`set-aside-*`, `unreadable-*`) stay, and Orbax removes its own unfinished temporary folders.
    A step still there (the folder was not claimed) is refused, never deleted."""
    found = Path(run_dir) / "checkpoints"
    steps = sorted(p.name for p in found.iterdir() if p.name.isdigit()) if found.is_dir() else []
    if steps:
        raise JaxprefError(f"{found} holds checkpoint step {steps[0]}; --resume continues that run, "
                           "--overwrite-output-dir deletes it and starts again")
    (Path(run_dir) / FINISHED).unlink(missing_ok=True)
