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
    """What the command line asked: the output root, --resume-force, --resume-from STEP."""
    out_root: Path
    force: bool = False
    step: int | None = None


def resume_problems(cfg, index: int, fingerprint: dict, ask: ResumeAsk | None) -> list[str]:
    """Print the resume line of model `index` (its run's critical settings: `fingerprint`);
    -> a one-line problem where the run would refuse to continue."""
    from jaxpref.training.checkpoint import check_fingerprint, incomplete

    if ask is None:
        return []
    name = cfg.models[index].name
    run_dir = Path(ask.out_root) / name
    ckpts = run_dir / "checkpoints"
    whole = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit() and incomplete(d) is None) \
        if ckpts.is_dir() else []
    if ask.step is not None and ask.step not in whole:
        return [f"model `{name}`: --resume-from {ask.step}: no checkpoint of step {ask.step} in {ckpts} (kept: "
                f"{', '.join(map(str, whole)) or 'none'})"]
    step = ask.step if ask.step is not None else (whole[-1] if whole else None)
    if step is None:
        print(f"  resume           no checkpoint in {ckpts}: the run starts fresh")
        return []
    try:
        saved = json.loads((ckpts / str(step) / "meta" / "metadata").read_text(encoding="utf-8"))["fingerprint"]
        current = json.loads(json.dumps(fingerprint, default=str))   # as the record reads back
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
