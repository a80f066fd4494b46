"""`--dry-run` with `--resume` (`--resume-from`, `--resume-force`): the checkpoint the run would
continue from, and a changed setting refused as the run refuses it (`checkpoint.check_fingerprint`).

Reads only the checkpoint folders' names and their JSON record (`<step>/meta/metadata`); writes
nothing and never opens Orbax (whose manager would create folders)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jaxpref.errors import JaxprefError


@dataclass(frozen=True)
class ResumeAsk:
    """What the command line asked: the output root, --resume-force, --resume-from STEP, whether
    it continues a run (`resume`: any of --resume, --resume-force, --resume-from) and
    --overwrite-output-dir."""
    out_root: Path
    force: bool = False
    step: int | None = None
    resume: bool = True
    overwrite: bool = False


def fresh_run_problems(name: str, run_dir: Path, overwrite: bool) -> list[str]:
    """A run that starts afresh: a folder holding a previous run is refused as `rundir.claim_run_dir`
    refuses it, unless --overwrite-output-dir (said in a line)."""
    from jaxpref.training.rundir import holds_a_run, previous_outputs

    previous = previous_outputs(run_dir) if run_dir.is_dir() else []
    if previous and not overwrite:
        return [f"model `{name}`: {holds_a_run(run_dir, previous)}"]
    if previous:
        print(f"  run folder       {run_dir} holds a previous run ({', '.join(previous)}): "
              "--overwrite-output-dir deletes it")
    return []


def resume_problems(cfg, index: int, fingerprint, ask: ResumeAsk | None, total: int) -> list[str]:
    """Print the resume line of model `index` (`fingerprint()`: its run's critical settings;
    `total`: the run's steps); -> a one-line problem where the run would refuse to start or continue."""
    from jaxpref.training.checkpoint import (cannot_continue, check_fingerprint, incomplete, is_finished,
                                             no_checkpoint_why, past_total)
    from jaxpref.training.online_resume import same_length

    from jaxpref.training.rundir import check_output_kinds

    if ask is None:
        return []
    name = cfg.models[index].name
    run_dir = Path(ask.out_root) / name
    try:
        check_output_kinds(run_dir)   # as `rundir.claim_run_dir` refuses it
    except JaxprefError as e:
        return [f"model `{name}`: {e}"]
    if not ask.resume:
        return fresh_run_problems(name, run_dir, ask.overwrite)
    ckpts = run_dir / "checkpoints"
    whole = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit() and incomplete(d) is None) \
        if ckpts.is_dir() else []
    finished = is_finished(run_dir)
    if finished and ask.step is None and same_length(cfg, run_dir):
        print(f"  resume           {run_dir} already finished: the run is skipped")
        return []
    if ask.step is not None and ask.step not in whole:
        return [f"model `{name}`: --resume-from {ask.step}: no checkpoint of step {ask.step} in {ckpts} (kept: "
                f"{', '.join(map(str, whole)) or 'none'})"]
    step = ask.step if ask.step is not None else (whole[-1] if whole else None)
    why = no_checkpoint_why(run_dir, finished) if step is None else None
    if why:   # as checkpoint.resume_point refuses it
        return [f"model `{name}`: {cannot_continue(run_dir, why, total)}"]
    if step is None:
        print(f"  resume           no checkpoint in {ckpts}: the run starts fresh")
        return []
    if step > total:
        return [f"model `{name}`: {past_total(run_dir, step, total)}"]
    try:
        saved = json.loads((ckpts / str(step) / "meta" / "metadata").read_text(encoding="utf-8"))["fingerprint"]
        current = json.loads(json.dumps(fingerprint(), default=str))   # as the record reads back
        changed = check_fingerprint(saved, current, run_dir, ask.force)
    except JaxprefError as e:
        return [f"model `{name}`: {e}"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        print(f"  resume           checkpoint {step} has no readable record: the run reads it (or sets it aside)")
        return []
    print(f"  resume           from step {step} of {ckpts}"
          + (f" (--resume-force: {', '.join(f'`{k}`' for k in changed)} changed)" if changed else
             " (its critical settings unchanged)"))
    return []
